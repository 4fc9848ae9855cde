"""Load and save policies and tokenizers; resolve a model name to where its files are.

A model name resolves, in this order, to:

1. the built-in preset ``tiny`` (see ``alignkit.models.tiny``);
2. a model fetched into the alignkit cache, e.g. ``smollm2-135m-instruct``
   (``<cache>/models/<name>``, see ``alignkit.models.fetch``);
3. a local directory in Hugging Face format (``config.json`` + weights), or a directory with a
   saved LoRA adapter; a run directory (or one of its checkpoints) means the model of its best
   or final checkpoint (:func:`resolve_run_model`);
4. a Hugging Face hub id, *only* if it is already in the local Hugging Face cache: alignkit never
   downloads from the hub, and says what is missing instead.

Pad token: a tokenizer without one gets its eos token as pad (``alignkit.models.pad_token``, whose
:func:`ensure_pad_token` is importable from here too). Chat templates are kept as the tokenizer
ships them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignkit.errors import ConfigError, ModelError
from alignkit.models import fetch
from alignkit.models.lora import LoraSettings, apply_lora, has_adapter, require_peft
from alignkit.models.pad_token import ensure_pad_token
from alignkit.models.tiny import PRESETS, TINY_NAME, build_tiny_model, load_tiny_tokenizer
from alignkit.models.wrappers import unwrap_model
from alignkit.tracking.checkpoint import register_save_hook, run_checkpoint
from alignkit.tracking.io import atomic_write_text

logger = logging.getLogger("alignkit.models")

DTypeLike = str | torch.dtype
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SUBDIR = "adapter"
#: Written next to a saved adapter: its base as a name that resolves from anywhere.
BASE_RECORD = "alignkit_base.json"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points. ``location`` is a directory, or the hub id for ``hub``."""

    kind: Literal["preset", "cache", "directory", "adapter", "hub"]
    name: str
    location: str

    @property
    def path(self) -> Path | None:
        return None if self.kind in ("preset", "hub") else Path(self.location)


