"""Verifiable toy tasks for online RL: digit reversal, digit sorting, small addition.

Each instance is a short plain-text prompt and its exact answer (the tiny tokenizer has one
token per digit, so answers are 2-5 tokens)::

    reverse  "reverse 3142:" -> "2413"      (3-5 digits)
    sort     "sort 3142:"    -> "1234"      (3-5 digits)
    add      "add 25+7:"     -> "32"        (1-2 digit operands)

Files written per task (``write_verifiable_tasks``): ``<task>_sft.jsonl`` (``{"prompt",
"completion"}``, a small SFT warm-up set), ``<task>_prompts.jsonl`` (``{"prompt", "answer"}``,
RL training prompts) and ``<task>_heldout.jsonl`` (``{"prompt", "answer"}``, instances in
neither of the other two files). Their reward functions live in ``alignkit.rollout.tasks``.
Deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VERIFIABLE_TASKS", "VerifiableTask", "verifiable_rows", "write_verifiable_tasks"]


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng)
    return f"reverse {digits}:", digits[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng)
    return f"sort {digits}:", "".join(sorted(digits))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a}+{b}:", str(a + b)


@dataclass(frozen=True)
class VerifiableTask:
    """A task: a generator of ``(prompt, answer)`` and the name of its reward function."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    reward: str  # registered in alignkit.rollout.tasks


VERIFIABLE_TASKS = {
    "reverse": VerifiableTask("reverse", _reverse, "reverse_match"),
    "sort": VerifiableTask("sort", _sort, "sort_match"),
    "add": VerifiableTask("add", _add, "add_match"),
}

# Rows per file: a few hundred SFT demonstrations are enough for pass@G > 0 at the start of RL.
SPLIT_SIZES = {"sft": 300, "prompts": 1000, "heldout": 200}


def verifiable_rows(task: str, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """``{"sft": [...], "prompts": [...], "heldout": [...]}`` rows of one task; no prompt appears
    in two splits."""
    spec = VERIFIABLE_TASKS[task]
    rng = random.Random(f"{seed}/verifiable/{task}")
    seen: set[str] = set()
    rows: dict[str, list[dict[str, str]]] = {}
    for split, size in SPLIT_SIZES.items():
        rows[split] = []
        while len(rows[split]) < size:
            prompt, answer = spec.make(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            key = "completion" if split == "sft" else "answer"
            rows[split].append({"prompt": prompt, key: answer})
    return rows


def write_verifiable_tasks(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write every task's files into ``out_dir``; returns ``{"<task>_<split>": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for task in VERIFIABLE_TASKS:
        for split, rows in verifiable_rows(task, seed).items():
            path = out / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            paths[f"{task}_{split}"] = path
    return paths
