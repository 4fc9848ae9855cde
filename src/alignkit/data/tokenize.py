"""Tokenise validated records into token-id examples, with an explicit length policy.

Prompts are rendered to text first: a string prompt as is; a message list with the tokenizer's
chat template (``add_generation_prompt=True``) when it has one, else the plain fallback
``"user: ...\\nassistant: "`` (one ``role: content`` line per message, then ``assistant: ``).

Prompt and answer are tokenised *separately* and their ids concatenated, so the boundary
between them is exact (tokenising the joined text could merge tokens across it). A plain-text
prompt (a string, or messages in the fallback rendering) gets the special tokens the tokenizer
puts in front of a text (a BOS token, for Llama), a templated one only what the template
writes; every answer ends with the EOS token. Texts are tokenised in one batched call per
field, each distinct text once.

Length policy, when ``max_length`` is set (``prompt + answer`` tokens; the longer answer of a
pair counts):

- ``truncate``: keep the *end* of the prompt (drop its start, the least relevant part for the
  answer); if the answer alone is still too long, keep the last prompt token and cut the
  answer's end (its EOS is lost).
- ``drop``: leave the row out.
- ``error``: raise ``DataError`` naming the rows.

Rows over the limit are never silently handled: the returned ``LengthReport`` names them, and
a warning is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alignkit.data.loaders import DEFAULT_MAX_PROBLEMS, RecordSet
from alignkit.errors import DataError, ModelError, RowProblem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ASSISTANT_TURNS",
    "IGNORE_INDEX",
    "LENGTH_POLICIES",
    "LengthReport",
    "TokenizedData",
    "render_prompt",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
]

IGNORE_INDEX = -100  # label of positions the loss skips (PyTorch cross-entropy's default)
LENGTH_POLICIES = ("truncate", "drop", "error")
ASSISTANT_TURNS = ("all", "last")  # which assistant turns of a conversation SFT trains on
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion", "response")

logger = logging.getLogger("alignkit.data")


@dataclass
class LengthReport:
    """Which rows were over ``max_length`` and what was done with them."""

    source: str
    max_length: int | None
    policy: str
    n_rows: int
    over_limit_rows: list[int] = field(default_factory=list)  # 1-based source rows

    @property
    def n_over_limit(self) -> int:
        return len(self.over_limit_rows)

    def summary(self, max_listed: int = DEFAULT_MAX_PROBLEMS) -> str:
        """One line for logs and the console."""
        if not self.over_limit_rows:
            return f"{self.source}: all {self.n_rows} rows within max_length={self.max_length}"
        action = {"truncate": "truncated", "drop": "dropped", "error": "rejected"}[self.policy]
        listed = ", ".join(map(str, self.over_limit_rows[:max_listed]))
        more = self.n_over_limit - min(self.n_over_limit, max_listed)
        tail = f" and {more} more" if more else ""
        return (
            f"{self.source}: {self.n_over_limit} of {self.n_rows} rows over "
            f"max_length={self.max_length} tokens were {action} (rows {listed}{tail})"
        )


@dataclass
class TokenizedData(Sequence[dict[str, Any]]):
    """Tokenised examples (a sequence of dicts of id lists and scalars) and their length report."""

    examples: list[dict[str, Any]]
    report: LengthReport

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.examples[index]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[Mapping]) -> str:
    """Prompt text: a string as is; messages via the chat template or the plain fallback."""
    if isinstance(prompt, str):
        return prompt
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    # The ids the tokenizer adds *before* a text (e.g. BOS); anything it adds after (an EOS from
    # a post-processor) is not wanted between a prompt and its answer.
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _batch_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    unique = list(dict.fromkeys(texts))
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    by_text = dict(zip(unique, ids, strict=True))
    return [list(by_text[t]) for t in texts]


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    max_prompt_length: int | None = None,
) -> list[list[int]]:
    """Prompt ids; with `max_prompt_length`, only each prompt's last tokens (TRL keeps the end
    of a prompt: the question nearest the answer)."""
    prefix = _special_prefix(tokenizer)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    ids = _batch_ids(tokenizer, [render_prompt(tokenizer, p) for p in prompts])
    # A chat template writes its own special tokens; plain text (a string prompt or the
    # fallback rendering of messages) gets what the tokenizer puts in front of a text.
    full = [
        x if has_template and not isinstance(p, str) else prefix + x
        for p, x in zip(prompts, ids, strict=True)
    ]
    if max_prompt_length is None:
        return full
    return [x[-max_prompt_length:] for x in full]


def _render_conversation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping]) -> str:
    """A whole conversation as text (no generation prompt after it), as ``render_prompt``."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def _history_ids_and_labels(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping]
) -> tuple[list[int], list[int]]:
    """A prompt's ids with labels on its earlier assistant turns (each turn's text as the
    template renders it, up to the end of that turn: content and end-of-turn marks)."""
    text = render_prompt(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, messages[:i]) if i else ""
        upto = _render_conversation(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ModelError(
                "the tokenizer's chat template does not render a conversation as the start of "
                "its continuation, so earlier assistant turns cannot be located; set "
                "data.assistant_turns=last"
            )
        spans.append((len(before), len(upto)))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    ids = [] if has_template else _special_prefix(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    start = 0
    for span_start, span_end in spans:
        for piece, trained in ((text[start:span_start], False), (text[span_start:span_end], True)):
            piece_ids = _batch_ids(tokenizer, [piece])[0] if piece else []
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        start = span_end
    rest = _batch_ids(tokenizer, [text[start:]])[0] if text[start:] else []
    return ids + rest, labels + [IGNORE_INDEX] * len(rest)


def _answer_ids(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    return [[*x, eos] for x in _batch_ids(tokenizer, answers)]


def _check_policy(max_length: int | None, policy: str) -> None:
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"length policy must be one of {LENGTH_POLICIES}, got {policy!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")


def _provenance(records: Sequence[Mapping]) -> tuple[list[int], str]:
    if isinstance(records, RecordSet):
        return records.rows, records.source
    return list(range(1, len(records) + 1)), "<records>"


Budget = tuple[int, int] | None
"""Per row: ``(prompt tokens kept from the end, answer tokens kept from the start)``, or None
for a row that the policy drops (or rejects)."""


def _length_budgets(
    prompt_lengths: Sequence[int],
    answer_lengths: Sequence[int],
    max_length: int | None,
    policy: str,
) -> tuple[list[Budget], list[int], list[int]]:
    """The length policy, in one place for every tokeniser: ``(budgets, over-limit row
    indices, total lengths)``. Truncation keeps the prompt's end and the answer's start, giving
    the answer all it needs but one prompt token."""
    budgets: list[Budget] = []
    over, lengths = [], []
    for i, (prompt, answer) in enumerate(zip(prompt_lengths, answer_lengths, strict=True)):
        lengths.append(prompt + answer)
        if max_length is None or prompt + answer <= max_length:
            budgets.append((prompt, answer))
            continue
        over.append(i)
        if policy != "truncate":
            budgets.append(None)
            continue
        keep_answer = min(answer, max_length - min(prompt, 1))
        budgets.append((min(prompt, max_length - keep_answer), keep_answer))
    return budgets, over, lengths


def _tail(ids: list[int], keep: int) -> list[int]:
    return ids[len(ids) - keep :]


def _finish(
    examples: list[dict[str, Any] | None],
    over: list[int],
    rows: list[int],
    source: str,
    max_length: int | None,
    policy: str,
    what: str,
    lengths: list[int],
) -> TokenizedData:
    report = LengthReport(source, max_length, policy, len(rows), [rows[i] for i in over])
    if over and policy == "error":
        problems = [
            RowProblem(source, rows[i], what, f"{lengths[i]} tokens > max_length={max_length}")
            for i in over
        ]
        raise DataError(
            problems[:DEFAULT_MAX_PROBLEMS], total=len(problems), note="too long; policy 'error'"
        )
    if over:
        logger.warning(report.summary())  # the only place it is said (trainers do not repeat it)
    kept = [e for e in examples if e is not None]
    return TokenizedData(kept, report)


def tokenize_sft(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    policy: str = "truncate",
    max_prompt_length: int | None = None,
    assistant_turns: str = "all",
) -> TokenizedData:
    """SFT examples ``{"input_ids", "labels"}``: prompt + completion + EOS, prompt labels -100.

    Labels equal ``input_ids`` on the completion and are ``IGNORE_INDEX`` on the prompt (seed
    002 §4.2.2 with the correction in seeds/NOTES.md), so the loss is on the answer only.
    In a multi-turn conversation (a message-list prompt with assistant messages) the earlier
    assistant turns are trained on too with ``assistant_turns="all"`` (each as the chat
    template renders it, its end-of-turn marks included); ``"last"`` trains the final one only.
    """
    _check_policy(max_length, policy)
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(
            f"assistant_turns must be one of {ASSISTANT_TURNS}, got {assistant_turns!r}"
        )
    rows, source = _provenance(records)
    prompts = _prompt_ids(tokenizer, [r["prompt"] for r in records])
    prompt_labels = [[IGNORE_INDEX] * len(p) for p in prompts]
    if assistant_turns == "all":
        for i, record in enumerate(records):
            prompt = record["prompt"]
            if not isinstance(prompt, str) and any(m["role"] == "assistant" for m in prompt):
                prompts[i], prompt_labels[i] = _history_ids_and_labels(tokenizer, prompt)
    if max_prompt_length is not None:
        prompts = [p[-max_prompt_length:] for p in prompts]
        prompt_labels = [p[-max_prompt_length:] for p in prompt_labels]
    answers = _answer_ids(tokenizer, [r["completion"] for r in records])
    budgets, over, lengths = _length_budgets(
        [len(p) for p in prompts], [len(c) for c in answers], max_length, policy
    )
    examples: list[dict[str, Any] | None] = []
    for p, p_labels, c, budget in zip(prompts, prompt_labels, answers, budgets, strict=True):
        if budget is None:
            examples.append(None)
            continue
        p, p_labels, c = _tail(p, budget[0]), _tail(p_labels, budget[0]), c[: budget[1]]
        examples.append({"input_ids": p + c, "labels": p_labels + c})
    return _finish(examples, over, rows, source, max_length, policy, "prompt+completion", lengths)


def _extra_fields(records: Sequence[Mapping[str, Any]], wanted: Sequence[str] | None) -> list[str]:
    if wanted is not None:
        rows, source = _provenance(records)
        problems = [
            RowProblem(source, row, key, "missing field")
            for record, row in zip(records, rows, strict=True)
            for key in wanted
            if key not in record
        ]
        if problems:
            raise DataError(
                problems[:DEFAULT_MAX_PROBLEMS],
                total=len(problems),
                rows=len({p.row for p in problems}),
            )
        return list(wanted)
    # Every scalar per-pair value (margin, safety scores and labels) travels with the pair.
    first = records[0] if len(records) else {}
    return [
        k for k, v in first.items() if k not in _TEXT_FIELDS and isinstance(v, (bool, int, float))
    ]


def tokenize_preferences(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    policy: str = "truncate",
    extra_fields: Sequence[str] | None = None,
    max_prompt_length: int | None = None,
) -> TokenizedData:
    """Pair examples ``{"prompt_ids", "chosen_ids", "rejected_ids", <extras>}``.

    ``max_length`` bounds prompt + the longer answer; truncation cuts both answers to the same
    budget. ``extra_fields`` (default: every scalar field of the records, such as ``margin``,
    ``chosen_safety``, ``rejected_is_safe``) are copied into each example.
    """
    _check_policy(max_length, policy)
    rows, source = _provenance(records)
    extras = _extra_fields(records, extra_fields)
    prompts = _prompt_ids(tokenizer, [r["prompt"] for r in records], max_prompt_length)
    chosen = _answer_ids(tokenizer, [r["chosen"] for r in records])
    rejected = _answer_ids(tokenizer, [r["rejected"] for r in records])
    # The longer answer of the pair sets the budget; both answers are cut to it.
    longest = [max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
    budgets, over, lengths = _length_budgets([len(p) for p in prompts], longest, max_length, policy)
    examples: list[dict[str, Any] | None] = []
    for i, (p, c, r, budget) in enumerate(zip(prompts, chosen, rejected, budgets, strict=True)):
        if budget is None:
            examples.append(None)
            continue
        p, c, r = _tail(p, budget[0]), c[: budget[1]], r[: budget[1]]
        example = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        example.update((k, records[i][k]) for k in extras)
        examples.append(example)
    return _finish(examples, over, rows, source, max_length, policy, "prompt+answer", lengths)


def tokenize_prompts(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    policy: str = "truncate",
) -> TokenizedData:
    """Prompt-only examples ``{"input_ids"}`` for generation; truncation keeps the prompt's end."""
    _check_policy(max_length, policy)
    rows, source = _provenance(records)
    prompts = _prompt_ids(tokenizer, [r["prompt"] for r in records])
    budgets, over, lengths = _length_budgets(
        [len(p) for p in prompts], [0] * len(prompts), max_length, policy
    )
    examples = [
        None if budget is None else {"input_ids": _tail(p, budget[0])}
        for p, budget in zip(prompts, budgets, strict=True)
    ]
    return _finish(examples, over, rows, source, max_length, policy, "prompt", lengths)
