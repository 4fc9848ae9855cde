"""Reward, cost and value models: a transformers backbone plus a scalar head (seed 002 §4.3.2).

``RewardModel`` = backbone (``AutoModel``: no LM head) -> pooling over the real tokens
(``last``, ``mean``, ``max``, ``cls``, ``attention``; see ``alignkit.models.pooling``) -> head
(``linear`` or ``mlp``) -> one reward per sequence. Optional auxiliary heads read the same
pooled vector: ``helpfulness`` (a regression prediction) and ``safety`` (the logit that the
response is *safe*, label 1 = safe as in ``is_response_0_safe``), trained with
``alignkit.ops.preference.multitask_reward_loss`` (seed 002 §4.3.4).

A cost model is the same class with ``kind="cost"``. Sign convention (Safe RLHF): cost > 0 means
unsafe, cost < 0 safe; pairwise, the less safe response is the one with the higher cost.

``forward(..., return_token_values=True)`` also returns the head applied at every position
(``token_values [B, T]``, 0 at pad positions): that is a value model for PPO.

Saved layout (``save_pretrained``): the backbone in Hugging Face format (``config.json``,
``model.safetensors``), the head weights in ``reward_head.safetensors``, and
``alignkit_reward.json`` with the head config and the base model's name;
``load_reward_model(dir)`` restores it in one call.

``load_reward_checkpoint`` loads a run's checkpoint of a reward model (or a critic) in place.
``score_texts`` (``models/scoring.py``, re-exported here) is the one way texts are scored by a
sequence model (reward and cost models, ensembles, the teacher log-ratio reward).
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignkit import __version__
from alignkit.errors import CheckpointError, ConfigError, ModelError
from alignkit.models.forward import position_ids_from_mask
from alignkit.models.loading import (
    ADAPTER_CONFIG,
    DTypeLike,
    ResolvedModel,
    ensure_pad_token,
    load_policy,
    load_pretrained,
    lora_adapter_dir,
    model_of_run,
    resolve_dtype,
    resolve_model,
    tokenizer_for,
)
from alignkit.models.packing import (
    pack_rows,
    packable_model,
    packed_attention,
    packed_model_inputs,
    packing_options,
)
from alignkit.models.pooling import POOLINGS, AttentionPooling, pool
from alignkit.models.scoring import score_texts, text_length_limit  # noqa: F401  (re-exported)
from alignkit.models.tiny import TINY_NAME, build_tiny_model
from alignkit.tracking.checkpoint import load_full_state_dict

REWARD_HEADS = ("linear", "mlp")
AUX_HEADS = ("helpfulness", "safety")
MODEL_KINDS = ("reward", "cost")
CONFIG_FILE = "alignkit_reward.json"
HEAD_WEIGHTS = "reward_head.safetensors"
_FORMAT_VERSION = 1


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        near = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{key} must be one of {', '.join(valid)}; got {value!r}{hint}")


@dataclass(frozen=True)
class RewardModelConfig:
    """What sits on top of the backbone; saved as ``alignkit_reward.json``."""

    # "linear": Linear(H, 1); "mlp": Linear(H, H/2), ReLU, Dropout, Linear(H/2, 1) (the seed's)
    head: str = "linear"
    pooling: str = "last"  # one of POOLINGS
    aux_heads: tuple[str, ...] = ()  # subset of AUX_HEADS
    mlp_dropout: float = 0.1  # the seed's MLP head dropout
    kind: str = "reward"  # "reward" or "cost" (cost > 0 means unsafe); a label, same maths
    base_model: str = ""  # the name or path the backbone was first loaded from

    def __post_init__(self) -> None:
        _check_choice("head", self.head, REWARD_HEADS)
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("kind", self.kind, MODEL_KINDS)
        object.__setattr__(self, "aux_heads", tuple(self.aux_heads))
        for name in self.aux_heads:
            _check_choice("aux_heads entry", name, AUX_HEADS)
        if len(set(self.aux_heads)) != len(self.aux_heads):
            raise ConfigError(f"aux_heads lists a head twice: {list(self.aux_heads)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RewardModelConfig:
        valid = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in valid]
        if unknown:
            near = difflib.get_close_matches(unknown[0], valid, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid: {', '.join(valid)}"
            raise ConfigError(f"unknown reward model setting '{unknown[0]}'{hint}")
        return cls(**values)


@dataclass
class RewardOutput:
    """What ``RewardModel.forward`` returns."""

    rewards: Tensor  # [B], one scalar per sequence (a cost for kind="cost")
    token_values: Tensor | None = None  # [B, T], head at every position, 0 at pads (if asked)
    aux: dict[str, Tensor] = field(default_factory=dict)  # aux head name -> [B]


def _build_head(kind: str, hidden_size: int, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden_size, 1)
    inner = max(hidden_size // 2, 1)
    return nn.Sequential(
        nn.Linear(hidden_size, inner), nn.ReLU(), nn.Dropout(dropout), nn.Linear(inner, 1)
    )


class RewardModel(nn.Module):
    """A backbone (no LM head) plus a scalar head; see the module docstring."""

    def __init__(self, backbone: PreTrainedModel, config: RewardModelConfig):
        super().__init__()
        if config.pooling == "cls" and _is_causal(backbone):
            # In a causal model the first token attends to nothing after it: every row would
            # get the same reward (measured: held-out accuracy 0.0).
            raise ConfigError(
                "pooling 'cls' reads the first token, which in a causal (decoder-only) backbone "
                "sees no other token; use 'last' (default), 'mean', 'max' or 'attention'"
            )
        self.backbone = backbone
        self.reward_config = config
        hidden = backbone.config.hidden_size
        self.attention_pooling = AttentionPooling(hidden) if config.pooling == "attention" else None
        self.head = _build_head(config.head, hidden, config.mlp_dropout)
        self.aux_heads = nn.ModuleDict({name: nn.Linear(hidden, 1) for name in config.aux_heads})
        dtype = next(backbone.parameters()).dtype
        for module in (self.attention_pooling, self.head, self.aux_heads):
            if module is not None:
                module.to(dtype)
        # Positions counted from each row's first real token make left- and right-padded
        # batches give the same rewards (for backbones that take position ids).
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Checkpoint the backbone's activations (the heads are too small to matter)."""
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        return_token_values: bool = False,
        packed: bool = False,
    ) -> RewardOutput:
        """Score each sequence of ``input_ids [B, T]``; ``attention_mask`` 1 = real token.

        ``packed``: run the backbone padding-free (`models.packing`: real tokens in one row, a
        block-diagonal causal mask, a prompt shared by a pair's rows computed once) where the
        backbone allows it; the hidden states, hence rewards, equal the padded forward's.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self._packed_hidden(input_ids, attention_mask) if packed else None
        if hidden is None:
            inputs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self._takes_position_ids:
                inputs["position_ids"] = position_ids_from_mask(attention_mask)
            hidden = self.backbone(**inputs).last_hidden_state
        pooled = pool(hidden, attention_mask, self.reward_config.pooling, self.attention_pooling)
        output = RewardOutput(
            rewards=self.head(pooled).squeeze(-1),
            aux={name: head(pooled).squeeze(-1) for name, head in self.aux_heads.items()},
        )
        if return_token_values:
            values = self.head(hidden).squeeze(-1)
            output.token_values = values.masked_fill(~attention_mask.bool(), 0.0)
        return output

    def _packed_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """``[B, T, H]`` hidden states from a packed backbone pass (0 at pads), or None where
        the backbone or the batch cannot be packed."""
        if not packable_model(self.backbone, input_ids.shape[1]):
            return None
        layout = pack_rows(input_ids, attention_mask, **packing_options(self.backbone))
        if layout is None:
            return None
        dtype = next(self.backbone.parameters()).dtype
        inputs = packed_model_inputs(self.backbone, layout, dtype)
        with packed_attention(self.backbone, layout):
            hidden = self.backbone(**inputs).last_hidden_state
        return layout.unpack(hidden)

    def head_state_dict(self) -> dict[str, Tensor]:
        """Weights of everything but the backbone (heads and attention pooling)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_pretrained(
        self,
        out_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        state_dict: Mapping[str, Tensor] | None = None,
    ) -> Path:
        """Write backbone (HF format), head weights, config and optionally the tokenizer.

        `state_dict`: the whole model's weights, named as by ``self.state_dict()``, when they
        had to be gathered first (FSDP shards them); default: the model's own.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(out)
            head_weights = self.head_state_dict()
        else:
            backbone = {
                key.removeprefix("backbone."): value
                for key, value in state_dict.items()
                if key.startswith("backbone.")
            }
            self.backbone.save_pretrained(out, state_dict=backbone)
            head_weights = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
        heads = {k: v.detach().contiguous() for k, v in head_weights.items()}
        save_file(heads, str(out / HEAD_WEIGHTS), metadata={"format": "pt"})
        record = {
            "format_version": _FORMAT_VERSION,
            **asdict(self.reward_config),
            "aux_heads": list(self.reward_config.aux_heads),
            "hidden_size": self.backbone.config.hidden_size,
            "alignkit_version": __version__,
        }
        (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (out / "README.md").write_text(_saved_readme(self.reward_config), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out


def _saved_readme(config: RewardModelConfig) -> str:
    """How to load this directory (written next to the weights)."""
    sign = "cost > 0 means unsafe" if config.kind == "cost" else "higher is better"
    return f"""# alignkit {config.kind} model ({sign})

