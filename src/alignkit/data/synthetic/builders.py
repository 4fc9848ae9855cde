"""Deterministic data builders for the synthetic task: SFT, preference, safety, ratings, prompts.

The seed decides which phrasings are held out, which harmful SFT prompts get a compliant answer,
which pairs are kept, the order of the two responses in safety rows, and the order of rows. The
same seed gives the same rows (and byte-identical files) on every machine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.synthetic.content import (
    BENIGN_MODES,
    HARMFUL_MODES,
    TASKS,
    TEMPLATES,
    Task,
    render_prompt,
    render_response,
)
from alignkit.data.synthetic.judges import find_task, helpfulness_score, safety_cost
from alignkit.tracking.io import atomic_write_text

__all__ = ["SPLITS", "SyntheticTask", "corpus", "write_chat_prompt_copies", "write_task"]

SPLITS = ("train", "heldout")
CHAT_WORDS = ("system", "user", "assistant")


@dataclass(frozen=True)
class _Prompt:
    task: Task
    text: str


def _messages(prompt: str, completion: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}]
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


@dataclass(frozen=True)
class SyntheticTask:
    """The synthetic "assistant safety" task: benign and harmful requests with judged answers.

    Args:
        seed: decides splits, mixes and row order (content is fixed).
        heldout_templates: how many of the 10 phrasings are used only in the held-out split, so
            held-out prompts are unseen phrasings of known requests.
        harmful_comply_fraction: share of harmful SFT prompts whose demonstration complies (the
            rest get a safe refusal), so the SFT model is unsafe on a good share of them.
        safe_better_fraction: in the safety-preference data, share of harmful pairs whose
            *better* (helpfulness) label goes to the safer answer, as human annotators often do
            (PKU-SafeRLHF's better and safer labels agree on most pairs); the rest follow the
            helpfulness judge, which prefers compliance. This keeps the helpfulness and safety
            objectives in real but partial conflict, the case Safe-DPO's multiplier is for.

    Example:
        >>> task = SyntheticTask(seed=0)
        >>> len(task.prompts("train")) + len(task.prompts("heldout"))
        320
        >>> sorted(task.sft_rows("train")[0])
        ['completion', 'prompt']
    """

    seed: int = 0
    heldout_templates: int = 3
    harmful_comply_fraction: float = 0.6
    safe_better_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.heldout_templates < len(TEMPLATES):
            raise ValueError(f"heldout_templates must be in [1, {len(TEMPLATES) - 1}]")
        if not 0.0 <= self.harmful_comply_fraction <= 1.0:
            raise ValueError("harmful_comply_fraction must be in [0, 1]")
        if not 0.0 <= self.safe_better_fraction <= 1.0:
            raise ValueError("safe_better_fraction must be in [0, 1]")

    def _rng(self, *purpose: str) -> random.Random:
        # String seeds hash with SHA-512 inside `random`, so they are stable across processes.
        return random.Random("/".join([str(self.seed), *purpose]))

    def _templates(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        order = list(TEMPLATES)
        self._rng("templates").shuffle(order)
        heldout = set(order[: self.heldout_templates])
        return [t for t in TEMPLATES if (t in heldout) == (split == "heldout")]

    def _prompts(self, split: str) -> list[_Prompt]:
        items = [_Prompt(t, render_prompt(t, tpl)) for t in TASKS for tpl in self._templates(split)]
        self._rng("prompts", split).shuffle(items)
        return items

    def prompts(self, split: str) -> list[str]:
        """The prompt texts of a split, in the split's row order."""
        return [p.text for p in self._prompts(split)]

    def response(self, prompt: str, mode: str) -> str:
        """The answer in ``mode`` to one of the task's prompts."""
        return render_response(find_task(prompt), mode)

    # --- row builders ---------------------------------------------------------------------

    def prompt_rows(self, split: str, conversational: bool = False) -> list[dict[str, Any]]:
        """``{"prompt"}`` rows; ``conversational`` gives the prompt as a user message list."""
        return [
            {"prompt": _messages(p.text) if conversational else p.text}
            for p in self._prompts(split)
        ]

    def sft_rows(self, split: str, conversational: bool = False) -> list[dict[str, Any]]:
        """``{"prompt","completion"}`` rows (or ``{"messages"}`` when conversational).

        Benign prompts get the helpful answer; harmful prompts comply with probability
        ``harmful_comply_fraction`` and otherwise get the safe refusal.
        """
        rng = self._rng("sft", split)
        rows: list[dict[str, Any]] = []
        for p in self._prompts(split):
            if p.task.harmful:
                comply = rng.random() < self.harmful_comply_fraction
                mode = "comply" if comply else "safe_refusal"
            else:
                mode = "helpful"
            completion = render_response(p.task, mode)
            if conversational:
                rows.append({"messages": _messages(p.text, completion)})
            else:
                rows.append({"prompt": p.text, "completion": completion})
        return rows

    def _pairs(
        self, split: str, pairs_per_prompt: int | None
    ) -> Iterator[tuple[_Prompt, str, str]]:
        # Every prompt's responses in decreasing helpfulness; a pair is (more, less) helpful.
        rng = self._rng("pairs", split)
        for p in self._prompts(split):
            modes = HARMFUL_MODES if p.task.harmful else BENIGN_MODES
            pairs = [(modes[i], modes[j]) for i in range(3) for j in range(i + 1, 3)]
            if pairs_per_prompt is not None:
                pairs = sorted(rng.sample(pairs, min(pairs_per_prompt, len(pairs))))
            for better, worse in pairs:
                yield p, render_response(p.task, better), render_response(p.task, worse)

    def preference_rows(
        self, split: str, pairs_per_prompt: int | None = None
    ) -> list[dict[str, Any]]:
        """Helpfulness preferences ``{"prompt","chosen","rejected","margin"}``.

        ``chosen`` is the more helpful answer by ``helpfulness_score`` and ``margin`` the score
        difference; for a harmful prompt this prefers compliance. ``pairs_per_prompt=None`` keeps
        all three pairs of each prompt, a number keeps that many, drawn with the seed.
        """
        rows = []
        for p, chosen, rejected in self._pairs(split, pairs_per_prompt):
            margin = helpfulness_score(p.text, chosen) - helpfulness_score(p.text, rejected)
            rows.append(
                {
                    "prompt": p.text,
                    "chosen": chosen,
                    "rejected": rejected,
                    "margin": round(margin, 4),
                }
            )
        return rows

    def safety_preference_rows(
        self, split: str, pairs_per_prompt: int | None = None, flat: bool = False
    ) -> list[dict[str, Any]]:
        """Safety preferences, PKU-SafeRLHF style or (``flat=True``) flattened.

        PKU rows: the two answers in seeded order, ``better_response_id`` the more helpful
        (except on a ``safe_better_fraction`` share of the pairs where helpfulness and safety
        conflict, where the annotator prefers the safer answer),
        ``safer_response_id`` the one with lower ``safety_cost`` (equal costs, as for two
        answers to a benign prompt, break towards the better one: the format requires a choice),
        ``is_response_i_safe`` = cost <= 0. Flattened rows carry ``chosen_safety`` and
        ``rejected_safety`` = -cost (higher is safer; equal for two benign answers).
        """
        rng = self._rng("safety", split)
        annotator = self._rng("annotator", split)
        rows: list[dict[str, Any]] = []
        for p, better, worse in self._pairs(split, pairs_per_prompt):
            cost_better, cost_worse = safety_cost(p.text, better), safety_cost(p.text, worse)
            # Drawn for every pair (not only conflicts) so the stream does not depend on costs.
            if annotator.random() < self.safe_better_fraction and cost_better > cost_worse:
                better, worse = worse, better
                cost_better, cost_worse = cost_worse, cost_better
            if flat:
                rows.append(
                    {
                        "prompt": p.text,
                        "chosen": better,
                        "rejected": worse,
                        "chosen_safety": -cost_better,
                        "rejected_safety": -cost_worse,
                    }
                )
                continue
            better_id = rng.randrange(2)
            responses = [worse, worse]
            responses[better_id] = better
            costs = [cost_worse, cost_worse]
            costs[better_id] = cost_better
            safer_id = better_id if cost_better <= cost_worse else 1 - better_id
            rows.append(
                {
                    "prompt": p.text,
                    "response_0": responses[0],
                    "response_1": responses[1],
                    "better_response_id": better_id,
                    "safer_response_id": safer_id,
                    "is_response_0_safe": costs[0] <= 0,
                    "is_response_1_safe": costs[1] <= 0,
                }
            )
        return rows

    def rating_rows(self, split: str) -> list[dict[str, Any]]:
        """Rating rows ``{"prompt","response","rating"}``, rating = 1 + 4 x helpfulness."""
        rows = []
        for p in self._prompts(split):
            for mode in HARMFUL_MODES if p.task.harmful else BENIGN_MODES:
                response = render_response(p.task, mode)
                rating = round(1.0 + 4.0 * helpfulness_score(p.text, response), 2)
                rows.append({"prompt": p.text, "response": response, "rating": rating})
        return rows

    # --- files ----------------------------------------------------------------------------

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write every kind of row for both splits as JSONL; returns ``{"<kind>_<split>": path}``.

        Kinds: ``prompts``, ``prompts_messages``, ``sft``, ``sft_messages``, ``preference``,
        ``safety`` (PKU format), ``safety_flat``, ``ratings``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        builders = {
            "prompts": lambda s: self.prompt_rows(s),
            "prompts_messages": lambda s: self.prompt_rows(s, conversational=True),
            "sft": lambda s: self.sft_rows(s),
            "sft_messages": lambda s: self.sft_rows(s, conversational=True),
            "preference": lambda s: self.preference_rows(s),
            "safety": lambda s: self.safety_preference_rows(s),
            "safety_flat": lambda s: self.safety_preference_rows(s, flat=True),
            "ratings": lambda s: self.rating_rows(s),
        }
        paths: dict[str, Path] = {}
        for kind, build in builders.items():
            for split in SPLITS:
                path = out / f"{kind}_{split}.jsonl"
                lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in build(split)]
                path.write_text("".join(lines), encoding="utf-8")
                paths[f"{kind}_{split}"] = path
        return paths


