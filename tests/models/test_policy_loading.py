"""Name resolution, clear errors for missing models, pad tokens, and policy save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.errors import ConfigError, ModelError
from alignkit.models import (
    ensure_pad_token,
    load_policy,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
    save_model,
)
from alignkit.models.fetch import SOURCE_FILE, cached_models


def _fake_fetched(cache: Path, name: str) -> Path:
    """Put a (tiny) model into the cache the way fetch_model leaves one."""
    model, tokenizer = load_policy("tiny", seed=5)
    target = save_model(model, tokenizer, cache / "models" / name)
    (target / SOURCE_FILE).write_text(json.dumps({"name": name}))
    return target


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(["How do I bake bread?", "Hi there"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_tiny_resolves_to_the_preset_first(fake_cache: Path) -> None:
    _fake_fetched(fake_cache, "tiny")  # a cached model may not shadow the preset
    assert resolve_model("tiny").kind == "preset"


def test_fetched_model_name_loads_from_the_cache(fake_cache: Path) -> None:
    target = _fake_fetched(fake_cache, "smollm2-135m-instruct")
    resolved = resolve_model("smollm2-135m-instruct")
    assert (resolved.kind, resolved.path) == ("cache", target)
    model, _ = load_policy("smollm2-135m-instruct")
    reference, _ = load_policy("tiny", seed=5)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert cached_models() == ["smollm2-135m-instruct"]


def test_half_written_cache_entry_is_not_a_fetched_model(fake_cache: Path) -> None:
    target = _fake_fetched(fake_cache, "smollm2-135m-instruct")
    (target / SOURCE_FILE).unlink()
    with pytest.raises(ModelError, match="has not been fetched"):
        resolve_model("smollm2-135m-instruct")


def test_unfetched_known_model_says_how_to_fetch_it(fake_cache: Path) -> None:
    with pytest.raises(ModelError) as err:
        load_policy("smollm2-135m-instruct")
    message = str(err.value)
    assert "alignkit models fetch smollm2-135m-instruct" in message
    assert str(fake_cache / "models") in message


def test_missing_directory_is_named(tmp_path: Path, fake_cache: Path) -> None:
    missing = tmp_path / "runs" / "nothing-here"
    with pytest.raises(ModelError, match=f"not found: {missing}"):
        load_policy(str(missing))


def test_uncached_hub_id_names_it_and_does_not_download(fake_cache: Path) -> None:
    with pytest.raises(ModelError) as err:
        load_policy("no-such-org/no-such-model-xyz")
    message = str(err.value)
    assert "'no-such-org/no-such-model-xyz'" in message
    assert "never downloads" in message and "local directory" in message


def test_unknown_plain_name_lists_the_valid_names(fake_cache: Path) -> None:
    with pytest.raises(ModelError, match=r"unknown model 'tinny'.*tiny, smollm2-135m-instruct"):
        load_tokenizer("tinny")


def test_directory_without_config_is_rejected(tmp_path: Path, fake_cache: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_policy(str(tmp_path / "weights"))


def test_tokenizer_without_pad_gets_eos_and_the_model_config_matches(tmp_path: Path) -> None:
    model, tokenizer = load_policy("tiny")
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    save_model(model, tokenizer, tmp_path / "nopad")
    reloaded, reloaded_tokenizer = load_policy(str(tmp_path / "nopad"))
    assert reloaded_tokenizer.pad_token == "<|eos|>"
    assert reloaded.config.pad_token_id == reloaded_tokenizer.eos_token_id


def test_tokenizer_with_neither_pad_nor_eos_is_a_model_error() -> None:
    tokenizer = load_tokenizer("tiny")
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ModelError, match="neither a pad nor an eos"):
        ensure_pad_token(tokenizer)


def test_policy_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, tokenizer = load_policy("tiny", seed=11)
    out = save_model(model, tokenizer, tmp_path / "policy")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded, reloaded_tokenizer = load_policy(str(out))
    assert resolve_model(str(out)).kind == "directory"
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert torch.equal(_logits(reloaded, reloaded_tokenizer), _logits(model, tokenizer))


def test_dtype_names_and_errors() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    model, _ = load_policy("tiny", dtype="auto")
    assert next(model.parameters()).dtype is torch.float32
