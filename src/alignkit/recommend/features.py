"""What the recommender measures (data, model, machine) and what the user says (requirements).

Everything here is deterministic: the same file, model and flags give the same features, so
the same recommendation. Anything not measured and not given is an explicit assumption that the
report prints (``Features.assumptions``), never a silent default.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.loaders import read_rows
from alignkit.data.tools import majority_share
from alignkit.errors import FILE_ROW, DataError, ModelError, RowProblem

__all__ = [
    "DataFeatures",
    "Features",
    "ModelFeatures",
    "Requirements",
    "Resources",
    "detect_format",
    "measure_data",
    "measure_model",
    "measure_resources",
]

#: Columns that hold several annotators' votes on one pair (0 = first response, 1 = second).
VOTE_COLUMNS = ("votes", "annotations", "labels")
#: Columns that already hold an agreement in [0, 1].
AGREEMENT_COLUMNS = ("agreement", "annotator_agreement")


@dataclass(frozen=True)
class DataFeatures:
    """Measured from a data file; ``None`` where the file's format does not have the quantity."""

    path: str
    format: str  # preference | safety | rating | prompt | sft
    rows: int
    distinct_prompts: int
    prompt_diversity: float  # distinct prompts / rows
    mean_response_words: float
    margin_mean: float | None = None  # over rows that carry a margin
    tie_share: float | None = None  # pairs with margin 0 (or preference 0.5)
    agreement: float | None = None  # mean majority share (or given agreement) where present
    has_answers: bool = False  # prompt files with an `answer` column: a verifiable reward
    prompt_tokens_mean: float | None = None  # as the model sees them (chat template applied)
    answer_tokens_p95: float | None = None  # `answer` column, completions, or chosen/rejected
    length_unit: str = "tokens"  # or "estimated tokens (1.3 per word)" without a tokenizer


@dataclass(frozen=True)
class ModelFeatures:
    name: str
    parameters: int
    architecture: str
    measured: bool  # False: an assumption (no --model given)


@dataclass(frozen=True)
class Resources:
    gpus: int
    gpu_memory_gb: float  # per GPU (for CPU-only: the machine's RAM, gpus = 0)
    hours: float
    measured: bool
    flops_per_s: float | None = None  # this machine's measured fp32 matmul rate (CPU)
    bandwidth: float | None = None  # this machine's measured memory copy rate, bytes/s


@dataclass(frozen=True)
class Requirements:
    safety: bool = False
    online_reward: str | None = None  # a reward function (module:fn) the user has
    reward_model: str | None = None  # a trained reward model run directory
    cost_model: str | None = None  # a trained cost model run directory
    stability: bool = False
    simplicity: bool = False


@dataclass(frozen=True)
class Features:
    data: DataFeatures | None
    model: ModelFeatures
    resources: Resources
    requirements: Requirements
    assumptions: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_format(record: dict[str, Any]) -> str:
    """The data format a record's fields say (DESIGN.md "Data formats")."""
    keys = set(record)
    if {"response_0", "response_1", "safer_response_id"} <= keys or {
        "chosen_safety",
        "rejected_safety",
    } <= keys:
        return "safety"
    if {"chosen", "rejected"} <= keys or {"response_0", "response_1"} <= keys:
        return "preference"
    if {"response", "rating"} <= keys:
        return "rating"
    if "messages" in keys or "completion" in keys or "text" in keys:
        return "sft"
    if "prompt" in keys:
        return "prompt"
    raise ValueError(f"no known format has the fields {sorted(keys)}")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # conversational: the messages' contents
        return " ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return "" if value is None else str(value)


def _responses(record: dict[str, Any], fmt: str) -> list[str]:
    names = {
        "preference": ("chosen", "rejected", "response_0", "response_1"),
        "safety": ("chosen", "rejected", "response_0", "response_1"),
        "rating": ("response",),
        "sft": ("completion", "messages", "text"),
        "prompt": (),
    }[fmt]
    return [_text(record[name]) for name in names if name in record]


def _answer_texts(record: dict[str, Any], fmt: str) -> list[str]:
    """What a model answers in a record: its responses; a conversation's assistant turns."""
    messages = record.get("messages")
    if fmt == "sft" and isinstance(messages, list):
        return [
            str(m.get("content", ""))
            for m in messages
            if isinstance(m, dict) and m.get("role") == "assistant"
        ]
    return _responses(record, fmt)


def _agreement(record: dict[str, Any]) -> float | None:
    for name in AGREEMENT_COLUMNS:
        if isinstance(record.get(name), int | float):
            return float(record[name])
    for name in VOTE_COLUMNS:
        votes = record.get(name)
        if isinstance(votes, list) and len(votes) >= 2:
            return majority_share(votes)
    return None


