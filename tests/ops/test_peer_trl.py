"""alignkit's GRPO-family variants against TRL 1.16's own code on identical tensors.

The loss comes from ``GRPOTrainer._compute_loss`` (conftest.trl_grpo_loss); values and the
gradient with respect to the policy's log-probs must agree. Option names on each side, and the
conventions that differ, are in docs/migrating-from-trl.md.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from peers import _OneProcess, trl_block, trl_grpo_loss

from alignkit.ops import (
    aggregate_loss,
    cispo_policy_loss,
    get_advantage_estimator,
    grpo_advantages,
    gspo_policy_loss,
    linear_quantile,
    off_policy_sequence_mask,
    overlong_penalty,
    ppo_policy_loss,
    sapo_policy_loss,
    top_entropy_mask,
)
from alignkit.ops.advantages import terminal_rewards
from alignkit.ops.kl import full_kl, kl_loss, kl_loss_weights

ATOL = 1e-12  # float64 throughout: the two implementations agree to round-off


def tensors(seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    n, width = 6, 8
    lengths = [8, 3, 5, 1, 6, 2]
    mask = torch.zeros(n, width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    old = torch.where(mask, -torch.rand(n, width, generator=g, dtype=torch.float64) * 2, 0.0)
    logp = old + torch.where(
        mask, spread * torch.randn(n, width, generator=g, dtype=torch.float64), 0.0
    )
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    return logp, old, advantages, mask


def both(ours_fn, theirs_fn, logp):
    """Values and gradients (w.r.t. logp) of two losses of the same log-probs."""
    mine = logp.clone().requires_grad_(True)
    peer = logp.clone().requires_grad_(True)
    ours, theirs = ours_fn(mine), theirs_fn(peer)
    ours.backward()
    theirs.backward()
    return ours, theirs, mine.grad, peer.grad


def assert_same(ours, theirs, ours_grad, theirs_grad):
    torch.testing.assert_close(ours, theirs.to(ours), rtol=0, atol=ATOL)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("loss_type", "agg"), [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean")]
)
@pytest.mark.parametrize("spread", [0.02, 0.3])
def test_gspo_is_trls_sequence_level_importance_sampling(trl, loss_type, agg, spread):
    logp, old, advantages, mask = tensors(spread=spread)
    result = both(
        lambda lp: gspo_policy_loss(
            lp, old, advantages, mask, clip_ratio=0.03, clip_ratio_high=0.04, agg=agg
        )[0],
        lambda lp: trl_grpo_loss(
            lp,
            old,
            advantages,
            mask,
            loss_type=loss_type,
            importance_sampling_level="sequence",
            epsilon=0.03,
            epsilon_high=0.04,
        ),
        logp,
    )
    assert_same(*result)


def test_cispo_is_trls_with_its_cap_convention(trl):
    # TRL caps the weight at epsilon_high itself; alignkit at 1 + clip_ratio_high.
    logp, old, advantages, mask = tensors(spread=1.0)
    assert ((logp - old).exp()[mask] > 2.0).any()  # the cap binds
    result = both(
        lambda lp: cispo_policy_loss(lp, old, advantages, mask, clip_ratio_high=1.0)[0],
        lambda lp: trl_grpo_loss(lp, old, advantages, mask, loss_type="cispo", epsilon_high=2.0),
        logp,
    )
    assert_same(*result)


def test_sapo_is_trls(trl):
    logp, old, advantages, mask = tensors(spread=0.6)
    result = both(
        lambda lp: sapo_policy_loss(lp, old, advantages, mask, tau_pos=1.0, tau_neg=1.05)[0],
        lambda lp: trl_grpo_loss(lp, old, advantages, mask, loss_type="sapo"),
        logp,
    )
    assert_same(*result)


@pytest.mark.parametrize(
    ("loss_type", "agg"), [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean")]
)
def test_two_sided_clip_is_trls_delta(trl, loss_type, agg):
    logp, old, advantages, mask = tensors(spread=1.5)
    assert ((logp - old).exp()[mask] > 3.0).any()
    result = both(
        lambda lp: ppo_policy_loss(
            lp, old, advantages, mask, clip_ratio=0.2, clip_ratio_high=0.28, agg=agg, delta=3.0
        )[0],
        lambda lp: trl_grpo_loss(
            lp, old, advantages, mask, loss_type=loss_type, epsilon_high=0.28, delta=3.0
        ),
        logp,
    )
    assert_same(*result)


@pytest.mark.parametrize("spread", [0.0, 0.3])  # on-policy, and a later mini-batch
def test_trls_default_kl_term_is_k3_plus_weighted_by_the_ratio(trl, spread):
    # TRL 1.16's GRPO KL (use_bias_correction_kl=True, the default): r * k3 with r = pi/pi_old
    # differentiable, so its gradient is r * (log pi - log ref) * grad log pi: the reverse-KL
    # gradient, as alignkit's kl.placement=loss with its default estimator k3+.
    logp, old, advantages, mask = tensors(spread=spread)
    g = torch.Generator().manual_seed(3)
    ref = old + torch.where(
        mask, 0.5 * torch.randn(mask.shape, generator=g, dtype=torch.float64), 0.0
    )

    def ours(lp, estimator):
        pg, _ = ppo_policy_loss(lp, old, advantages, mask)
        kl = kl_loss(lp, ref, estimator) * kl_loss_weights(lp, old)
        return pg + 0.04 * aggregate_loss(kl, mask)

    result = both(
        lambda lp: ours(lp, "k3+"),
        lambda lp: trl_grpo_loss(
            lp, old, advantages, mask, loss_type="dapo", beta=0.04, ref_logp=ref
        ),
        logp,
    )
    assert_same(*result)
    if spread == 0.0:
        # use_bias_correction_kl=False is plain k3: the forward KL's gradient (on-policy; later
        # mini-batches differ by alignkit's pi/pi_old weight, which TRL then leaves out).
        result = both(
            lambda lp: ours(lp, "k3"),
            lambda lp: trl_grpo_loss(
                lp,
                old,
                advantages,
                mask,
                loss_type="dapo",
                beta=0.04,
                ref_logp=ref,
                use_bias_correction_kl=False,
            ),
            logp,
        )
        assert_same(*result)
        _, _, k3_plus_grad, k3_grad = both(
            lambda lp: ours(lp, "k3+"), lambda lp: ours(lp, "k3"), logp
        )
        assert not torch.allclose(k3_plus_grad, k3_grad)  # the two gradients do differ


def test_top_entropy_quantile_is_trls(trl):
    logp, old, advantages, mask = tensors(spread=0.3)
    entropies = torch.rand(
        mask.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    threshold = linear_quantile(entropies[mask], 1 - 0.3)
    keep = top_entropy_mask(entropies, mask, threshold)
    result = both(
        lambda lp: ppo_policy_loss(lp, old, advantages, mask, weights=keep.double())[0],
        lambda lp: trl_grpo_loss(
            lp,
            old,
            advantages,
            mask,
            loss_type="dapo",
            entropies=entropies,
            top_entropy_quantile=0.3,
        ),
        logp,
    )
    assert_same(*result)
    # TRL's mask itself (its threshold is torch.quantile over the gathered valid entropies).
    from trl import GRPOTrainer

    stub = types.SimpleNamespace(accelerator=_OneProcess())
    theirs = GRPOTrainer.get_high_entropy_mask(stub, entropies, mask.long(), 1 - 0.3)
    assert torch.equal(theirs, keep)


def test_off_policy_sequence_mask_is_trls(trl):
    logp, old, advantages, mask = tensors(spread=0.3)
    g = torch.Generator().manual_seed(7)
    behaviour = old + torch.where(
        mask, 0.4 * torch.rand(mask.shape, generator=g, dtype=torch.float64), 0.0
    )
    keep = off_policy_sequence_mask(advantages, logp, behaviour, mask, threshold=0.2)
    assert (~keep & mask).any() and (keep & mask).any()  # some dropped, some kept
    result = both(
        lambda lp: ppo_policy_loss(lp, old, advantages, mask, weights=keep.double())[0],
        lambda lp: trl_grpo_loss(
            lp,
            old,
            advantages,
            mask,
            loss_type="dapo",
            off_policy_mask_threshold=0.2,
            sampling_logp=behaviour,
        ),
        logp,
    )
    assert_same(*result)
    from trl import GRPOTrainer

    theirs = GRPOTrainer.get_off_policy_mask(
        advantages[:, None], logp, behaviour, mask.double(), 0.2
    )
    assert torch.equal(theirs.bool().expand_as(mask) & mask, keep)


def test_overlong_penalty_is_trls_soft_overlong_punishment(trl):
    from trl.rewards import get_soft_overlong_punishment

    lengths = torch.arange(1, 41)
    theirs = get_soft_overlong_punishment(max_completion_len=32, soft_punish_cache=10)(
        completion_ids=[[1] * n for n in lengths.tolist()]
    )
    ours = overlong_penalty(lengths, max_tokens=32, buffer=10)
    torch.testing.assert_close(
        ours.double(), torch.tensor(theirs, dtype=torch.float64), rtol=0, atol=1e-7
    )


SCORES = torch.tensor(
    [1.0, 0.0, 0.5, 0.25, 3.0, 1.0, 2.0, 0.5, 4.0, 4.0, 4.0, 4.0, 0.0, 1.0, 1.0, 1.0]
)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_is_trls(trl, scale):
    from trl import GRPOTrainer
    from trl.trainer.utils import nanstd

    namespace = trl_block(
        GRPOTrainer._generate_and_score_completions,
        "rewards = (rewards_per_func * self.reward_weights",
        "is_std_zero = torch.isclose(std_rewards",
        torch=torch,
        nanstd=nanstd,
        self=types.SimpleNamespace(reward_weights=torch.ones(1), scale_rewards=scale),
        device="cpu",
        rewards_per_func=SCORES[:, None].clone(),
        unscorable_mask=torch.zeros(16, dtype=torch.bool),
        num_generations=4,
    )
    groups = torch.arange(4).repeat_interleave(4)
    ours = grpo_advantages(SCORES, groups, scale=scale, eps=1e-4)
    torch.testing.assert_close(ours, namespace["advantages"], rtol=0, atol=1e-6)


def test_rloo_normalisation_is_trls_normalize_advantages(trl):
    from trl import RLOOTrainer
    from trl.trainer.utils import nanstd

    namespace = trl_block(
        RLOOTrainer._generate_and_score_completions,
        "grouped_rewards = rewards.view(-1, num_generations)",
        "advantages = torch.nan_to_num(advantages, nan=0.0)",
        torch=torch,
        nanstd=nanstd,
        self=types.SimpleNamespace(normalize_advantages=True),
        rewards=SCORES.clone(),
        num_generations=4,
    )
    mask = torch.ones(16, 3, dtype=torch.bool)
    ours, _ = get_advantage_estimator("rloo")(
        token_rewards=terminal_rewards(SCORES, mask),
        mask=mask,
        group_index=torch.arange(4).repeat_interleave(4),
        normalize=True,
        std_eps=1e-4,
    )
    torch.testing.assert_close(ours[:, 0], namespace["advantages"], rtol=0, atol=1e-6)
    assert not math.isnan(float(namespace["advantages"].sum()))


def test_the_distillation_loss_is_trls_reverse_kl(trl):
    # TRL's DistillationTrainer (beta=1.0, its default: the reverse KL) projects hidden states
    # through each LM head in chunks; alignkit's distill takes the logits' exact KL per token.
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    g = torch.Generator().manual_seed(0)
    batch, width, hidden, vocab = 3, 5, 8, 11
    student = torch.randn(batch, width, hidden, generator=g, dtype=torch.float64)
    teacher = torch.randn(batch, width, hidden, generator=g, dtype=torch.float64)
    head_s = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    head_t = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, width)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    temperature = 0.7

    def ours(h):
        kl = full_kl(h @ head_s.T / temperature, teacher @ head_t.T / temperature)
        return aggregate_loss(kl, mask.bool())

    def theirs(h):
        return _chunked_divergence_loss(
            h, teacher, head_s, head_t, mask, beta=1.0, temperature=temperature
        )[0]

    mine, peer = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    value, peer_value = ours(mine), theirs(peer)
    value.backward()
    peer_value.backward()
    # TRL's chunked kernel computes in float32.
    torch.testing.assert_close(value, peer_value.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine.grad, peer.grad.double(), rtol=1e-5, atol=1e-5)
