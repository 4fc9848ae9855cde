"""Reward/cost models: pooling through the backbone, aux heads, multi-task loss, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.models import (
    POOLINGS,
    RewardModelConfig,
    load_policy,
    load_reward_model,
    save_model,
)
from alignkit.models.pooling import last_token_index
from alignkit.ops.preference import multitask_reward_loss

# "cls" is refused on a causal backbone (see the last test); pooling.py tests it directly.
CAUSAL_POOLINGS = [p for p in POOLINGS if p != "cls"]

ROWS = [[17, 40, 300, 12], [5, 6, 7, 8, 9, 10, 11], [200]]


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists by hand to ``(input_ids, attention_mask)`` on ``side``."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    return ids, mask


def _score(model, side: str, pad_id: int, **kwargs):
    ids, mask = pad_batch(ROWS, pad_id, side)
    with torch.no_grad():
        return model(ids, mask, **kwargs), mask


@pytest.mark.parametrize("pooling", CAUSAL_POOLINGS)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_pad_tokens_never_influence_rewards(pooling: str, head: str) -> None:
    model, tokenizer = load_reward_model("tiny", head=head, pooling=pooling, seed=1)
    for side in ("right", "left"):
        base, _ = _score(model, side, tokenizer.pad_token_id)
        assert base.rewards.shape == (len(ROWS),)
        for other_pad in (tokenizer.eos_token_id, 999):
            changed, _ = _score(model, side, other_pad)
            assert torch.allclose(changed.rewards, base.rewards, atol=1e-6, rtol=0), (
                side,
                other_pad,
            )


@pytest.mark.parametrize("pooling", CAUSAL_POOLINGS)
def test_left_and_right_padding_give_the_same_rewards(pooling: str) -> None:
    model, tokenizer = load_reward_model("tiny", pooling=pooling, seed=2)
    right, _ = _score(model, "right", tokenizer.pad_token_id)
    left, _ = _score(model, "left", tokenizer.pad_token_id)
    assert torch.allclose(left.rewards, right.rewards, atol=1e-5, rtol=0)


def test_last_pooling_reward_is_the_token_value_at_the_last_real_token() -> None:
    model, tokenizer = load_reward_model("tiny", pooling="last")
    for side in ("right", "left"):
        output, mask = _score(model, side, tokenizer.pad_token_id, return_token_values=True)
        values = output.token_values
        assert values.shape == mask.shape
        assert torch.all(values[mask == 0] == 0)
        at_last = values[torch.arange(len(ROWS)), last_token_index(mask)]
        assert torch.allclose(at_last, output.rewards, atol=1e-6)


def test_aux_heads_shapes_and_multitask_loss() -> None:
    model, tokenizer = load_reward_model("tiny", aux_heads=("helpfulness", "safety"), seed=3)
    ids, mask = pad_batch(ROWS, tokenizer.pad_token_id, "right")
    chosen, rejected = model(ids, mask), model(ids.flip(0), mask.flip(0))
    assert set(chosen.aux) == {"helpfulness", "safety"}
    assert all(v.shape == (len(ROWS),) for v in chosen.aux.values())

    helpfulness = (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, float("nan"), 1.0]))
    is_safe = (torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    total, parts = multitask_reward_loss(
        chosen.rewards,
        rejected.rewards,
        chosen_aux=chosen.aux,
        rejected_aux=rejected.aux,
        helpfulness=helpfulness,
        is_safe=is_safe,
        task_weights={"safety": 0.5},
    )
    assert set(parts) == {"preference", "helpfulness", "safety"}
    assert torch.isfinite(total)
    assert torch.allclose(total, parts["preference"] + parts["helpfulness"] + 0.5 * parts["safety"])
    # The NaN target is left out: recompute the MSE over the 5 labelled responses by hand.
    predicted = torch.cat([chosen.aux["helpfulness"], rejected.aux["helpfulness"]])
    target = torch.cat(helpfulness)
    keep = ~torch.isnan(target)
    expected = ((predicted[keep] - target[keep]) ** 2).mean()
    assert torch.allclose(parts["helpfulness"], expected)
    total.backward()
    assert model.aux_heads["safety"].weight.grad is not None
    assert model.backbone.embed_tokens.weight.grad is not None


def test_multitask_loss_without_aux_targets_is_the_pairwise_loss() -> None:
    model, tokenizer = load_reward_model("tiny")
    ids, mask = pad_batch(ROWS, tokenizer.pad_token_id, "right")
    chosen, rejected = model(ids, mask), model(ids.flip(0), mask.flip(0))
    total, parts = multitask_reward_loss(chosen.rewards, rejected.rewards, kind="hinge", margin=0.5)
    expected = torch.relu(0.5 - (chosen.rewards - rejected.rewards)).mean()
    assert torch.allclose(total, expected) and set(parts) == {"preference"}
    with pytest.raises(ValueError, match="no 'safety' head"):
        multitask_reward_loss(
            chosen.rewards, rejected.rewards, is_safe=(torch.ones(3), torch.zeros(3))
        )


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, tokenizer = load_reward_model(
        "tiny", head="mlp", pooling="attention", aux_heads=["safety"], kind="cost", seed=4
    )
    out = model.save_pretrained(tmp_path / "cost", tokenizer=tokenizer)
    assert {"config.json", "model.safetensors", "reward_head.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    reloaded, reloaded_tokenizer = load_reward_model(out)
    assert reloaded.reward_config == model.reward_config
    assert reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    before, _ = _score(model, "right", tokenizer.pad_token_id, return_token_values=True)
    after, _ = _score(reloaded, "right", tokenizer.pad_token_id, return_token_values=True)
    assert torch.equal(after.rewards, before.rewards)
    assert torch.equal(after.token_values, before.token_values)
    assert torch.equal(after.aux["safety"], before.aux["safety"])


def test_reloading_with_a_contradicting_setting_is_an_error(tmp_path: Path) -> None:
    model, tokenizer = load_reward_model("tiny", pooling="mean")
    out = model.save_pretrained(tmp_path / "rm")  # no tokenizer: falls back to the base's
    assert load_reward_model(out, pooling="mean")[1].pad_token == tokenizer.pad_token
    with pytest.raises(ConfigError, match="pooling='mean'"):
        load_reward_model(out, pooling="last")


def test_fresh_tiny_reward_model_is_deterministic_in_its_seed() -> None:
    a, _ = load_reward_model("tiny", head="mlp", seed=8)
    b, _ = load_reward_model("tiny", head="mlp", seed=8)
    c, _ = load_reward_model("tiny", head="mlp", seed=9)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["head.0.weight"], state_c["head.0.weight"])


def test_reward_model_on_a_saved_policy_reuses_its_backbone(tmp_path: Path) -> None:
    policy, tokenizer = load_policy("tiny", seed=6)
    save_model(policy, tokenizer, tmp_path / "sft")
    model, _ = load_reward_model(str(tmp_path / "sft"))
    assert model.reward_config.base_model == str((tmp_path / "sft").resolve())
    assert torch.equal(model.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert torch.equal(
        model.backbone.layers[1].mlp.up_proj.weight, policy.model.layers[1].mlp.up_proj.weight
    )


def test_bad_settings_name_the_nearest_valid_value() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mean'"):
        RewardModelConfig(pooling="maen")
    with pytest.raises(ConfigError, match="aux_heads entry"):
        RewardModelConfig(aux_heads=("toxicity",))
    with pytest.raises(ConfigError, match="unknown reward model setting 'polling'"):
        RewardModelConfig.from_dict({"polling": "last"})


def test_cls_pooling_is_refused_on_a_causal_backbone() -> None:
    # The first token of a decoder-only model sees nothing else: every row would score the same.
    with pytest.raises(ConfigError, match="pooling 'cls'"):
        load_reward_model("tiny", pooling="cls")
