"""Building a small labelling round without a model: prompts, responses, tasks, annotators."""

from __future__ import annotations

from pathlib import Path

from alignkit.annotate.db import Database
from alignkit.annotate.ingest import NewResponse, add_annotator, add_responses, import_prompts
from alignkit.annotate.pairs import create_tasks
from alignkit.annotate.schema import Prompt

DATA = Path(__file__).parent / "data"
SCRIPT = "<script>window.pwned = 1</script><b>bold?</b>"


def seed_round(
    db: Database,
    n_prompts: int = 4,
    responses_per_prompt: int = 2,
    annotators_per_task: int = 1,
    ask_safety: bool = False,
    script_in: int | None = None,
) -> None:
    """``n_prompts`` prompts with ``responses_per_prompt`` responses from two models, and tasks."""
    rows = [
        {
            "prompt": f"Question {i}: what is {i} + {i}?",
            "category": ["math", "chat"][i % 2],
            "adversarial": i % 3 == 0,
        }
        for i in range(n_prompts)
    ]
    import_prompts(db, rows)
    with db.write() as session:
        prompts = session.query(Prompt).order_by(Prompt.id).all()
        new = []
        for i, p in enumerate(prompts):
            for j in range(responses_per_prompt):
                text = (
                    f"Answer {j} to question {i}: it is {2 * i + j}. "
                    + "Some more words here. " * j
                )
                if script_in == i and j == 0:
                    text = SCRIPT + " " + text
                new.append(
                    NewResponse(
                        p.id,
                        text,
                        ["runs/sft", "runs/dpo"][j % 2],
                        {"temperature": 0.7 + 0.3 * (j // 2)},
                        j,
                    )
                )
        add_responses(session, new)
    create_tasks(
        db, annotators_per_task=annotators_per_task, ask_safety=ask_safety, mix={"random": 1.0}
    )


def annotators(db: Database, n: int, prefix: str = "ann") -> list[str]:
    return [add_annotator(db, f"{prefix}{i}") for i in range(n)]


def side_for(db: Database, assignment_id: int, want: str) -> str:
    """The side ("left"/"right"/"tie") that means response ``want`` ("a"/"b"/"tie") to this viewer."""
    from alignkit.annotate.schema import Assignment

    if want == "tie":
        return "tie"
    with db.read() as session:
        left_is_a = session.get(Assignment, assignment_id).left_is_a
    return "left" if (want == "a") == left_is_a else "right"


def task_of(db: Database, assignment_id: int) -> int:
    from alignkit.annotate.schema import Assignment

    with db.read() as session:
        return session.get(Assignment, assignment_id).task_id
