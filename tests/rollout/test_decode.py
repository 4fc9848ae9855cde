"""The lean static-cache decode step against the model's own forward (rollout/decode.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from alignkit.ops import sequence_logprobs
from alignkit.rollout import Prompt, SamplingConfig, TransformersEngine
from alignkit.rollout.decode import (
    DynamicCacheDecoder,
    StaticCacheDecoder,
    lean_decode_support,
    start_decoding,
)
from alignkit.rollout.engine import pad_prompts

VOCAB, PAD, EOS = 12, 0, 1


class _Tokenizer:
    pad_token_id, eos_token_id = PAD, EOS

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(i) for i in row if i not in (PAD, EOS)) for row in rows]


_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=PAD,
    eos_token_id=EOS,
    bos_token_id=2,
)


def _build(cls, config, dtype=torch.float32) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
        with torch.no_grad():  # non-zero biases and sharper logits than the default init
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
            model.lm_head.weight.mul_(20)
    return model.to(dtype).eval()


ARCHITECTURES = {
    # multi-head attention, no biases
    "llama": lambda: _build(LlamaForCausalLM, LlamaConfig(**_COMMON, num_key_value_heads=4)),
    # grouped-query attention (2 query heads per key/value head) with q/k/v biases
    "qwen2": lambda: _build(Qwen2ForCausalLM, Qwen2Config(**_COMMON, num_key_value_heads=2)),
    # grouped-query attention, a sliding window longer than every sequence here
    "mistral": lambda: _build(
        MistralForCausalLM, MistralConfig(**_COMMON, num_key_value_heads=1, sliding_window=32)
    ),
}


def _prompts() -> list[Prompt]:
    # Left padding of 0, 3 and 4 columns.
    return [Prompt("a", [2, 3, 4, 5, 6], {}), Prompt("b", [7, 8], {}), Prompt("c", [9], {})]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lean_step_logits_equal_the_model_forward(arch) -> None:
    model = ARCHITECTURES[arch]()
    ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
    tokens = torch.randint(2, VOCAB, (9, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lean, lean_logits = start_decoding(model, ids, mask, positions, 3, 7, lean=True)
        plain, plain_logits = start_decoding(model, ids, mask, positions, 3, 7, lean=False)
        assert isinstance(lean, StaticCacheDecoder)
        assert isinstance(plain, DynamicCacheDecoder)
        worst = float((lean_logits - plain_logits).abs().max())  # the prefill
        for step in range(6):
            if step == 3:  # rows 1, 4 and 8 leave the batch
                keep = torch.tensor([0, 2, 3, 5, 6, 7])
                lean.select(keep)
                plain.select(keep)
                tokens = tokens[keep]
            a, b = lean.step(tokens[:, step]), plain.step(tokens[:, step])
            assert a.shape == b.shape == (tokens.shape[0], VOCAB)
            worst = max(worst, float((a - b).abs().max()))
        with pytest.raises(RuntimeError, match="preallocated cache has 11 slots"):
            lean.step(tokens[:, 0])  # 5 prompt columns + 7 - 1 generated: full
    assert worst < 1e-5


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lean_and_transformers_paths_sample_the_same_rows(arch) -> None:
    """Same generator, same tokens and lengths (rows finish early: EOS), log-probs to 1e-5,
    and both equal a re-scoring forward."""
    model, tokenizer = ARCHITECTURES[arch](), _Tokenizer()
    sampling = SamplingConfig(max_new_tokens=12, samples_per_prompt=4, temperature=1.3)
    runs = {
        lean: TransformersEngine(model, tokenizer, lean_decode=lean).generate(
            _prompts(), sampling, generator=torch.Generator().manual_seed(3)
        )
        for lean in (True, False)
    }
    lean, plain = runs[True], runs[False]
    assert lean_decode_support(model, lean.prompt_width + 12) is None
    lengths = lean.response_lengths
    assert int(lengths.min()) < 12 and int(lengths.max()) == 12  # EOS compaction exercised
    assert torch.equal(lean.input_ids, plain.input_ids)
    assert torch.equal(lengths, plain.response_lengths)
    assert torch.allclose(lean.behaviour_logprobs, plain.behaviour_logprobs, atol=1e-5, rtol=0)
    positions = (lean.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(lean.input_ids, attention_mask=lean.attention_mask, position_ids=positions)
    rescored = sequence_logprobs(logits.logits / 1.3, lean.input_ids, lean.response_mask)
    assert torch.allclose(lean.behaviour_logprobs, rescored, atol=1e-5, rtol=0)


def test_lean_step_in_bfloat16_stays_close() -> None:
    model = ARCHITECTURES["qwen2"]().to(torch.bfloat16)
    ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
    with torch.inference_mode():
        lean, _ = start_decoding(model, ids, mask, positions, 2, 5, lean=True)
        plain, _ = start_decoding(model, ids, mask, positions, 2, 5, lean=False)
        tokens = torch.full((6,), 5)
        for _ in range(4):
            a, b = lean.step(tokens), plain.step(tokens)
            assert a.dtype == b.dtype == torch.bfloat16
            # bf16 has 8 mantissa bits: logits of size ~10 round in steps of 0.06
            assert float((a.float() - b.float()).abs().max()) <= 0.125


def _hooked() -> nn.Module:
    model = ARCHITECTURES["llama"]()
    model.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    return model


def _adapter_like() -> nn.Module:
    model = ARCHITECTURES["llama"]()

    class Wrapped(nn.Linear):
        pass

    old = model.model.layers[1].self_attn.q_proj
    model.model.layers[1].self_attn.q_proj = Wrapped(old.in_features, old.out_features, False)
    return model


def _dynamic_rope() -> nn.Module:
    config = LlamaConfig(**_COMMON, num_key_value_heads=4)
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    return _build(LlamaForCausalLM, config)


def _gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    return _build(GPT2LMHeadModel, config)


UNSUPPORTED = {
    "another architecture": (_gpt2, "GPT2LMHeadModel is not one of"),
    "a forward hook": (_hooked, "a hook on LlamaMLP"),
    "an nn.Linear subclass": (_adapter_like, "not a plain nn.Linear"),
    "dynamic RoPE": (_dynamic_rope, "rope type 'dynamic'"),
    "a short sliding window": (
        lambda: _build(
            MistralForCausalLM, MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=8)
        ),
        "sliding window of 8 < 17 tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_models_take_the_transformers_path(case) -> None:
    build, reason = UNSUPPORTED[case]
    model = build()
    assert reason in (lean_decode_support(model, 5 + 12) or "")
    ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
    with torch.inference_mode():
        decoder, _ = start_decoding(model, ids, mask, positions, 2, 12, lean=True)
    assert isinstance(decoder, DynamicCacheDecoder)
    exp = TransformersEngine(model, _Tokenizer()).generate(
        _prompts(),
        SamplingConfig(max_new_tokens=12, samples_per_prompt=2),
        generator=torch.Generator().manual_seed(1),
    )
    assert exp.input_ids.shape[0] == 6 and bool((exp.response_lengths >= 1).all())