def _tie(record: dict[str, Any]) -> bool:
    if record.get("preference") == 0.5:
        return True
    margin = record.get("margin")
    return isinstance(margin, int | float) and margin == 0


#: Rows whose lengths are measured (a seeded prefix would do; the file's head is simpler).
LENGTH_ROWS = 2000
WORDS_TO_TOKENS = 1.3


def _lengths(
    records: list[dict[str, Any]], fmt: str, tokenizer: Any | None
) -> tuple[float | None, float | None]:
    """Mean prompt length and 95th-percentile answer length, in tokens of `tokenizer` (words x
    1.3 without one): what the online budget and ``rollout.max_new_tokens`` are sized from."""
    rows = records[:LENGTH_ROWS]
    if fmt == "prompt":
        answers = [_text(r["answer"]) for r in rows if r.get("answer") is not None]
    else:
        answers = [text for r in rows for text in _answer_texts(r, fmt)]
    prompts = [r["prompt"] for r in rows if r.get("prompt") is not None]
    if tokenizer is None:
        prompt_lengths = [WORDS_TO_TOKENS * len(_text(p).split()) for p in prompts]
        answer_lengths = [WORDS_TO_TOKENS * len(a.split()) for a in answers]
    else:
        from alignkit.data.tokenize import tokenize_prompts

        examples = tokenize_prompts([{"prompt": p} for p in prompts], tokenizer)
        prompt_lengths = [len(e["input_ids"]) for e in examples]
        answer_lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    mean = statistics.fmean(prompt_lengths) if prompt_lengths else None
    if not answer_lengths:
        return mean, None
    ordered = sorted(answer_lengths)
    return mean, float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))])


def measure_data(path: str | Path, tokenizer: Any | None = None) -> DataFeatures:
    """Read a data file (any format alignkit loads) and measure what the rules use; lengths in
    tokens of `tokenizer` (the model's), or estimated from words without one."""
    raw = read_rows(path)
    records = [r.value for r in raw if r.error is None and isinstance(r.value, dict)]
    if not records:
        raise DataError([RowProblem(str(path), FILE_ROW, "<file>", "no readable records")])
    try:
        formats = Counter(detect_format(r) for r in records)
    except ValueError as err:
        raise DataError([RowProblem(str(path), FILE_ROW, "<file>", str(err))]) from None
    fmt = formats.most_common(1)[0][0]
    prompts = [json.dumps(r.get("prompt"), sort_keys=True) for r in records]
    words = [len(t.split()) for r in records for t in _responses(r, fmt)]
    margins = [float(r["margin"]) for r in records if isinstance(r.get("margin"), int | float)]
    agreements = [a for a in map(_agreement, records) if a is not None]
    pairs = fmt in ("preference", "safety")
    prompt_tokens, answer_tokens = _lengths(records, fmt, tokenizer)
    return DataFeatures(
        path=str(path),
        format=fmt,
        rows=len(records),
        distinct_prompts=len(set(prompts)),
        prompt_diversity=len(set(prompts)) / len(records),
        mean_response_words=statistics.fmean(words) if words else 0.0,
        margin_mean=statistics.fmean(margins) if margins else None,
        tie_share=sum(map(_tie, records)) / len(records) if pairs else None,
        agreement=statistics.fmean(agreements) if agreements else None,
        has_answers=fmt == "prompt" and all("answer" in r for r in records),
        prompt_tokens_mean=prompt_tokens,
        answer_tokens_p95=answer_tokens,
        length_unit="tokens" if tokenizer is not None else "estimated tokens (1.3 per word)",
    )


def measure_model(name: str) -> ModelFeatures:
    """Parameter count and architecture from the model's config alone (no weights are read:
    the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.models.loading import resolve_model

    resolved = resolve_model(name)
    if resolved.kind == "preset":
        from alignkit.models.tiny import PRESETS, load_tiny_tokenizer

        config = PRESETS[resolved.name](load_tiny_tokenizer())
    elif resolved.kind == "adapter":
        raise ModelError(f"{name} is a LoRA adapter; give its base model to --model")
    else:
        config = AutoConfig.from_pretrained(resolved.location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    return ModelFeatures(name, parameters, str(config.model_type), measured=True)


def measure_resources() -> Resources:
    """This machine: its GPUs and their memory, or its RAM when it has none."""
    import psutil
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(count))
        return Resources(count, memory / 2**30, hours=24.0, measured=True)
    from alignkit.recommend.budget import measure_machine

    ram = psutil.virtual_memory().total / 2**30
    flops, bandwidth = measure_machine()
    return Resources(0, ram, hours=24.0, measured=True, flops_per_s=flops, bandwidth=bandwidth)
