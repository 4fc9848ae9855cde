"""LoRA through peft: only the adapter trains, and the disabled adapter is the reference model."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.errors import ConfigError
from alignkit.models import (
    LoraSettings,
    disabled_adapter,
    has_adapter,
    load_policy,
    load_reward_model,
    save_model,
)


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(["How do I bake bread?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _perturb_adapter(model: torch.nn.Module) -> None:
    # lora_B starts at zero (the adapter is a no-op); make it matter, as training would.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


def test_lora_policy_has_an_adapter_and_only_it_is_trainable() -> None:
    model, _ = load_policy("tiny", lora={"r": 4, "alpha": 8})
    assert has_adapter(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in name for name in frozen)
    assert not has_adapter(load_policy("tiny")[0])


def test_disabled_adapter_reproduces_the_base_model_exactly() -> None:
    base, tokenizer = load_policy("tiny", seed=2)
    expected = _logits(base, tokenizer)
    model, _ = load_policy("tiny", seed=2, lora=LoraSettings(r=4, alpha=8))
    _perturb_adapter(model)
    assert not torch.allclose(_logits(model, tokenizer), expected)
    with disabled_adapter(model) as reference:
        assert torch.equal(_logits(reference, tokenizer), expected)
    assert not torch.allclose(_logits(model, tokenizer), expected)  # adapter back on


def test_disabled_adapter_refuses_a_model_without_one() -> None:
    model, _ = load_policy("tiny")
    with pytest.raises(ValueError, match="has none"), disabled_adapter(model):
        pass


def test_lora_settings_from_a_dict_name_a_misspelt_key() -> None:
    assert LoraSettings.coerce({"r": 2, "target_modules": ["q_proj"]}) == LoraSettings(
        r=2, target_modules=("q_proj",)
    )
    with pytest.raises(ConfigError, match=r"unknown key 'lora\.alhpa'; did you mean 'alpha'"):
        load_policy("tiny", lora={"r": 2, "alhpa": 4})
    with pytest.raises(ConfigError, match=r"lora\.r must be a positive integer"):
        LoraSettings(r=0)


def test_target_modules_limit_where_adapters_go() -> None:
    model, _ = load_policy("tiny", lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[1]
        for n, _ in model.named_parameters()
        if "lora_A" in n
    }
    assert adapted == {"q_proj", "v_proj"}


def test_all_linear_in_a_list_is_the_shorthand_not_a_module_name() -> None:
    # peft takes 'all-linear' only as the whole value; ['all-linear'] finds no module
    assert LoraSettings(target_modules=["all-linear"]).target_modules == "all-linear"
    model, _ = load_policy("tiny", lora={"r": 2, "target_modules": ["all-linear"]})
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert {n.split(".lora_A")[0].rsplit(".", 1)[1] for n in names} >= {"q_proj", "down_proj"}
    with pytest.raises(ConfigError, match="'all-linear' already covers every linear layer"):
        LoraSettings(target_modules=("all-linear", "q_proj"))


def test_reward_model_on_a_lora_policy_folds_the_adapter_in(tmp_path: Path) -> None:
    model, tokenizer = load_policy("tiny", seed=4, lora={"r": 2, "target_modules": ["q_proj"]})
    _perturb_adapter(model)
    out = save_model(model, tokenizer, tmp_path / "lora-sft")
    reward_model, _ = load_reward_model(str(out))
    merged = copy.deepcopy(model).merge_and_unload()
    q_proj = reward_model.backbone.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q_proj, merged.model.layers[0].self_attn.q_proj.weight)
    base_q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(q_proj, base_q_proj)


def test_adapter_initialisation_follows_the_seed() -> None:
    def lora_a(seed: int) -> torch.Tensor:
        model, _ = load_policy("tiny", lora={"r": 2}, seed=seed)
        return next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.equal(lora_a(1), lora_a(2))


def test_saved_lora_policy_reloads_with_its_adapter(tmp_path: Path) -> None:
    model, tokenizer = load_policy("tiny", seed=3, lora={"r": 4, "alpha": 8})
    _perturb_adapter(model)
    expected = _logits(model, tokenizer)
    with disabled_adapter(model):
        expected_base = _logits(model, tokenizer)

    out = save_model(model, tokenizer, tmp_path / "lora")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    reloaded, reloaded_tokenizer = load_policy(str(out))
    assert has_adapter(reloaded)
    assert torch.equal(_logits(reloaded, reloaded_tokenizer), expected)
    with disabled_adapter(reloaded):
        assert torch.equal(_logits(reloaded, reloaded_tokenizer), expected_base)
    with pytest.raises(ConfigError, match="r=4, alpha=8"):
        load_policy(str(out), lora={"r": 8})

    # Plain transformers sees the base model only (the adapter is in a subdirectory).
    base_only = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in base_only.state_dict())
    assert torch.equal(_logits(base_only, tokenizer), expected_base)

    # A bare adapter directory finds its base through adapter_config.json.
    bare = shutil.copytree(out / "adapter", tmp_path / "bare-adapter")
    from_bare, _ = load_policy(str(bare))
    assert torch.equal(_logits(from_bare, tokenizer), expected)

    merged_dir = save_model(model, tokenizer, tmp_path / "merged", merge_adapter=True)
    merged, _ = load_policy(str(merged_dir))
    assert not has_adapter(merged) and has_adapter(model)
    assert torch.allclose(_logits(merged, tokenizer), expected, atol=1e-5)
