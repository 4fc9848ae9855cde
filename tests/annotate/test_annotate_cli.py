"""`alignkit annotate ...`: a whole round from the command line, errors in one line, exit code 2."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from annotate_helpers import side_for

from alignkit.annotate.assign import AssignConfig, Submission, claim, submit
from alignkit.annotate.db import open_database
from alignkit.cli import main
from alignkit.data.loaders import load_records


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def test_a_round_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "round.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Tell me about {w}.", "category": c}) + "\n"
            for w, c in [("cats", "pets"), ("rain", "weather"), ("tea", "food")]
        )
    )
    assert _run(["annotate", "import-prompts", str(prompts), "--db", db], capsys) == (
        0,
        "added 3 prompts (0 already present)\n",
    )
    code, text = _run(
        [
            "annotate",
            "generate",
            "--model",
            "tiny",
            "--temperature",
            "0.7",
            "--temperature",
            "1.0",
            "--samples",
            "2",
            "--max-new-tokens",
            "8",
            "--db",
            db,
        ],
        capsys,
    )
    assert code == 0 and "added 12 responses" in text
    code, text = _run(
        [
            "annotate",
            "create-tasks",
            "--annotators-per-task",
            "2",
            "--max-pairs-per-prompt",
            "3",
            "--ask-safety",
            "--db",
            db,
        ],
        capsys,
    )
    assert code == 0 and "created 9 tasks (0 gold) for 3 prompts" in text  # 4 responses: 3 pairs
    code, text = _run(["annotate", "add-annotator", "ann", "--db", db], capsys)
    token = text.strip().splitlines()[-1]
    assert code == 0 and token.startswith("ak_")
    database = open_database(db)
    config = AssignConfig(min_agreement=0.0)
    rng = random.Random(0)
    while (task := claim(database, 1, config, rng)) is not None:  # "a" always better and safer
        side = side_for(database, task.assignment_id, "a")
        sub = Submission(
            f"key-{task.assignment_id:04d}",
            side,
            4,
            safer=side,
            left_safe=side == "left",
            right_safe=side == "right",
        )
        submit(database, 1, task.assignment_id, sub, config)
    code, text = _run(["annotate", "stats", "--db", db], capsys)
    assert code == 0 and json.loads(text)["labels"] == 9
    out = tmp_path / "prefs.jsonl"
    code, text = _run(["annotate", "export", str(out), "--db", db], capsys)
    assert code == 0 and "wrote 9 rows" in text
    # one annotator, no gold: no evidence either way, said so
    assert "warning: the round has no gold pairs" in text
    assert "warning: 9 rows rest only on annotators without evidence" in text
    records = load_records(out, "preference")  # what `alignkit train dpo` reads
    prior_vote = math.log(0.6 / 0.4) * (0.8 + 0.2 * 3 / 4)  # Beta(3, 2) prior; confidence 4
    assert len(records) == 9 and all(
        r["margin"] == pytest.approx(math.tanh(prior_vote / 2), abs=1e-6) for r in records
    )
    safe_out = tmp_path / "safety.jsonl"
    assert _run(["annotate", "export", str(safe_out), "--safety", "--db", db], capsys)[0] == 0
    safety = load_records(safe_out, "safety_preference")  # what Safe-DPO reads
    assert len(safety) == 9
    # one annotator: the chosen one is safe and safer (+1 + 0.5), the other unsafe (-1 - 0.5)
    assert {(r["chosen_safety"], r["rejected_safety"], r["chosen_is_safe"]) for r in safety} == {
        (1.5, -1.5, True)
    }


def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "e.db")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    code, text = _run(["annotate", "import-prompts", str(bad), "--db", db], capsys)
    assert code == 2 and f"{bad}:2: field 'prompt'" in text and "Traceback" not in text
    code, text = _run(["annotate", "add-annotator", "x", "--role", "root", "--db", db], capsys)
    assert code == 2 and "--role 'root'" in text
    code, text = _run(["annotate", "create-tasks", "--mix", "loud=1", "--db", db], capsys)
    assert code == 2 and "unknown strategy 'loud'" in text
    code, text = _run(["annotate", "stats", "--db", "mysql://h/d"], capsys)
    assert code == 2 and "only sqlite:/// and postgresql://" in text


def test_a_run_directory_means_its_newest_checkpoint_model(tmp_path: Path) -> None:
    from alignkit.annotate.generate import resolve_checkpoint

    run = tmp_path / "runs" / "sft"
    for step in (5, 12):
        model = run / "checkpoints" / f"step-{step}" / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        (model.parent / "trainer_state.pt").write_text("")
    (run / "checkpoints" / "step-20" / "model").mkdir(parents=True)  # incomplete: no trainer state
    assert resolve_checkpoint(str(run)) == str(run / "checkpoints" / "step-12" / "model")
    step5 = run / "checkpoints" / "step-5"
    assert resolve_checkpoint(str(step5)) == str(step5 / "model")
    assert resolve_checkpoint("tiny") == "tiny"


def test_generate_records_sources_and_drops_duplicates(tmp_path: Path) -> None:
    from sqlalchemy import select

    from alignkit.annotate.generate import generate
    from alignkit.annotate.ingest import import_prompts
    from alignkit.annotate.schema import Response

    db = open_database(str(tmp_path / "g.db"))
    import_prompts(db, [{"prompt": "Hello there"}, {"prompt": "Tell me a story"}])
    # greedy decoding twice: the second sample repeats the first, and is dropped
    report = generate(db, ["tiny"], temperatures=[0.0], samples=2, max_new_tokens=6, seed=7)
    assert (report.generated, report.added, report.duplicates) == (4, 2, 2)
    with db.read() as s:
        rows = s.scalars(select(Response)).all()
    assert {(r.model, r.seed, json.loads(r.settings_json)["temperature"]) for r in rows} == {
        ("tiny", 7, 0.0)
    }
    assert all(json.loads(r.settings_json)["checkpoint"] == "tiny" for r in rows)
