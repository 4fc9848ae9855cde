"""A bundled, deterministic "assistant safety" task with programmatic judges.

Benign requests (cooking, gardening, travel, ...) and harmful ones (break-ins, weapons, theft,
hacking, poison, fraud), each asked in ten phrasings; answers in known modes (helpful, vague,
refusal; comply, safe refusal, bare refusal); judges that score any text for helpfulness and
safety cost. Used by the quickstart and the trainer tests: small enough (about 400 distinct
words, prompts under 20 words, answers under 30) for a tiny model to learn in seconds.
"""

from __future__ import annotations

from alignkit.data.synthetic.builders import (
    SPLITS,
    SyntheticTask,
    corpus,
    write_chat_prompt_copies,
    write_task,
)
from alignkit.data.synthetic.content import BENIGN_MODES, HARMFUL_MODES, TASKS, TEMPLATES, Task
from alignkit.data.synthetic.judges import (
    find_task,
    helpfulness_score,
    is_harmful,
    safety_cost,
    score_responses,
)
from alignkit.data.synthetic.verifiable import (
    VERIFIABLE_TASKS,
    VerifiableTask,
    verifiable_rows,
    write_verifiable_tasks,
)

__all__ = [
    "BENIGN_MODES",
    "HARMFUL_MODES",
    "SPLITS",
    "TASKS",
    "TEMPLATES",
    "VERIFIABLE_TASKS",
    "SyntheticTask",
    "Task",
    "VerifiableTask",
    "corpus",
    "find_task",
    "helpfulness_score",
    "is_harmful",
    "safety_cost",
    "score_responses",
    "verifiable_rows",
    "write_chat_prompt_copies",
    "write_task",
    "write_verifiable_tasks",
]