def write_task(
    out_dir: str | Path,
    seed: int = 0,
    heldout_templates: int = 3,
    harmful_comply_fraction: float = 0.6,
    safe_better_fraction: float = 0.5,
) -> dict[str, Path]:
    """Write the synthetic task's JSONL files into ``out_dir`` (see ``SyntheticTask.write``)."""
    task = SyntheticTask(seed, heldout_templates, harmful_comply_fraction, safe_better_fraction)
    return task.write(out_dir)


def write_chat_prompt_copies(files: Mapping[str, Path]) -> dict[str, Path]:
    """Copies (``chat_<name>``) of the SFT, preference and safety files of ``SyntheticTask.write``
    whose prompt is one user message; returns ``{"<kind>_<split>": path}`` of the copies.

    An instruct model then reads a request through its chat template, and its answer follows
    the template's assistant header instead of the question's last character.
    """
    chat: dict[str, Path] = {}
    for kind in ("sft", "preference", "safety"):
        for split in SPLITS:
            path = files[f"{kind}_{split}"]
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            lines = [
                json.dumps({**row, "prompt": _messages(row["prompt"])}, ensure_ascii=False)
                for row in rows
            ]
            target = path.with_name(f"chat_{path.name}")
            atomic_write_text(target, "".join(line + "\n" for line in lines))
            chat[f"{kind}_{split}"] = target
    return chat


def corpus() -> list[str]:
    """Every text the task can produce (prompts, all answers, chat role words), in fixed order.

    Independent of the seed, so a tokenizer trained on it is the same for every split.
    """
    texts: list[str] = list(CHAT_WORDS)
    for task in TASKS:
        texts.extend(render_prompt(task, tpl) for tpl in TEMPLATES)
        texts.extend(
            render_response(task, m) for m in (HARMFUL_MODES if task.harmful else BENIGN_MODES)
        )
    return texts
