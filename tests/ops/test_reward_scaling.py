"""GRPO's reward scaling modes (group, batch, none) with a configurable std epsilon, and
RLOO's advantage normalisation: closed forms, and process-global statistics."""

from __future__ import annotations

import pytest
import torch

from alignkit.ops import Moments, get_advantage_estimator, grpo_advantages, normalize_advantages
from alignkit.ops.advantages import rloo_advantages, terminal_rewards

SCORES = torch.tensor([1.0, 0.0, 0.5, 3.0, 1.0, 2.0, 4.0, 4.0, 4.0, 7.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])


def brute(scores, groups, scale, eps):
    out = []
    for i, s in enumerate(scores.tolist()):
        members = [scores[j].item() for j in range(len(scores)) if groups[j] == groups[i]]
        if len(members) < 2 or len(set(members)) == 1:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        if scale == "group":
            sigma = (sum((m - mean) ** 2 for m in members) / (len(members) - 1)) ** 0.5
        elif scale == "batch":
            sigma = scores.std(unbiased=True).item()
        else:
            out.append(s - mean)
            continue
        out.append((s - mean) / (sigma + eps))
    return torch.tensor(out)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_grpo_scaling_modes_match_their_definitions(scale, eps):
    got = grpo_advantages(SCORES, GROUPS, scale=scale, eps=eps)
    torch.testing.assert_close(got, brute(SCORES, GROUPS, scale, eps))
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(SCORES, GROUPS, scale="global")


def test_the_registered_estimators_read_scale_and_epsilon_and_span_processes():
    mask = torch.ones(10, 3, dtype=torch.bool)
    rewards = terminal_rewards(SCORES, mask)
    grpo = get_advantage_estimator("grpo")
    for scale in ("group", "batch", "none"):
        a, _ = grpo(
            token_rewards=rewards, mask=mask, group_index=GROUPS, scale_rewards=scale, std_eps=1e-4
        )
        torch.testing.assert_close(a[:, 0], brute(SCORES, GROUPS, scale, 1e-4))
    dr, _ = get_advantage_estimator("dr_grpo")(token_rewards=rewards, mask=mask, group_index=GROUPS)
    torch.testing.assert_close(dr[:, 0], brute(SCORES, GROUPS, "none", 0.0))
    # scale=batch on one process's half, with reduce_moments adding the other half's moments,
    # equals the whole batch's result on those rows.
    first, second = slice(0, 6), slice(6, 10)
    other = Moments.of(SCORES[second])

    def reduce(moments: Moments) -> Moments:
        return moments.merge(other)

    half, _ = grpo(
        token_rewards=rewards[first],
        mask=mask[first],
        group_index=GROUPS[first],
        scale_rewards="batch",
        reduce_moments=reduce,
    )
    torch.testing.assert_close(half[:, 0], brute(SCORES, GROUPS, "batch", 1e-6)[first])


def test_rloo_normalisation_is_trls_over_the_batchs_sequences():
    mask = torch.zeros(10, 4, dtype=torch.bool)
    mask[:, :2] = True
    mask[::2, :4] = True  # lengths differ: the normalisation weighs sequences, not tokens
    rewards = terminal_rewards(SCORES, mask)
    rloo = get_advantage_estimator("rloo")
    plain, _ = rloo(token_rewards=rewards, mask=mask, group_index=GROUPS)
    a, _ = rloo(token_rewards=rewards, mask=mask, group_index=GROUPS, normalize=True, std_eps=1e-4)
    raw = rloo_advantages(SCORES, GROUPS)
    want = (raw - raw.mean()) / (raw.std(unbiased=True) + 1e-4)
    torch.testing.assert_close(a[:, 0], want)
    torch.testing.assert_close(a[mask], want[:, None].expand_as(mask)[mask])
    torch.testing.assert_close(plain[:, 0], raw)
    # Process-global: half the rows with the other half's moments = the whole batch.
    other = Moments.of(raw[6:])
    half = normalize_advantages(raw[:6], 1e-4, lambda m: m.merge(other))
    torch.testing.assert_close(half, want[:6])
