"""Padding-free packed forwards (`models.packing`): same numbers as the padded forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit.data import PreferenceCollator
from alignkit.models import forward as forward_module
from alignkit.models import load_policy
from alignkit.models.forward import response_logps, token_logprobs
from alignkit.models.packing import pack_rows, packable_model


def _pairs_batch() -> dict[str, torch.Tensor]:
    """Three pairs: a long shared prompt, answers that start alike (the shared prefix runs into
    the answers), and a one-token prompt (nothing worth sharing)."""
    examples = [
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [9, 12]},
        {"prompt_ids": [5, 6], "chosen_ids": [13], "rejected_ids": [14, 15, 16, 17, 18]},
        {"prompt_ids": [20], "chosen_ids": [21, 22], "rejected_ids": [23]},
    ]
    return PreferenceCollator(pad_token_id=0)(examples)


def _group_batch() -> dict[str, torch.Tensor]:
    """A GRPO-shaped batch: left-padded prompts (two groups), responses right-padded after."""
    rows = [
        ([0, 0, 31, 32, 33], [40, 41, 42]),
        ([0, 0, 31, 32, 33], [43, 0, 0]),
        ([0, 0, 31, 32, 33], [40, 44, 0]),
        ([34, 35, 36, 37, 38], [45, 46, 47]),
        ([34, 35, 36, 37, 38], [48, 49, 0]),
    ]
    input_ids = torch.tensor([p + r for p, r in rows])
    attention_mask = (input_ids != 0).long()
    response_mask = attention_mask.clone()
    response_mask[:, :5] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def test_layout_of_a_pair_shares_the_prompt_but_its_last_token() -> None:
    batch = PreferenceCollator(pad_token_id=0)(
        [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]}]
    )
    layout = pack_rows(batch["input_ids"], batch["attention_mask"])
    assert layout is not None
    # chosen row whole; the rejected row keeps the prompt's last token (7) and its answer.
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert (layout.packed_tokens, layout.padded_tokens) == (7, 10)
    assert layout.where.tolist() == [[0, 1, 2, 3, 4], [0, 1, 5, 6, -1]]
    # The rejected row's prompt token 7 is scored, if ever, as the chosen row's copy.
    assert layout.scored_at.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 6, -1]]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 1, 0],  # the kept prompt token: the shared prompt, then itself
            [1, 1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(layout.visible[0, 0], expected)
    assert layout.pack_scored(batch["response_mask"]).tolist() == [[0, 0, 0, 1, 1, 0, 1]]


def test_a_row_with_a_hole_or_a_batch_without_waste_is_not_packed() -> None:
    ids = torch.tensor([[5, 6, 7], [5, 0, 7]])
    assert pack_rows(ids, torch.tensor([[1, 1, 1], [1, 0, 1]])) is None
    full = torch.tensor([[5, 6, 7], [8, 9, 10]])  # no padding, nothing shared
    assert pack_rows(full, torch.ones_like(full)) is None
    assert pack_rows(full[:, :2], torch.tensor([[1, 1], [1, 0]])) is not None


def test_costly_attention_splits_rows_between_trees_of_shared_prefixes() -> None:
    batch = _group_batch()
    # Trees: rows 0-2 (6 + 2 + 2 own tokens), rows 3-4 (8 + 3). One row of 21 costs
    # 21 * (1 + 21 c), two rows of 11: 22 * (1 + 11 c); two win for c > 1 / 199.
    one = pack_rows(batch["input_ids"], batch["attention_mask"], attention_cost=0.004)
    two = pack_rows(batch["input_ids"], batch["attention_mask"], attention_cost=0.006)
    assert one is not None and one.input_ids.shape == (1, 21)
    assert two is not None and two.input_ids.shape == (2, 11)
    packed_row = torch.div(two.where, 11, rounding_mode="floor")
    real = batch["attention_mask"].bool()
    first, second = set(packed_row[:3][real[:3]].tolist()), set(packed_row[3:][real[3:]].tolist())
    assert len(first) == len(second) == 1 and first != second


def _logps_entropy_grads(model: nn.Module, batch, packed: bool, temperature: float = 1.0):
    model.zero_grad()
    logps, entropy = token_logprobs(
        model,
        batch,
        batch["response_mask"],
        temperature=temperature,
        with_entropy=True,
        packed=packed,
    )
    (logps.sum() + 0.5 * entropy.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    return [logps.detach(), entropy.detach(), *grads]


def _tiny_gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    ("architecture", "attention", "make_batch", "temperature", "full_logits"),
    [
        ("llama", "sdpa", _pairs_batch, 1.0, False),
        ("llama", "eager", _pairs_batch, 0.7, False),
        ("llama", "sdpa", _group_batch, 1.3, False),
        ("llama", "sdpa", _pairs_batch, 1.0, True),
        ("gpt2", "sdpa", _group_batch, 1.0, False),
    ],
)
def test_packed_logprobs_entropies_and_grads_equal_the_padded_forward(
    monkeypatch: pytest.MonkeyPatch,
    architecture: str,
    attention: str,
    make_batch,
    temperature: float,
    full_logits: bool,
) -> None:
    model = load_policy("tiny", seed=0)[0] if architecture == "llama" else _tiny_gpt2()
    model.config._attn_implementation = attention
    model.train()  # dropout is 0 in both; train mode is what a trainer runs
    if full_logits:
        monkeypatch.setattr(forward_module, "selects_logit_rows", lambda model: False)
    batch = make_batch()
    assert packable_model(model)
    layout = pack_rows(batch["input_ids"], batch["attention_mask"])
    assert layout is not None and layout.packed_tokens < int(batch["attention_mask"].sum())
    padded = _logps_entropy_grads(model, batch, packed=False, temperature=temperature)
    packed = _logps_entropy_grads(model, batch, packed=True, temperature=temperature)
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    scored = batch["response_mask"] != 0
    assert (packed[0][~scored] == 0).all() and (packed[0][scored] < 0).all()


def test_packed_response_logps_equal_the_padded_ones_to_1e_5() -> None:
    model = load_policy("tiny", seed=0)[0].eval()
    batch = _pairs_batch()
    with torch.no_grad():
        padded = response_logps(model, batch)
        packed = response_logps(model, batch, packed=True)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert (padded < -5).all()  # a random 1024-token model: several nats per token


def test_models_that_cannot_take_a_packed_batch_run_padded(monkeypatch) -> None:
    model = load_policy("tiny", seed=0)[0].eval()
    model.config._attn_implementation = "flash_attention_2"
    assert not packable_model(model)  # needs position-based varlen packing, not a 4D mask
    model.config._attn_implementation = "sdpa"
    calls = []
    monkeypatch.setattr(forward_module, "_packed_token_logprobs", lambda *a: calls.append(a))
    batch = _pairs_batch()
    token_logprobs(model, batch, batch["response_mask"], packed=True)
    assert len(calls) == 1
    monkeypatch.setattr(forward_module, "packable_model", lambda model: False)
    with torch.no_grad():
        out = token_logprobs(model, batch, batch["response_mask"], packed=True)
    assert len(calls) == 1 and out.shape == batch["input_ids"].shape


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "attention"])
def test_packed_reward_model_scores_equal_the_padded_forward(pooling: str) -> None:
    from alignkit.models import load_reward_model

    model, _ = load_reward_model("tiny", pooling=pooling, aux_heads=("safety",), seed=0)
    model.train()
    batch = _pairs_batch()

    def run(packed: bool) -> list[torch.Tensor]:
        model.zero_grad()
        out = model(batch["input_ids"], batch["attention_mask"], True, packed=packed)
        (out.rewards.sum() + out.aux["safety"].sum() + out.token_values.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        detached = [out.rewards.detach(), out.aux["safety"].detach(), out.token_values.detach()]
        return detached + grads

    padded, packed = run(False), run(True)
    assert len(padded) == len(packed) > 3
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert padded[0].std() > 1e-4  # six different sequences, six different rewards


def test_logprobs_are_the_same_when_the_trees_are_split_over_rows(monkeypatch) -> None:
    model = load_policy("tiny", seed=0)[0].eval()
    batch = _group_batch()
    with torch.no_grad():
        padded = token_logprobs(model, batch, batch["response_mask"])
        monkeypatch.setattr(forward_module, "attention_cost", lambda model: 1.0)
        split = token_logprobs(model, batch, batch["response_mask"], packed=True)
    torch.testing.assert_close(split, padded, rtol=0, atol=1e-5)
