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


def measure_data(path: str | Path) -> DataFeatures:
    """Read a data file (any format alignkit loads) and measure what the rules use."""
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
    ram = psutil.virtual_memory().total / 2**30
    return Resources(0, ram, hours=24.0, measured=True)
