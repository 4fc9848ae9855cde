"""The built-in tiny preset: deterministic weights, documented size, bundled tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import alignkit.models
from alignkit.data.synthetic import corpus
from alignkit.models import load_policy, load_tokenizer, tiny
from alignkit.models.tiny import TINY_NUM_PARAMETERS, TINY_TOKENIZER_DIR, write_tiny_tokenizer


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_weights_and_other_seed_does_not() -> None:
    first, _ = load_policy("tiny", seed=3)
    again, _ = load_policy("tiny", seed=3)
    other, _ = load_policy("tiny", seed=4)
    a, b, c = _weights(first), _weights(again), _weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_seeding_the_preset_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_policy("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_parameter_count_is_the_documented_one() -> None:
    model, tokenizer = load_policy("tiny")
    assert sum(p.numel() for p in model.parameters()) == TINY_NUM_PARAMETERS == 166_208
    assert len(tokenizer) == model.config.vocab_size == 1024
    # The number users read is the number the model has.
    assert "166,208 parameters" in tiny.__doc__
    assert "166,208 parameters" in alignkit.models.__doc__
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.tie_word_embeddings and config.max_position_embeddings == 256


def test_tokenizer_round_trips_the_synthetic_corpus_exactly() -> None:
    tokenizer = load_tokenizer("tiny")
    texts = corpus()
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    assert tokenizer.batch_decode(encoded) == texts
    # Text the corpus never had still round-trips (byte-level BPE has no unknown token).
    odd = "Tabs\tand  double  spaces, ünïcödé & emoji 😀 -- 1234.5\n"
    assert tokenizer.decode(tokenizer(odd)["input_ids"]) == odd


def test_tokenizer_has_pad_eos_and_a_prefix_consistent_chat_template() -> None:
    tokenizer = load_tokenizer("tiny")
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|eos|>" and tokenizer.eos_token_id != tokenizer.pad_token_id
    chat = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour and water."},
    ]
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert full == (
        "<|system|>\nBe kind.\n<|user|>\nHow do I bake bread?\n<|assistant|>\nMix flour and water."
        "<|eos|>"
    )
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and prompt.endswith("<|assistant|>\n")
    # Role markers are single special tokens, not spelled out in bytes.
    assert tokenizer(prompt)["input_ids"].count(tokenizer.convert_tokens_to_ids("<|user|>")) == 1


def test_regenerating_the_tokenizer_gives_identical_files(tmp_path: Path) -> None:
    out = write_tiny_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in TINY_TOKENIZER_DIR.iterdir()
    )


def test_bundled_tokenizer_is_small() -> None:
    assert sum(p.stat().st_size for p in TINY_TOKENIZER_DIR.iterdir()) < 200_000


def test_tiny_policy_runs_and_generates() -> None:
    model, tokenizer = load_policy("tiny")
    batch = tokenizer(["How do I bake bread?", "Hi"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 1024)
    prompt = tokenizer(["Hi"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16])
def test_tiny_policy_in_bfloat16(dtype: str | torch.dtype) -> None:
    model, _ = load_policy("tiny", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
