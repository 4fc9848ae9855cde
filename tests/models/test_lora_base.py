"""A LoRA adapter saved on its own (as a checkpoint saves it) finds its base from anywhere.

The adapter records its base: an absolute path plus a digest of the base weights for a
directory, the preset's name plus its seed for ``tiny``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from alignkit.errors import ModelError
from alignkit.models import has_adapter, load_policy
from alignkit.models.fetch import SOURCE_FILE
from alignkit.models.loading import BASE_RECORD
from alignkit.tracking.checkpoint import save_model_weights


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(["How do I bake bread?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    return model


def test_a_tiny_based_adapter_trained_with_seed_3_reloads_onto_the_seed_3_base(tmp_path):
    model, tokenizer = load_policy("tiny", seed=3, lora={"r": 4})
    expected = logits(perturbed(model), tokenizer)
    save_model_weights(model, tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / BASE_RECORD).read_text())
    assert (record["base"], record["seed"]) == ("tiny", 3)

    reloaded, _ = load_policy(tmp_path / "adapter")  # the caller's seed (0) is not the base's
    assert has_adapter(reloaded)
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, rtol=0, atol=0)
    # The seed-0 base gives other logits: the check above can tell the two apart.
    seed0, _ = load_policy("tiny", seed=0)
    assert (logits(seed0, tokenizer) - expected).abs().max() > 0.1


def test_an_adapter_on_a_relative_base_path_loads_from_another_directory(tmp_path, monkeypatch):
    base, tokenizer = load_policy("tiny", seed=1)
    work = tmp_path / "project"
    work.mkdir()
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    monkeypatch.chdir(work)
    model, tokenizer = load_policy("base", lora={"r": 4})  # a relative path, as in a config
    expected = logits(perturbed(model), tokenizer)
    save_model_weights(model, work / "ckpt")
    assert json.loads((work / "ckpt" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(work / "base")

    monkeypatch.chdir(tmp_path)  # elsewhere: "base" means nothing here
    reloaded, reloaded_tokenizer = load_policy(work / "ckpt")
    torch.testing.assert_close(logits(reloaded, reloaded_tokenizer), expected, rtol=0, atol=0)


def test_a_changed_base_behind_the_recorded_path_is_refused(tmp_path):
    base, tokenizer = load_policy("tiny", seed=1)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, _ = load_policy(tmp_path / "base", lora={"r": 4})
    save_model_weights(perturbed(model), tmp_path / "ckpt")
    other, _ = load_policy("tiny", seed=2)
    other.save_pretrained(tmp_path / "base")  # retrained behind the same path
    with pytest.raises(ModelError, match=r"base model .*base has changed since"):
        load_policy(tmp_path / "ckpt")


def test_an_adapter_on_a_fetched_model_names_a_base_peft_loads_without_alignkit(
    tmp_path, fake_cache
):
    # A fetched model is known to alignkit by its alias; peft recorded that alias, which
    # neither peft nor transformers can load (offline: "couldn't connect to huggingface.co").
    base, tokenizer = load_policy("tiny", seed=1)
    cached = fake_cache / "models" / "smollm2-135m-instruct"
    base.save_pretrained(cached)
    tokenizer.save_pretrained(cached)
    (cached / SOURCE_FILE).write_text("{}")
    model, tokenizer = load_policy("smollm2-135m-instruct", lora={"r": 4})
    expected = logits(perturbed(model), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft looked up the alias on the hub and warned
        save_model_weights(model, tmp_path / "ckpt")

    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(cached.resolve())
    record = json.loads((tmp_path / "ckpt" / BASE_RECORD).read_text())
    assert record["base"] == "smollm2-135m-instruct"  # the alias, kept in alignkit's note

    from peft import AutoPeftModelForCausalLM

    plain = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(logits(plain, tokenizer), expected, rtol=0, atol=0)
    reloaded, _ = load_policy(tmp_path / "ckpt")
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, rtol=0, atol=0)
    # re-saved after a reload, the base stays loadable
    save_model_weights(reloaded, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(cached.resolve())
