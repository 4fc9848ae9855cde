"""Reward sources backed by models: trained reward/cost models (:class:`ModelReward`) and seed
001's teacher log-ratio (:class:`TeacherLogRatioReward`).

Both score texts through ``models.reward.score_texts``: ``prompt + completion + EOS`` tokenised
as in training, only the final completion being the response. :func:`check_same_vocabulary`
is the check that two models' token ids mean the same (the teacher log-ratio here, the
teacher-guided engine's mixture).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from alignkit.errors import ConfigError
from alignkit.models.forward import response_logps
from alignkit.models.loading import load_policy
from alignkit.models.reward import CONFIG_FILE, load_reward_model, reward_scores
from alignkit.models.scoring import score_texts
from alignkit.rollout.experience import Experience
from alignkit.tracking.checkpoint import latest_checkpoint

__all__ = [
    "ModelReward",
    "TeacherLogRatioReward",
    "check_same_vocabulary",
    "teacher_log_ratio_source",
]


def _model_directory(path: Path) -> Path:
    if (path / CONFIG_FILE).is_file():
        return path
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None:
        found = sorted(p.parent for p in checkpoint.glob(f"*/{CONFIG_FILE}"))
        if found:
            return found[0]
    raise ConfigError(
        f"reward model '{path}': neither a reward/cost model directory (with {CONFIG_FILE}) nor "
        "a run directory of `alignkit train rm` / `train cost` with a checkpoint"
    )


class ModelReward:
    """A trained reward or cost model scoring ``prompt + completion`` (``score_texts``: tokenised
    as in training, prompt ids, completion ids, EOS), in batches of ``batch_size`` sequences."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
    ) -> None:
        directory = _model_directory(Path(path).expanduser())
        self.model, self.tokenizer = load_reward_model(directory)
        self.model.to(device or "cpu")
        self.kind = self.model.reward_config.kind
        self.name = f"{self.kind}_model:{path}"
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor:
        return score_texts(
            lambda batch: reward_scores(self.model, batch),
            self.tokenizer,
            prompts,
            completions,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )


def _output_width(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_same_vocabulary(
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    model: nn.Module,
    teacher: nn.Module,
) -> int:
    """The number of logits both models share; ``ConfigError`` unless the tokenizers agree.

    Token ids must mean the same in both models (a teacher-guided engine mixes their
    next-token distributions, the teacher log-ratio compares their log-probs of the same
    ids): the two tokenizers' vocabularies (token -> id) and EOS must be equal. The models'
    output widths may differ (padded embedding matrices, e.g. Qwen2.5 7B's 152064 against
    0.5B's 151936), but both must cover the tokenizer; the first ``min(widths)`` logits are used.
    """
    if teacher_tokenizer is not None and teacher_tokenizer is not tokenizer:
        mine, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if mine != theirs:
            only_mine = sorted(set(mine) - set(theirs))[:3]
            only_theirs = sorted(set(theirs) - set(mine))[:3]
            moved = [t for t in mine if t in theirs and mine[t] != theirs[t]][:3]
            raise ConfigError(
                "rollout.teacher: the teacher's tokenizer differs from the policy's "
                f"({len(theirs)} vs {len(mine)} tokens; only the policy's: {only_mine}, only "
                f"the teacher's: {only_theirs}, different ids: {moved}); teacher-guided "
                "sampling needs the same tokenizer"
            )
        if tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
            raise ConfigError(
                f"rollout.teacher: EOS ids differ (policy {tokenizer.eos_token_id}, "
                f"teacher {teacher_tokenizer.eos_token_id})"
            )
    widths = [_output_width(model), _output_width(teacher)]
    if None in widths:
        raise ConfigError("rollout.teacher: cannot read the models' output widths")
    width = min(widths)
    needed = len(tokenizer) if hasattr(tokenizer, "__len__") else width
    if width < needed:
        raise ConfigError(
            f"rollout.teacher: the models' output widths {widths} do not cover the tokenizer's "
            f"{needed} tokens"
        )
    return width


class TeacherLogRatioReward:
    """Seed 001's reward ``r = log π_t(c | p) - log π_ref(c | p)``, summed over the completion.

    A ``RewardSource``: called with texts, it scores ``prompt + completion + EOS`` through
    ``score_texts`` exactly as ``ModelReward`` does (the policy's tokenizer, shared by teacher
    and reference; only the final completion counts, not earlier assistant turns), both models
    in batches of ``batch_size``. Decoded text need not re-tokenise to the sampled ids;
    :meth:`score_experience` scores the sampled token ids themselves (use it when the
    ``Experience`` is at hand). Positive where the teacher likes the completion more than the
    reference does.
    """

    name = "teacher_log_ratio"

    def __init__(
        self,
        teacher: nn.Module,
        reference: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        check_same_vocabulary(tokenizer, None, teacher, reference)
        self.teacher, self.reference, self.tokenizer = teacher, reference, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def _log_ratio(self, batch: dict[str, Tensor]) -> Tensor:
        scores = []
        for model in (self.teacher, self.reference):
            device = next(model.parameters()).device
            on_device = {key: value.to(device) for key, value in batch.items()}
            scores.append(response_logps(model, on_device).float().cpu())
        return scores[0] - scores[1]

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor:
        return score_texts(
            self._log_ratio,
            self.tokenizer,
            prompts,
            completions,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )

    @torch.inference_mode()
    def score_experience(self, experience: Experience) -> Tensor:
        """``[N]`` rewards of the sampled ids (prompt and response as generated)."""
        fields = ("input_ids", "attention_mask", "response_mask")
        return torch.cat(
            [
                self._log_ratio({name: getattr(part, name) for name in fields})
                for part in experience.split(self.batch_size)
            ]
        )


def teacher_log_ratio_source(
    spec: Any, where: str, tokenizer: Any, device: torch.device | str | None
) -> TeacherLogRatioReward:
    """A config's ``{teacher: <model>, reference: <model>}`` (at ``where``) as a
    :class:`TeacherLogRatioReward` on ``device``; ``tokenizer`` defaults to the teacher's."""
    if not isinstance(spec, Mapping) or set(spec) != {"teacher", "reference"}:
        raise ConfigError(
            f"{where}.teacher_log_ratio: expected {{teacher: <model>, reference: <model>}}, "
            f"got {spec!r}"
        )
    teacher, teacher_tokenizer = load_policy(spec["teacher"])
    reference, reference_tokenizer = load_policy(spec["reference"])
    tokenizer = tokenizer or teacher_tokenizer
    check_same_vocabulary(tokenizer, teacher_tokenizer, teacher, reference)
    check_same_vocabulary(tokenizer, reference_tokenizer, teacher, reference)
    teacher.to(device or "cpu")
    reference.to(device or "cpu")
    return TeacherLogRatioReward(teacher, reference, tokenizer)
