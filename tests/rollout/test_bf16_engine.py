"""The decode loop under bf16 autocast: the lean decoder, the engine and the teacher proposal.

A trainer with ``precision: bf16`` calls ``generate`` inside its autocast. The lean decoder then
casts its weights to bfloat16 once and keeps a bfloat16 cache, doing what the model's own
forward does under autocast (measured: bit-identical logits on these models); the sampler
upcasts the bfloat16 logits (``ops.sampling``), so behaviour log-probs are float32.
"""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import TinyVocabTokenizer, tiny_llama
from test_decode import ARCHITECTURES, PAD, _prompts, _Tokenizer

from alignkit.ops import sequence_logprobs
from alignkit.rollout import Prompt, SamplingConfig, TransformersEngine
from alignkit.rollout.decode import StaticCacheDecoder, matmul_dtype, start_decoding
from alignkit.rollout.engine import pad_prompts
from alignkit.rollout.teacher import TeacherGuidedEngine


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lean_decoder_under_autocast_matches_the_model_forward_under_autocast(arch) -> None:
    model = ARCHITECTURES[arch]()
    ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
    tokens = torch.randint(2, 12, (9, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), bf16():
        lean, lean_logits = start_decoding(model, ids, mask, positions, 3, 6, lean=True)
        plain, plain_logits = start_decoding(model, ids, mask, positions, 3, 6, lean=False)
        assert isinstance(lean, StaticCacheDecoder) and lean.dtype == torch.bfloat16
        # The cache and the cast weights are bfloat16, the norms' weights stay float32.
        assert lean.keys.dtype == lean.values.dtype == torch.bfloat16
        assert lean.layers[0].q.weight.dtype == lean.lm_head.weight.dtype == torch.bfloat16
        assert lean.layers[0].input_norm.weight.dtype == torch.float32
        pairs = [(lean_logits, plain_logits)]
        for step in range(5):
            pairs.append((lean.step(tokens[:, step]), plain.step(tokens[:, step])))
    for a, b in pairs:
        assert a.dtype == b.dtype == torch.bfloat16
        # Measured: identical. One bf16 step of a logit of size 4-8 is 1/32.
        assert float((a.float() - b.float()).abs().max()) <= 1 / 32


def test_matmul_dtype_follows_autocast_for_float32_weights_only() -> None:
    weight = torch.zeros(2, 2)
    assert matmul_dtype(weight) == torch.float32
    with bf16():
        assert matmul_dtype(weight) == torch.bfloat16
        assert matmul_dtype(weight.half()) == torch.float16  # weights' own dtype wins
    with torch.inference_mode():
        model = ARCHITECTURES["llama"]()
        ids, mask, positions = pad_prompts(_prompts(), PAD, torch.device("cpu"))
        decoder, logits = start_decoding(model, ids, mask, positions, 1, 3)
    assert decoder.keys.dtype == logits.dtype == torch.float32  # no autocast: as before


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_engine_in_bf16_lean_and_transformers_paths_sample_the_same_rows(arch) -> None:
    model, tokenizer = ARCHITECTURES[arch](), _Tokenizer()
    sampling = SamplingConfig(max_new_tokens=12, samples_per_prompt=4, temperature=1.3)
    runs = {}
    for lean in (True, False):
        with bf16():
            runs[lean] = TransformersEngine(model, tokenizer, lean_decode=lean).generate(
                _prompts(), sampling, generator=torch.Generator().manual_seed(3)
            )
    lean, plain = runs[True], runs[False]
    assert lean.behaviour_logprobs.dtype == torch.float32
    assert torch.equal(lean.input_ids, plain.input_ids)
    torch.testing.assert_close(lean.behaviour_logprobs, plain.behaviour_logprobs, rtol=0, atol=1e-5)
    # They are log softmax(z / T) of the model's bf16 logits, taken in float32.
    positions = (lean.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), bf16():
        logits = model(lean.input_ids, attention_mask=lean.attention_mask, position_ids=positions)
    assert logits.logits.dtype == torch.bfloat16
    rescored = sequence_logprobs(logits.logits / 1.3, lean.input_ids, lean.response_mask)
    gap = (lean.behaviour_logprobs - rescored)[lean.response_mask].abs()
    assert float(gap.max()) < 0.1  # bf16 logits in another layout; measured 0 on these


def test_teacher_proposal_decodes_both_models_in_bf16() -> None:
    prompts = [Prompt("a", [2, 3, 4, 5], {}), Prompt("b", [6, 7], {})]
    policy, teacher = tiny_llama(8, 1, 16, 40.0), tiny_llama(8, 7, 32, 60.0)
    tokenizer = TinyVocabTokenizer(8)
    sampling = SamplingConfig(max_new_tokens=6, samples_per_prompt=3)
    runs = {}
    for lean in (True, False):
        engine = TeacherGuidedEngine(policy, teacher, tokenizer, lean_decode=lean)
        with bf16():
            runs[lean] = engine.generate(
                prompts, sampling, generator=torch.Generator().manual_seed(0)
            )
        assert 0.0 <= engine.stats()["sampling/alpha_mean"] <= 1.0
    assert torch.equal(runs[True].input_ids, runs[False].input_ids)
    torch.testing.assert_close(
        runs[True].behaviour_logprobs, runs[False].behaviour_logprobs, rtol=0, atol=1e-5
    )
    with torch.inference_mode(), bf16():
        ids, mask, positions = pad_prompts(prompts, PAD, torch.device("cpu"))
        decoder, _ = start_decoding(teacher, ids, mask, positions, 3, 6)
    assert decoder.keys.dtype == torch.bfloat16
