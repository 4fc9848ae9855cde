"""The lean decoder on a peft LoRA model: the adapters applied as peft applies them, so its
logits, samples and log-probs equal the transformers path's (rollout/decode.py)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_decode import ARCHITECTURES, PAD, VOCAB, _prompts, _Tokenizer

from alignkit.rollout import SamplingConfig, TransformersEngine
from alignkit.rollout.decode import (
    DynamicCacheDecoder,
    StaticCacheDecoder,
    lean_decode_support,
    start_decoding,
)
from alignkit.rollout.engine import pad_prompts


def _lora(arch: str = "qwen2", dropout: float = 0.1, **extra) -> torch.nn.Module:
    """``arch`` with LoRA on every linear layer, B non-zero (a trained adapter), in eval mode."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    for key, value in extra.items():
        setattr(config, key, value)
    model = get_peft_model(ARCHITECTURES[arch](), config)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _compare_steps(model: torch.nn.Module, autocast: bool) -> float:
    """Largest logit difference between the lean and the transformers decoder over a prefill
    and six steps (rows leaving the batch after the third)."""
    ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
    tokens = torch.randint(2, VOCAB, (9, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        lean, lean_logits = start_decoding(model, ids, mask, positions, 3, 7, lean=True)
        plain, plain_logits = start_decoding(model, ids, mask, positions, 3, 7, lean=False)
        assert isinstance(lean, StaticCacheDecoder)
        assert isinstance(plain, DynamicCacheDecoder)
        worst = float((lean_logits.float() - plain_logits.float()).abs().max())
        for step in range(6):
            if step == 3:
                keep = torch.tensor([0, 2, 3, 5, 6, 7])
                lean.select(keep)
                plain.select(keep)
                tokens = tokens[keep]
            a, b = lean.step(tokens[:, step]), plain.step(tokens[:, step])
            assert a.dtype == b.dtype
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lean_lora_logits_equal_the_peft_forward(arch) -> None:
    model = _lora(arch)
    assert lean_decode_support(model, 5 + 12) is None
    assert _compare_steps(model, autocast=False) < 1e-5
    # The adapters change the logits: a decoder that skipped them would fail the comparison.
    with model.disable_adapter():
        ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
        with torch.inference_mode():
            _, base_logits = start_decoding(model, ids, mask, positions, 1, 3, lean=True)
    with torch.inference_mode():
        _, lora_logits = start_decoding(model, ids, mask, positions, 1, 3, lean=True)
    assert float((base_logits - lora_logits).abs().max()) > 0.1


def test_lean_lora_under_bf16_autocast_matches_the_autocast_forward() -> None:
    """fp32 weights under bf16 autocast (``precision: bf16``): the same bf16 arithmetic as the
    peft forward under autocast: the logits agree to well under one bf16 step at size ~10."""
    assert _compare_steps(_lora("llama"), autocast=True) < 0.07  # measured: 0 (bit-equal)


def test_lean_lora_with_adapters_disabled_decodes_the_base_model() -> None:
    model = _lora("llama")
    base = ARCHITECTURES["llama"]()
    ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
    with torch.inference_mode(), model.disable_adapter():
        _, ours = start_decoding(model, ids, mask, positions, 2, 4, lean=True)
    with torch.inference_mode():
        _, reference = start_decoding(base, ids, mask, positions, 2, 4, lean=True)
    assert torch.equal(ours, reference)


def test_lora_engine_paths_sample_the_same_rows() -> None:
    """Same generator: the same tokens and lengths from both decoders of a LoRA policy, log-probs
    to 1e-5 (the engine puts the model in eval mode, so LoRA's dropout is idle)."""
    model, tokenizer = _lora("qwen2").train(), _Tokenizer()
    sampling = SamplingConfig(max_new_tokens=12, samples_per_prompt=4, temperature=1.3)
    runs = {
        lean: TransformersEngine(model, tokenizer, lean_decode=lean).generate(
            _prompts(), sampling, generator=torch.Generator().manual_seed(3)
        )
        for lean in (True, False)
    }
    assert model.training  # restored after generation
    lean, plain = runs[True], runs[False]
    assert int(lean.response_lengths.min()) < 12  # EOS compaction exercised
    assert torch.equal(lean.input_ids, plain.input_ids)
    assert torch.equal(lean.response_lengths, plain.response_lengths)
    assert torch.allclose(lean.behaviour_logprobs, plain.behaviour_logprobs, atol=1e-5, rtol=0)


UNSUPPORTED_LORA = {
    "dropout active": (lambda: _lora("llama").train(), "has dropout active"),
    "DoRA": (lambda: _lora("llama", use_dora=True), "is a variant"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED_LORA))
def test_lora_states_the_lean_decoder_cannot_reproduce_are_named(case) -> None:
    build, reason = UNSUPPORTED_LORA[case]
    assert reason in (lean_decode_support(build(), 5 + 12) or "")


def test_a_dora_policy_is_decoded_by_its_own_forward() -> None:
    ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
    with torch.inference_mode():
        decoder, _ = start_decoding(_lora("llama", use_dora=True), ids, mask, positions, 2, 4)
    assert isinstance(decoder, DynamicCacheDecoder)
