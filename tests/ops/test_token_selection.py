"""The top-entropy and off-policy token masks, and the exact quantile behind the first."""

from __future__ import annotations

import pytest
import torch

from alignkit.ops import linear_quantile, off_policy_sequence_mask, top_entropy_mask
from alignkit.ops.token_selection import TIES


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_linear_quantile_is_torch_quantile(n, q):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(linear_quantile(values, q), torch.quantile(values, q))


def test_linear_quantile_refuses_empty_input_and_bad_q():
    with pytest.raises(ValueError, match="non-empty"):
        linear_quantile(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        linear_quantile(torch.zeros(3), 1.5)


def test_top_entropy_mask_keeps_the_top_share_of_valid_tokens():
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(4, 10, generator=g)
    mask = torch.rand(4, 10, generator=g) > 0.3
    threshold = linear_quantile(entropy[mask], 1 - 0.2)
    keep = top_entropy_mask(entropy, mask, threshold)
    assert not keep[~mask].any()
    # Brute force: a valid token is kept iff its entropy is >= the 0.8 quantile (the top fifth).
    for b in range(4):
        for t in range(10):
            assert bool(keep[b, t]) == bool(mask[b, t] and entropy[b, t] >= threshold)
    share = keep.sum().item() / mask.sum().item()
    assert 0.15 <= share <= 0.25
    # rho = 0: only the maximum.
    top = top_entropy_mask(entropy, mask, linear_quantile(entropy[mask], 1.0))
    assert top.sum() == 1 and entropy[top].item() == entropy[mask].max().item()


def test_entropies_tied_up_to_round_off_are_kept_together():
    # The first tokens of a group's samples share one distribution: their entropies are equal,
    # up to the last bits when computed in different micro-batches.
    tied = torch.tensor(0.7)
    entropy = torch.tensor([[tied, torch.nextafter(tied, torch.tensor(0.0)), 0.2, 0.9]])
    mask = torch.ones_like(entropy, dtype=torch.bool)
    keep = top_entropy_mask(entropy, mask, tied)
    assert keep.tolist() == [[True, True, False, True]]
    assert not top_entropy_mask(entropy, mask, tied / (1 - 10 * TIES))[0, :2].any()


def test_off_policy_mask_drops_negative_advantages_of_drifted_sequences_only():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    behaviour = torch.full((4, 4), -1.0)
    logp = behaviour.clone()
    logp[0, :3] = -2.0  # drift 1.0 per token
    logp[1, :2] = -2.0
    logp[3, 0] = -1.1  # drift 0.1
    advantages = torch.tensor([-1.0, 0.5, -0.2, -3.0])
    keep = off_policy_sequence_mask(advantages, logp, behaviour, mask, threshold=0.5)
    want = torch.tensor([False, True, True, True])[:, None] & mask
    assert torch.equal(keep, want)
    # Brute force of the definition for random inputs, with per-token advantages.
    g = torch.Generator().manual_seed(1)
    logp, behaviour = -torch.rand(5, 6, generator=g) * 3, -torch.rand(5, 6, generator=g) * 3
    mask = torch.rand(5, 6, generator=g) > 0.2
    advantages = torch.randn(5, 6, generator=g)
    keep = off_policy_sequence_mask(advantages, logp, behaviour, mask, threshold=0.3)
    for b in range(5):
        tokens = [t for t in range(6) if mask[b, t]]
        drift = sum(behaviour[b, t] - logp[b, t] for t in tokens) / max(len(tokens), 1)
        for t in range(6):
            kept = mask[b, t] and (advantages[b, t] >= 0 or drift <= 0.3)
            assert bool(keep[b, t]) == bool(kept), (b, t)
