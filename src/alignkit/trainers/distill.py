"""On-policy distillation: the per-token reverse KL to a teacher on the policy's own samples.

Per iteration (Agarwal et al. 2024, GKD, arXiv:2306.13649, with lambda = 1: only the student's
own samples; beta = 1: the reverse KL; Lu & Thinking Machines 2025, "On-policy distillation")::

    exp  = engine.generate(prompts)                     # the policy's own samples (on-policy)
    exp.scores = rewards(...)                           # optional: logged and evaluated only

and per mini-batch, one optimizer step of::

    L = agg over response tokens t of KL(pi(. | y_<t) || teacher(. | y_<t))     (ops.kl.full_kl)

the exact KL over the vocabulary at every sampled position, both distributions at the sampling
temperature. The teacher is loaded as the teacher-guided rollouts load theirs
(``alignkit.models.load_policy``) and must share the policy's vocabulary; it only scores.

When to use which (docs/migrating-from-trl.md, "On-policy distillation"): this loss gives a
dense, low-variance signal at every token and needs no reward, only a teacher with the
policy's tokenizer; seed 001's ``teacher_log_ratio`` reward (log teacher - log reference of
the whole completion) is the RL form of the same objective: it goes through advantages, so it
adds to other rewards and works with any estimator, at the variance of a sequence-level reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.models import load_policy
from alignkit.models.forward import position_ids_from_mask, selects_logit_rows, takes_position_ids
from alignkit.ops.kl import full_kl
from alignkit.ops.logprobs import predicts_scored_mask
from alignkit.ops.losses import aggregate_loss, aggregation_units
from alignkit.rollout import Experience, Prompt, load_prompt_file
from alignkit.rollout.rewards import RewardSource, build_reward_source
from alignkit.trainers.common import load_model_and_tokenizer
from alignkit.trainers.distill_config import DistillConfig, DistillSettings
from alignkit.trainers.online import OnlineTrainer

__all__ = ["DistillConfig", "DistillSettings", "DistillTrainer", "response_logits", "train_distill"]


class DistillTrainer(OnlineTrainer):
    """See the module docstring. `reward` is optional: it only feeds metrics and evaluation."""

    progress_metrics = ("distill/reverse_kl", "response_length/mean")

    def __init__(
        self,
        config: DistillConfig,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        teacher: nn.Module,
        reward: RewardSource | None = None,
        *,
        eval_prompts: Sequence[Prompt] | None = None,
    ) -> None:
        super().__init__(config, model, tokenizer, prompts, reward, eval_prompts=eval_prompts)
        self.config: DistillConfig = config
        self.teacher = teacher

    def _prepare_training(self) -> None:
        super()._prepare_training()
        self.teacher = self.prepare_frozen(self.teacher)

    def complete_experience(self, exp: Experience) -> Experience:
        if self.reward is not None:
            with self.timed("reward"):
                exp.scores = self.score(self.reward, exp).to(self.accelerator.device)
        return exp

    def experience_metrics(self, exp: Experience) -> dict[str, Tensor]:
        metrics = {
            "response_length/mean": exp.response_lengths.float().mean(),
            "response_length/clipped_ratio": exp.truncated.float().mean(),
        }
        applicable = torch.isfinite(exp.scores)
        if applicable.any():
            metrics["reward/mean"] = exp.scores[applicable].mean()
        return metrics

    def optimize(self, minibatch: Experience) -> dict[str, Tensor]:
        """One optimizer step of the reverse KL on `minibatch`."""
        micro = minibatch.split(self.config.train.sequences_per_device)
        outcome = self.policy_step.run(
            micro, self.distill_objective, self._units, step=self.state.step + 1
        )
        metrics = dict(outcome.metrics)
        if outcome.grad_norm is not None:
            metrics["grad_norm"] = outcome.grad_norm.detach().float()
        return metrics

    def distill_objective(self, batch: Experience, units: Tensor) -> tuple[Tensor, dict]:
        """This micro-batch's share of the step's aggregated per-token KL(pi || teacher)."""
        temperature = self.sampling.temperature
        scored = batch.response_mask
        logits = response_logits(self.model, batch, scored, temperature)
        with torch.no_grad():
            teacher_logits = response_logits(self.teacher, batch, scored, temperature)
        if teacher_logits.shape[-1] != logits.shape[-1]:
            raise ConfigError(
                f"distill.teacher has {teacher_logits.shape[-1]} logits per token, the policy "
                f"{logits.shape[-1]}: the teacher must share the policy's vocabulary"
            )
        per_token = _at_scored(full_kl(logits, teacher_logits), scored)
        loss = aggregate_loss(per_token, scored, self.config.distill.agg, normaliser=units)
        return loss, {"distill/reverse_kl": loss.detach()}

    def _units(self, batch: Experience) -> Tensor:
        return aggregation_units(
            batch.response_mask,
            self.config.distill.agg,
            max_tokens=self.config.rollout.max_new_tokens,
        )


def response_logits(
    model: nn.Module, batch: Experience, scored: Tensor, temperature: float
) -> Tensor:
    """``[n, V]`` the logits (divided by `temperature`) that predict each scored token, in
    row-major order of `scored`; the LM head runs on those positions only where the model
    supports it (as ``models.forward.token_logprobs``)."""
    inputs: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
    }
    if takes_position_ids(model):
        inputs["position_ids"] = position_ids_from_mask(batch.attention_mask)
    predicts = predicts_scored_mask(scored)
    if selects_logit_rows(model):
        logits = model(**inputs, logits_to_keep=predicts).logits
    else:
        logits = model(**inputs).logits[predicts.bool()]
    return logits / temperature if temperature != 1.0 else logits


def _at_scored(values: Tensor, scored: Tensor) -> Tensor:
    """``[B, T]`` with ``values`` (one per scored token, row-major) at the scored tokens."""
    rows = predicts_scored_mask(scored).reshape(-1).nonzero().squeeze(-1)
    out = values.new_zeros(scored.numel()).index_put((rows + 1,), values)
    return out.view(scored.shape)


def build_distill_trainer(cfg: DistillConfig) -> DistillTrainer:
    """Load the policy, its prompts, the teacher and the (optional) rewards."""
    if not cfg.data.train_file:
        raise ConfigError("data.train_file is required (a prompt file)")
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher is required: a causal LM with the policy's tokenizer")
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
    teacher, teacher_tokenizer = load_policy(cfg.distill.teacher, dtype=cfg.model.dtype)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"distill.teacher={cfg.distill.teacher!r} has another tokenizer than the policy "
            f"{cfg.model.name!r}: the per-token KL needs one vocabulary (the "
            "teacher_log_ratio reward needs it too)"
        )
    data = cfg.data
    prompts = load_prompt_file(data.train_file, tokenizer, data.max_prompt_length)
    eval_prompts = None
    if data.eval_file:
        eval_prompts = load_prompt_file(
            data.eval_file, tokenizer, data.max_prompt_length, limit=data.max_eval_prompts
        )
    reward = None
    if cfg.rewards:
        reward = build_reward_source([s.spec() for s in cfg.rewards], tokenizer=tokenizer)
    return DistillTrainer(
        cfg, model, tokenizer, prompts, teacher, reward, eval_prompts=eval_prompts
    )


def train_distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run on-policy distillation (``alignkit train distill``)."""
    return build_distill_trainer(cfg).train()