Backbone in Hugging Face format (`config.json`, `model.safetensors`), {config.pooling} pooling
and a {config.head} head in `{HEAD_WEIGHTS}`, settings in `{CONFIG_FILE}`.

    import alignkit
    model, tokenizer = alignkit.load_reward_model("<this directory>")
    scores = alignkit.RewardScorer("<this directory>")(prompts, completions, [])

or `alignkit score <this directory> rows.jsonl`. With transformers alone, load the backbone with
`AutoModel.from_pretrained` and apply the head weights of `{HEAD_WEIGHTS}` to the pooled
hidden state yourself: `AutoModelForSequenceClassification` would add a new, random head.
"""


def _saved_config(directory: Path) -> RewardModelConfig:
    record = json.loads((directory / CONFIG_FILE).read_text())
    if record.pop("format_version", None) != _FORMAT_VERSION:
        raise CheckpointError(f"{directory / CONFIG_FILE}: unsupported format version")
    record.pop("hidden_size", None)
    record.pop("alignkit_version", None)
    return RewardModelConfig.from_dict(record)


def _load_saved(directory: Path, overrides: dict[str, Any], dtype: Any) -> RewardModel:
    from transformers import AutoModel

    config = _saved_config(directory)
    for key, value in overrides.items():
        saved = getattr(config, key)
        if (tuple(value) if key == "aux_heads" else value) != saved:
            raise ConfigError(
                f"the reward model saved in {directory} has {key}={saved!r}; "
                f"{value!r} was asked for (leave it unset to use the saved one)"
            )
    model = RewardModel(load_pretrained(AutoModel, str(directory), dtype), config)
    if not (directory / HEAD_WEIGHTS).is_file():
        raise CheckpointError(f"{directory} has {CONFIG_FILE} but no {HEAD_WEIGHTS}")
    missing, unexpected = model.load_state_dict(
        load_file(str(directory / HEAD_WEIGHTS)), strict=False
    )
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / HEAD_WEIGHTS} does not match {CONFIG_FILE}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    return model


def check_saved_kind(path: str | Path, kind: str, setting: str) -> Path:
    """The directory of a model saved by ``RewardModel.save_pretrained`` with this `kind`.

    Anything else (the ``tiny`` preset, a policy checkpoint whose head would be random, a
    reward model where a cost model is wanted: the opposite sign) is a ``ModelError`` naming
    `setting` and saying what `path` is. A saved model from before kinds were recorded is
    refused with the one-line fix.
    """
    directory = Path(path).expanduser()
    record_path = directory / CONFIG_FILE
    what: str
    if record_path.is_file():
        try:
            saved = json.loads(record_path.read_text(encoding="utf-8")).get("kind")
        except (json.JSONDecodeError, AttributeError):
            saved = "unreadable"
        if saved == kind:
            return directory
        if saved is None:
            raise ModelError(
                f"{setting}={path}: {record_path} does not say whether this is a reward or a "
                f"cost model (saved by an older alignkit); if it was trained with kind={kind}, "
                f'add "kind": "{kind}" to that file'
            )
        what = f"a {saved} model ({CONFIG_FILE} says kind={saved})"
    elif str(path) == TINY_NAME:
        what = "the built-in untrained 'tiny' preset"
    elif not directory.exists():
        what = "not an existing directory"
    elif (directory / "config.json").is_file() or (directory / ADAPTER_CONFIG).is_file():
        what = f"a policy or plain model (no {CONFIG_FILE}): its head would be random"
    else:
        what = f"a directory without a saved model ({CONFIG_FILE})"
    raise ModelError(
        f"{setting}={path} is {what}; it must be a {kind} model saved by "
        f"`alignkit train {'cost' if kind == 'cost' else 'rm'}`"
    )


def _fresh_backbone(
    resolved: ResolvedModel, dtype: Any, seed: int, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    from transformers import AutoModel

    if resolved.kind == "preset":
        dtype = torch.float32 if dtype == "auto" else dtype
        return build_tiny_model(
            tokenizer, seed=seed, dtype=dtype, causal_lm=False, preset=resolved.name
        )
    if lora_adapter_dir(resolved) is not None:
        # A LoRA policy: fold the adapter into the weights, then keep the decoder stack.
        policy, _ = load_policy(resolved.location, dtype=dtype, seed=seed)
        return policy.merge_and_unload().base_model
    return load_pretrained(AutoModel, resolved.location, dtype)


def load_reward_model(
    name_or_dir: str | Path,
    head: str | None = None,
    pooling: str | None = None,
    aux_heads: tuple[str, ...] | list[str] | None = None,
    kind: str | None = None,
    mlp_dropout: float | None = None,
    dtype: DTypeLike = "float32",
    seed: int = 0,
) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """Load a saved reward/cost model, or build a fresh one on a model's backbone.

    A directory written by ``RewardModel.save_pretrained`` is restored as saved (a setting
    given here that contradicts the saved one is an error). Any other name or path (``"tiny"``,
    a fetched model, a policy directory, a cached hub id) gives its backbone with fresh heads
    initialised from ``seed`` (for ``"tiny"`` the backbone too); unset settings take
    ``RewardModelConfig``'s defaults.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    torch_dtype = resolve_dtype(dtype)
    settings = dict(
        head=head, pooling=pooling, aux_heads=aux_heads, kind=kind, mlp_dropout=mlp_dropout
    )
    given = {key: value for key, value in settings.items() if value is not None}
    name_or_dir = model_of_run(name_or_dir)  # a run: its best or final checkpoint's model
    directory = Path(name_or_dir).expanduser()
    if (directory / CONFIG_FILE).is_file():
        model = _load_saved(directory, given, torch_dtype)
        has_tokenizer = (directory / "tokenizer_config.json").is_file()
        tokenizer_source = str(directory) if has_tokenizer else model.reward_config.base_model
        tokenizer = ensure_pad_token(tokenizer_for(resolve_model(tokenizer_source)))
    else:
        resolved = resolve_model(name_or_dir)
        # Directories are recorded absolute, so the saved model finds its base from anywhere.
        base = str(resolved.path.resolve()) if resolved.path is not None else resolved.name
        config = RewardModelConfig.from_dict({**given, "base_model": base})
        tokenizer = ensure_pad_token(tokenizer_for(resolved))
        backbone = _fresh_backbone(resolved, torch_dtype, seed, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = RewardModel(backbone, config)
    ensure_pad_token(tokenizer, model.backbone)
    return model.eval(), tokenizer


def _is_causal(backbone: nn.Module) -> bool:
    """True for decoder-only backbones (their attention layers are marked ``is_causal``)."""
    return any(getattr(module, "is_causal", None) is True for module in backbone.modules())


def load_reward_checkpoint(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint written by ``RewardModel.save_pretrained`` into `model`: the
    backbone's Hugging Face files, then the heads' file."""
    weights: dict[str, Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        prefix = "" if file.name == HEAD_WEIGHTS else "backbone."
        weights.update({prefix + key: value for key, value in load_file(file).items()})
    if not weights:
        raise CheckpointError(f"{directory}: no .safetensors weights to load")
    result = load_full_state_dict(model, weights)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{directory} does not match the model being trained: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


# ---------------------------------------------------------------------- scoring texts


def reward_scores(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """``[B]`` float32 CPU rewards of a reward/cost model on a CPU batch (moved to its device)."""
    device = next(model.parameters()).device
    return (
        model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        .rewards.float()
        .cpu()
    )