def resolve_dtype(dtype: DTypeLike) -> torch.dtype | Literal["auto"]:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or fp32/bf16/fp16), a torch dtype, or ``"auto"``
    (the dtype stored in the model's config; float32 for the tiny preset)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")


def _could_be_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_cached(hub_id: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def _missing_model_error(name: str) -> ModelError:
    root = fetch.models_dir()
    if name in fetch.KNOWN_MODELS:
        return ModelError(
            f"model '{name}' has not been fetched yet (looked in {root}); get it with "
            f"{fetch.fetch_hint(name)}, or set ALIGNKIT_CACHE to the cache it was fetched into"
        )
    cached = fetch.cached_models()
    known = [TINY_NAME, *fetch.KNOWN_MODELS]
    where = f"not the preset '{TINY_NAME}', not a fetched model in {root}"
    if _could_be_hub_id(name):
        return ModelError(
            f"model '{name}': {where}, not a local directory, and not in the local Hugging Face "
            "cache; alignkit never downloads from the hub. Download it on a machine with network "
            f"(`hf download {name}`) into the Hugging Face cache, or pass a local directory"
        )
    if "/" in name or name.startswith((".", "~")):
        return ModelError(f"model directory not found: {name}")
    return ModelError(
        f"unknown model '{name}': {where}, and no directory of that name exists. Model names: "
        f"{', '.join(known)}" + (f"; fetched: {', '.join(cached)}" if cached else "")
    )


def resolve_run_model(name_or_path: str | Path) -> tuple[str, str | None]:
    """A run directory (``alignkit train ...``'s, or one of its ``checkpoints/step-N``) as the
    model folder of the checkpoint it stands for (``tracking.run_checkpoint``: its best, else
    its final), with a sentence saying so; anything else as it is, with None."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir() or (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file():
        return str(name_or_path), None
    checkpoint, which = path, "checkpoint"
    if (path / "checkpoints").is_dir():
        found = run_checkpoint(path)
        if found is None:
            raise ModelError(f"{path} is a run directory without a complete checkpoint yet")
        checkpoint, which = found
    if not (checkpoint / "model").is_dir():
        return str(name_or_path), None
    model_dir = checkpoint / "model"
    return str(model_dir), f"{name_or_path}: using its {which}, {model_dir}"


_SAID: set[str] = set()


def model_of_run(name_or_path: str | Path) -> str:
    """:func:`resolve_run_model`'s path, its sentence said once on the ``alignkit.models``
    logger."""
    path, note = resolve_run_model(name_or_path)
    if note is not None and note not in _SAID:
        _SAID.add(note)
        logger.warning(note)
    return path


def resolve_model(name_or_path: str | Path) -> ResolvedModel:
    """Resolve a model name or path (order in the module docstring), or raise ModelError. A
    run directory stands for its best or final checkpoint's model (:func:`model_of_run`)."""
    name = model_of_run(name_or_path)
    if name in PRESETS:
        return ResolvedModel("preset", name, name)
    cached = fetch.cached_model_path(name) if "/" not in name else None
    if cached is not None:
        return ResolvedModel("cache", name, str(cached))
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel("directory", name, str(path))
        if (path / ADAPTER_CONFIG).is_file():
            return ResolvedModel("adapter", name, str(path))
        raise ModelError(
            f"{path} is not a Hugging Face model directory: it has no config.json "
            f"(nor {ADAPTER_CONFIG} for a LoRA adapter)"
        )
    if path.exists():
        raise ModelError(f"{path} is a file; a model is a directory with config.json")
    if _could_be_hub_id(name) and _hub_cached(name):
        return ResolvedModel("hub", name, name)
    raise _missing_model_error(name)


def _adapter_base(adapter_dir: Path) -> str:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG} does not name its base model")
    return base


def tokenizer_for(resolved: ResolvedModel) -> PreTrainedTokenizerBase:
    """The tokenizer stored with a resolved model, as saved (no pad token added)."""
    from transformers import AutoTokenizer

    if resolved.kind == "preset":
        return load_tiny_tokenizer()
    if (
        resolved.kind == "adapter"
        and not (Path(resolved.location) / "tokenizer_config.json").is_file()
    ):
        return tokenizer_for(resolve_model(_adapter_base(Path(resolved.location))))
    try:
        return AutoTokenizer.from_pretrained(resolved.location, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load a tokenizer from {resolved.location}: {err}") from None


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name or path, with a pad token (see module docstring)."""
    return ensure_pad_token(tokenizer_for(resolve_model(name_or_path)))


def load_pretrained(auto_class: Any, location: str, dtype: torch.dtype | str) -> PreTrainedModel:
    """``auto_class.from_pretrained`` offline, with loading problems raised as ModelError."""
    from transformers.utils import logging as transformers_logging

    # A local load takes about a second; transformers' per-tensor bar would only add noise
    # between our own progress bars.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return auto_class.from_pretrained(location, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load a model from {location}: {err}") from None
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def lora_adapter_dir(resolved: ResolvedModel) -> Path | None:
    """The saved LoRA adapter of a resolved model, if it has one.

    Either a bare peft adapter directory, or ``<dir>/adapter/`` next to the base weights (the
    layout ``save_model`` writes; a subdirectory because transformers would otherwise load a
    top-level adapter into the base model on its own).
    """
    if resolved.kind == "adapter":
        return Path(resolved.location)
    path = resolved.path
    if path is not None and (path / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file():
        return path / ADAPTER_SUBDIR
    return None


def _load_with_adapter(
    resolved: ResolvedModel, adapter_dir: Path, dtype: Any, lora: LoraSettings | None, seed: int
) -> nn.Module:
    peft = require_peft()
    saved = peft.PeftConfig.from_pretrained(str(adapter_dir))
    if lora is not None and (lora.r, lora.alpha) != (saved.r, saved.lora_alpha):
        raise ConfigError(
            f"{adapter_dir} holds a LoRA adapter with r={saved.r}, alpha={saved.lora_alpha}, "
            f"but lora asks for r={lora.r}, alpha={lora.alpha}"
        )
    # A bare adapter names its base (alignkit's record first: absolute, with the preset's
    # seed), resolved like any other model name; a save_model directory is its own base.
    record = _read_base_record(adapter_dir) if resolved.kind == "adapter" else {}
    if resolved.kind == "adapter":
        base_source = resolve_model(record.get("base") or _adapter_base(adapter_dir))
    else:
        base_source = resolved
    if base_source.kind == "adapter":
        raise ModelError(f"{adapter_dir}: its base model is itself a bare adapter (not supported)")
    if base_source.kind == "preset":
        seed = int(record.get("seed", seed))
        base = build_tiny_model(
            load_tiny_tokenizer(), seed=seed, dtype=_preset_dtype(dtype), preset=base_source.name
        )
    else:
        from transformers import AutoModelForCausalLM

        base = load_pretrained(AutoModelForCausalLM, base_source.location, dtype)
    expected = record.get("weights_sha256")
    if expected and record.get("dtype") == str(base.dtype) and weights_digest(base) != expected:
        raise ModelError(
            f"{adapter_dir}: its base model {base_source.location} has changed since the "
            "adapter was trained (the weights digest differs); load the adapter onto the "
            "original base"
        )
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    model.alignkit_base = _base_identity(base_source, seed)
    _record_loadable_base(model, base_source)  # an older save may have recorded an alias
    return model


def _base_identity(resolved: ResolvedModel, seed: int) -> dict[str, Any]:
    """How a base model is found again from any directory: the preset and its seed, a
    fetched or hub name, or an absolute path."""
    if resolved.kind == "preset":
        return {"base": resolved.name, "seed": seed}
    if resolved.kind == "directory":
        return {"base": str(Path(resolved.location).resolve())}
    return {"base": resolved.name}


def _read_base_record(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / BASE_RECORD
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValueError):
        raise ModelError(f"{path} is not a JSON object") from None


def write_base_record(model: nn.Module, adapter_dir: Path) -> None:
    """Record a saved adapter's base next to it (see ``BASE_RECORD``), with a digest of the
    base weights so that a base retrained behind the same path is noticed."""
    model = unwrap_model(model)
    identity = getattr(model, "alignkit_base", None)
    if identity is None or not has_adapter(model):
        return  # not loaded by load_policy: peft's own base_model_name_or_path is all we have
    base_weights = _base_state_dict(model)
    record = {
        **identity,
        "dtype": str(next(iter(base_weights.values())).dtype),
        "weights_sha256": weights_digest(base_weights),
    }
    atomic_write_text(adapter_dir / BASE_RECORD, json.dumps(record, indent=2) + "\n")


register_save_hook(write_base_record)


def weights_digest(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes and bytes), LoRA adapters left out.

    Measured on one CPU thread: 1.1 s for 135M float32 weights (SmolLM2-135M's size).
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in state.items():
        if "lora_" in name:
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.data_ptr() in seen:
            continue  # a tied weight: its bytes are hashed once
        seen.add(tensor.data_ptr())
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


def _preset_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return torch.float32 if dtype == "auto" else dtype


def load_policy(
    name_or_path: str | Path,
    dtype: DTypeLike = "float32",
    lora: LoraSettings | dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by name or path (resolution in the module docstring).

    Args:
        name_or_path: ``"tiny"``, a fetched model name, a directory, or a cached hub id.
        dtype: ``"float32"``, ``"bfloat16"``, a ``torch.dtype``, or ``"auto"``.
        lora: LoRA settings (or a dict of them): the model comes back as a ``PeftModel`` with a
            fresh adapter, only the adapter trainable. A directory holding a saved adapter is
            reloaded with that adapter (trainable) whether or not ``lora`` is given.
        seed: initialises the tiny preset's weights and a fresh adapter, without touching the
            global random state.

    Returns:
        ``(model, tokenizer)``, the model in eval mode, the tokenizer with a pad token.
    """
    settings = LoraSettings.coerce(lora)
    torch_dtype = resolve_dtype(dtype)
    resolved = resolve_model(name_or_path)
    tokenizer = tokenizer_for(resolved)
    if resolved.kind == "preset":
        model = build_tiny_model(
            tokenizer, seed=seed, dtype=_preset_dtype(torch_dtype), preset=resolved.name
        )
    elif (adapter_dir := lora_adapter_dir(resolved)) is not None:
        model = _load_with_adapter(resolved, adapter_dir, torch_dtype, settings, seed)
        ensure_pad_token(tokenizer, model.get_base_model())
        return model.eval(), tokenizer
    else:
        from transformers import AutoModelForCausalLM

        model = load_pretrained(AutoModelForCausalLM, resolved.location, torch_dtype)
    ensure_pad_token(tokenizer, model)
    if settings is not None:
        model = apply_lora(model, settings, seed=seed)
        model.alignkit_base = _base_identity(resolved, seed)
        _record_loadable_base(model, resolved)
    return model.eval(), tokenizer


def _record_loadable_base(model: nn.Module, resolved: ResolvedModel) -> None:
    """Make peft record the base as a path or hub id that peft and transformers load without
    alignkit (``AutoPeftModelForCausalLM.from_pretrained(checkpoint)``): a fetched model's
    directory rather than its alias, an absolute path rather than a relative one. The alias
    stays in the adapter's ``alignkit_base.json``, which alignkit reads first."""
    if resolved.kind == "cache":
        base = str(Path(resolved.location).resolve())
    else:
        base = _base_identity(resolved, 0)["base"]
    for config in model.peft_config.values():
        config.base_model_name_or_path = base


def _base_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under their original names (adapter weights left out)."""
    state = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def save_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    merge_adapter: bool = False,
) -> Path:
    """Save a policy (and tokenizer) in Hugging Face format with safetensors weights.

    A LoRA model is saved self-contained: the base weights (``config.json``,
    ``model.safetensors``) plus the adapter in ``adapter/`` (``adapter_config.json``,
    ``adapter_model.safetensors``), and ``load_policy(out_dir)`` restores both. With
    ``merge_adapter=True`` the adapter is folded into the weights instead and a plain model is
    written (the live model is left untouched).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap_model(model)
    if has_adapter(model):
        if merge_adapter:
            copy.deepcopy(model).merge_and_unload().save_pretrained(out)
        else:
            model.get_base_model().save_pretrained(out, state_dict=_base_state_dict(model))
            # The adapter's base is the weights just written (peft reads its config from there);
            # the live model keeps its own record.
            configs = list(model.peft_config.values())
            bases = [config.base_model_name_or_path for config in configs]
            try:
                for config in configs:
                    config.base_model_name_or_path = str(out.resolve())
                model.save_pretrained(out / ADAPTER_SUBDIR)
            finally:
                for config, base in zip(configs, bases, strict=True):
                    config.base_model_name_or_path = base
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
