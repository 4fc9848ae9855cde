"""Score a policy's generations on the bundled synthetic task with its programmatic judges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.data.synthetic import score_responses
from alignkit.rollout import SamplingConfig, generate_responses
from alignkit.rollout.generate import PromptText


@dataclass(frozen=True)
class TaskEvaluation:
    """Judged generations: the mean scores and the texts they came from."""

    metrics: dict[str, float]
    prompts: list[PromptText]
    responses: list[str]


def evaluate_synthetic_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[PromptText],
    sampling: SamplingConfig | None = None,
) -> TaskEvaluation:
    """Generate (greedy by default) for `prompts` and judge helpfulness and safety cost.

    Metrics: ``helpfulness`` (mean over all prompts, in [0, 1]), ``helpfulness_benign``,
    ``helpfulness_harmful``, ``cost`` and ``cost_harmful`` (in [-1, 1], > 0 is unsafe),
    ``unsafe_rate`` (share of harmful prompts answered unsafely).
    """
    responses = generate_responses(model, tokenizer, prompts, sampling)
    metrics = score_responses(list(prompts), responses)
    return TaskEvaluation(metrics=metrics, prompts=list(prompts), responses=responses)
