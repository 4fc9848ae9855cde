"""Safe-DPO: DPO on helpfulness, constrained by safety through a Lagrange multiplier (seed 000).

For each pair (helpfulness order: chosen = more helpful):

    loss_H = DPO(chosen, rejected)
    loss_S = DPO(safer, less safe)                      over pairs with delta_S != 0
    loss   = (loss_H + lambda * loss_S) / (1 + lambda)  (normalize: false gives the plain sum)

with ``delta_S = safety(chosen) - safety(rejected)`` (> 0: chosen is safer), safety scores from
the data or from a trained cost model (safety = -cost). After every optimizer step the
multiplier moves in log space, ``ln lambda += lr * lambda * J_C_ema`` (`ops.LagrangeMultiplier`),
with the cost estimate of seed 000 (`ops.estimate_cost`):

    J_C = mean(-sign(logp_w - logp_l) * sign(delta_S) * |delta_S|)

J_C > 0 means the policy prefers the less safe response of the pairs, so lambda grows; once the
policy prefers the safer ones J_C < 0 and lambda shrinks, slowly (log space plus EMA). The old
rule (``lambda.rule: linear``, ``lambda.cost_estimator: data``: J_C = -mean(delta_S), blind to
the policy) is kept for comparison.

Logged each step: ``loss_H``, ``loss_S``, ``lambda``, ``J_C`` (the EMA the update uses),
``delta_S_mean`` and ``log_ratio``, the mean sequence log-ratio log pi/pi_ref of the pair's
responses. Seed 000 calls the last one "KL", but its responses come from the data, not the
policy, so it is not a KL estimate (it is often negative) and carries its real name.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.models import load_reward_model
from alignkit.models.reward import check_saved_kind
from alignkit.ops.lagrange import (
    estimate_cost,
    estimate_cost_from_data,
    lagrangian_combine,
)
from alignkit.ops.preference import orient_pairs
from alignkit.ops.stats import masked_mean
from alignkit.trainers.common import gather_per_example, split_pairs
from alignkit.trainers.dpo import (
    DPOTrainer,
    build_preference_trainer,
    preference_metrics,
    response_lengths,
)
from alignkit.trainers.dpo_config import (  # noqa: F401  (re-exported)
    LambdaConfig,
    MultiplierConfig,
    SafeDPOConfig,
    SafetyConfig,
)
from alignkit.trainers.loop import Metrics

SAFE_DPO_LINE = (
    "Epoch {epoch_number} step {step} loss_H={loss_H:.4f} loss_S={loss_S:.4f} "
    "log_ratio={log_ratio:.4f} "
    "lambda={lambda:.4f} J_C={J_C:.4f} delta_S_mean={delta_S_mean:.4f}"
)


class SafeDPOTrainer(DPOTrainer):
    """DPO on helpfulness plus a lambda-weighted DPO on safety; lambda from the seed's update."""

    console_format = SAFE_DPO_LINE
    progress_metrics = ("loss_H", "loss_S", "lambda", "J_C")

    def __init__(self, config: SafeDPOConfig, model: nn.Module, train: Any, **kw: Any) -> None:
        super().__init__(config, model, train, **kw)
        self.config: SafeDPOConfig = config
        self.multiplier = config.lambda_.build()
        self.register_controller("lambda", self.multiplier)

    def on_train_begin(self) -> None:
        super().on_train_begin()
        if self.config.safety.source == "cost_model":
            self._score_safety_with_cost_model()

    def _score_safety_with_cost_model(self) -> None:
        path = str(self.config.safety.cost_model)
        cost_model, cost_tokenizer = load_reward_model(
            check_saved_kind(path, "cost", "safety.cost_model")
        )
        if cost_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(
                f"safety.cost_model {path} uses another tokenizer than the policy; "
                "train the cost model on the policy's backbone or give safety in the data"
            )
        scorer = self.prepare_frozen(cost_model)

        def pair_costs(batch: dict[str, Tensor]) -> Tensor:
            costs = scorer(batch["input_ids"], attention_mask=batch["attention_mask"]).rewards
            return torch.stack(split_pairs(costs), dim=-1)

        for data in (self.train_dataset, self.eval_dataset):
            if data is None:
                continue
            table = gather_per_example(self, data, pair_costs, width=2)
            for example, (cost_chosen, cost_rejected) in zip(data, table.tolist(), strict=True):
                example["chosen_safety"] = -cost_chosen
                example["rejected_safety"] = -cost_rejected

    def compute_loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        chosen, rejected = self.policy_logps(model, batch)
        ref_chosen, ref_rejected = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        losses_h, chosen_rewards, rejected_rewards = self.preference_loss(
            chosen, rejected, ref_chosen, ref_rejected
        )
        delta_s = (batch["chosen_safety"] - batch["rejected_safety"]).float()
        # The safety pair: the safer response wins; pairs with delta_S = 0 carry no order.
        flip = ~(delta_s > 0)
        safer, less_safe = orient_pairs(chosen, rejected, flip)
        losses_s, _, _ = self.preference_loss(
            safer, less_safe, *orient_pairs(ref_chosen, ref_rejected, flip)
        )
        with_nll = self.config.dpo.nll_weight > 0
        if with_nll:
            # Each DPO term carries RPO's NLL on its own winner: the more helpful response for
            # loss_H, the safer one for loss_S.
            chosen_lengths, rejected_lengths = response_lengths(batch)
            losses_h, nll_h = self.add_winner_nll(losses_h, chosen, chosen_lengths)
            safer_lengths, _ = orient_pairs(chosen_lengths, rejected_lengths, flip)
            losses_s, nll_s = self.add_winner_nll(losses_s, safer, safer_lengths)
        loss_h = losses_h.mean()
        loss_s = masked_mean(losses_s, delta_s != 0)
        loss = lagrangian_combine(loss_h, loss_s, self.multiplier.value, self.config.normalize)
        metrics = {
            "loss_H": loss_h.detach(),
            "loss_S": loss_s.detach(),
            "J_C_batch": self._cost_estimate(chosen, rejected, ref_chosen, ref_rejected, delta_s),
            "delta_S_mean": delta_s.mean(),
            # Seed 000 prints "KL" here; on the data's responses (not sampled from the policy)
            # the mean sequence log-ratio log pi/pi_ref is no KL estimate and goes negative, so
            # it is logged under its own name.
            "log_ratio": 0.5 * ((chosen - ref_chosen) + (rejected - ref_rejected)).detach().mean(),
        }
        metrics.update(preference_metrics(chosen, rejected, chosen_rewards, rejected_rewards))
        if with_nll:
            metrics["nll_loss"] = nll_h.mean()
            metrics["nll_loss_S"] = masked_mean(nll_s, delta_s != 0)
        return loss, metrics

    def _cost_estimate(
        self,
        chosen: Tensor,
        rejected: Tensor,
        ref_chosen: Tensor,
        ref_rejected: Tensor,
        delta_s: Tensor,
    ) -> Tensor:
        settings = self.config.lambda_
        if settings.cost_estimator == "data":
            return estimate_cost_from_data(delta_s)
        if settings.preference == "implicit_reward":
            return estimate_cost(chosen - ref_chosen, rejected - ref_rejected, delta_s)
        return estimate_cost(chosen.detach(), rejected.detach(), delta_s)

    def after_optimizer_step(self, metrics: Any) -> dict[str, float]:
        lam = self.multiplier.update(metrics["J_C_batch"])
        return {"lambda": lam, "J_C": float(self.multiplier.j_c_ema)}


def build_safe_dpo_trainer(cfg: SafeDPOConfig) -> SafeDPOTrainer:
    fields = ["chosen_safety", "rejected_safety"]
    return cast(
        SafeDPOTrainer,
        build_preference_trainer(SafeDPOTrainer, cfg, "safety_preference", extra_fields=fields),
    )


def train_safe_dpo(cfg: SafeDPOConfig) -> dict[str, Any]:
    """Run Safe-DPO; returns the run summary."""
    return build_safe_dpo_trainer(cfg).train()
