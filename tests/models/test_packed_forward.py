"""Padding-free packed forwards (`models.packing`): same numbers as the padded forward."""

from __future__ import annotations

import pytest
import torch
from llama_helpers import build_llama
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit.data import PreferenceCollator
from alignkit.models import forward as forward_module
from alignkit.models import load_policy
from alignkit.models.block_attention import block_attention_available
from alignkit.models.forward import response_logps, token_logprobs
from alignkit.models.packing import model as packing_module
from alignkit.models.packing import pack_rows, packable_model, packing_options


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


def _tiny_gqa_llama() -> nn.Module:
    """The tiny preset's shape with grouped-query attention (4 query heads, 2 key/value heads)."""
    return build_llama(64, num_attention_heads=4, num_key_value_heads=2)


def _tiny_gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    ("architecture", "attention", "make_batch", "temperature", "full_logits"),
    [
        ("llama", "sdpa", _pairs_batch, 1.0, False),
        ("llama", "sdpa-mask", _pairs_batch, 1.0, False),
        ("llama", "eager", _pairs_batch, 0.7, False),
        ("llama", "sdpa", _group_batch, 1.3, False),
        ("llama", "sdpa-mask", _group_batch, 1.3, False),
        ("llama", "sdpa", _pairs_batch, 1.0, True),
        ("gqa-llama", "sdpa", _group_batch, 1.0, False),
        ("gqa-llama", "sdpa-mask", _pairs_batch, 1.0, False),
        ("gpt2", "sdpa", _group_batch, 1.0, False),
        ("gpt2", "sdpa-mask", _pairs_batch, 1.0, False),
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
    """``sdpa``: block attention (one packed row, each tree's attention on its own); ``sdpa-mask``
    and ``eager``: packed rows with a 4D mask."""
    models = {"llama": lambda: load_policy("tiny", seed=0)[0], "gqa-llama": _tiny_gqa_llama}
    model = models.get(architecture, _tiny_gpt2)()
    model.config._attn_implementation = attention.removesuffix("-mask")
    if attention == "sdpa-mask":
        monkeypatch.setattr(packing_module, "block_attention_available", lambda model: False)
    if attention == "sdpa":  # tiny models would take one masked call: the call costs nothing
        monkeypatch.setattr(packing_module, "_CALL_FLOPS", 0.0)
    assert packing_options(model)["blocks"] == (attention == "sdpa")
    model.train()  # dropout is 0 in both; train mode is what a trainer runs
    if full_logits:
        monkeypatch.setattr(forward_module, "selects_logit_rows", lambda model: False)
    batch = make_batch()
    assert packable_model(model)
    layout = pack_rows(batch["input_ids"], batch["attention_mask"], **packing_options(model))
    assert layout is not None and layout.packed_tokens < int(batch["attention_mask"].sum())
    assert (layout.blocks is not None) == (attention == "sdpa")
    padded = _logps_entropy_grads(model, batch, packed=False, temperature=temperature)
    packed = _logps_entropy_grads(model, batch, packed=True, temperature=temperature)
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    scored = batch["response_mask"] != 0
    assert (packed[0][~scored] == 0).all() and (packed[0][scored] < 0).all()


def test_block_layout_is_one_row_each_sequence_attending_to_its_own_keys() -> None:
    batch = _group_batch()  # trees: rows 0-2 sharing a prompt (10 tokens), rows 3-4 (11)
    blocks = pack_rows(batch["input_ids"], batch["attention_mask"], blocks=True)
    masked = pack_rows(batch["input_ids"], batch["attention_mask"])
    assert blocks is not None and masked is not None and blocks.visible is None
    assert blocks.input_ids.shape == (1, 21) and torch.equal(blocks.input_ids, masked.input_ids)
    # One block per row, tiling the packed row in order; the roots (rows 0, 3) are causal.
    assert [(b.start, b.end) for b in blocks.blocks] == [
        (0, 6),
        (6, 8),
        (8, 10),
        (10, 18),
        (18, 21),
    ]
    assert [b.keys is None for b in blocks.blocks] == [True, False, False, True, False]
    full = masked.visible[0, 0]
    for block in blocks.blocks:
        queries = full[block.start : block.end]
        if block.keys is None:  # sees exactly the causal run of its own positions
            n = block.end - block.start
            assert not queries[:, : block.start].any() and not queries[:, block.end :].any()
            assert torch.equal(queries[:, block.start : block.end], torch.ones(n, n).tril().bool())
            continue
        # sees exactly its gathered keys, and those as the masked layout says
        assert torch.equal(block.visible, queries[:, block.keys])
        outside = torch.ones(full.shape[1], dtype=torch.bool)
        outside[block.keys] = False
        assert not queries[:, outside].any()
    assert blocks.blocks[2].keys.tolist() == [0, 1, 2, 8, 9]  # row 0's 31 32 33, its own 40 44


def test_block_layout_is_taken_only_where_it_costs_less_than_masked_rows() -> None:
    batch = _group_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # attention 0.05 per pair: blocks 27.95 + 5 calls, masked: two rows of 11, 34.1 + 1 call
    assert pack_rows(ids, mask, blocks=True, attention_cost=0.05, call_cost=0.1).blocks is not None
    masked = pack_rows(ids, mask, blocks=True, attention_cost=0.05, call_cost=10.0)
    assert masked is not None and masked.blocks is None and masked.visible is not None
    # quadratic attention makes masked rows dear again: blocks 160 + 50, masked 264 + 10
    assert pack_rows(ids, mask, blocks=True, call_cost=10.0, attention_cost=1.0).blocks is not None
    options = packing_options(load_policy("tiny", seed=0)[0])
    assert options["blocks"] and 10 < options["call_cost"] < 40  # the tiny preset: ~20 tokens


def test_block_attention_needs_sdpa_and_no_checkpointing_and_windows_limit_packing() -> None:
    model = load_policy("tiny", seed=0)[0]
    assert block_attention_available(model)
    model.activation_checkpointing_enable()
    assert not block_attention_available(model)  # its recompute would run outside the switch
    assert not packing_options(model)["blocks"]
    model.activation_checkpointing_disable()
    model.config._attn_implementation = "eager"
    assert not block_attention_available(model)
    model = load_policy("tiny", seed=0)[0]  # windows are read once per model: set them first
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 8
    assert packable_model(model, longest=8) and not packable_model(model, longest=9)
    assert not packable_model(model)  # the length is unknown: a window may cut it


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
    monkeypatch.setattr(forward_module, "packable_model", lambda model, longest=None: False)
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
        monkeypatch.setattr(packing_module, "block_attention_available", lambda model: False)
        monkeypatch.setattr(packing_module, "attention_cost", lambda model: 1.0)
        split = token_logprobs(model, batch, batch["response_mask"], packed=True)
    torch.testing.assert_close(split, padded, rtol=0, atol=1e-5)


def test_sft_packed_rows_run_as_one_row_of_blocks_with_the_4d_mask_logprobs(monkeypatch) -> None:
    from alignkit.data.packing import PackedSFTCollator
    from alignkit.models.forward import segment_logprobs
    from alignkit.models.packing import segments_layout

    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, 6, 7, -100, 9, 10],
         "segment_lengths": [3, 3]},
        {"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14], "segment_lengths": [4]},
    ]  # fmt: skip
    batch = PackedSFTCollator(pad_token_id=0)(rows)
    layout = segments_layout(batch["input_ids"], batch["position_ids"], batch["token_mask"].bool())
    assert layout is not None and layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert [(b.start, b.end, b.visible) for b in layout.blocks] == [
        (0, 3, None), (3, 6, None), (6, 10, None)
    ]  # fmt: skip
    assert layout.where[1].tolist() == [6, 7, 8, 9, -1, -1]
    shifted = batch["position_ids"].clone()
    shifted[0, 4] = 5  # positions that skip: not sequences this function can read
    assert segments_layout(batch["input_ids"], shifted, batch["token_mask"].bool()) is None
    # Three calls of 20 tokens each cost more than one masked call over 2 x 6 positions.
    real = batch["token_mask"].bool()
    assert segments_layout(batch["input_ids"], batch["position_ids"], real, call_cost=20) is None

    monkeypatch.setattr(packing_module, "_CALL_FLOPS", 0.0)  # the tiny model takes blocks
    model = load_policy("tiny", seed=0)[0].train()
    scored = batch["labels"] != -100

    def run(blocks: bool) -> list[torch.Tensor]:
        model.zero_grad()
        if blocks:
            logps = segment_logprobs(model, batch, scored)
        else:
            logps = token_logprobs(model, batch, scored, position_ids=batch["position_ids"])
        logps.sum().backward()
        return [logps.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    masked, blocks = run(False), run(True)
    for a, b in zip(masked, blocks, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (blocks[0][scored] < 0).all() and (blocks[0][~scored] == 0).all()
