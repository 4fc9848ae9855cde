"""Running a model on a packed layout: which models can, at what cost, and with which inputs.

The layouts themselves are model-free (`models.packing.layout`). Here a model's modules are read
once (:func:`packable_model`: a transformers decoder with eager or sdpa attention and no short
sliding window; :func:`packing_options`: the cost weights of the layout search, from its shapes)
and a layout becomes the model's keyword arguments (:func:`packed_model_inputs`), run inside
:func:`packed_attention` (block attention for a layout with blocks).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignkit.models.block_attention import block_attention, block_attention_available
from alignkit.models.packing.layout import PackedLayout
from alignkit.models.wrappers import innermost_model, transformers_forward_owner

__all__ = [
    "attention_cost",
    "packable_model",
    "packed_attention",
    "packed_model_inputs",
    "packing_options",
]

# The fixed cost of one attention call (forward and backward) in FLOPs: ~60 us at 100 GFLOP/s.
_CALL_FLOPS = 6e6


def packable_model(model: nn.Module, longest: int | None = None) -> bool:
    """Whether ``model`` (its innermost module, inside DDP/FSDP/peft wrappers) runs a packed
    batch exactly: a transformers decoder (``transformers.models.*`` forward, causal, not
    encoder-decoder) that takes ``position_ids`` and uses eager or sdpa attention, which take
    a 4D mask as given, with no sliding window shorter than ``longest`` (the longest sequence;
    None: any window) since the packed masks are plain causal. Others (flash-attention, ALiBi
    models, encoders, custom code) are not packed."""
    inner = innermost_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    structure = _structure(inner)
    window = structure.window
    window_cuts = window is not None and (longest is None or longest > window)
    return structure.causal and _packable_class(type(inner)) and not window_cuts


@functools.cache
def _packable_class(model_class: type) -> bool:
    owner = transformers_forward_owner(model_class)
    if owner is None:
        return False
    parameters = inspect.signature(owner.forward).parameters
    return "position_ids" in parameters and "use_cache" in parameters


def attention_cost(model: nn.Module) -> float:
    """One (query, key) pair of masked attention relative to one token through the model's
    matmuls: ``4 d`` FLOPs per pair and layer (scores and weighted values) over ``2 N / n``
    per token and layer (``N`` non-embedding parameters, ``n`` layers), i.e. ``2 d n / N``
    (3.3e-4 for SmolLM2-135M; measured on CPU: 4e-4). The model's modules are scanned once:
    the packing decisions assume its architecture does not change afterwards."""
    return _attention_cost(_structure(innermost_model(model)))


def packing_options(model: nn.Module) -> dict:
    """Keyword arguments of :func:`~alignkit.models.packing.layout.pack_rows` for ``model``:
    its :func:`attention_cost`, block attention allowed where
    :func:`~alignkit.models.block_attention.block_attention_available`, and the cost of one
    attention call in tokens: ``_CALL_FLOPS`` (about 60 us of forward and backward call
    overhead at 100 GFLOP/s) over a token's ``6 N / n`` FLOPs through one layer (``N``
    non-embedding parameters, ``n`` layers): 20 tokens on the tiny preset, 0.3 on SmolLM2-135M."""
    structure = _structure(innermost_model(model))
    parameters, layers = structure.parameters, structure.layers
    return {
        "attention_cost": attention_cost(model),
        "blocks": block_attention_available(model),
        "call_cost": _CALL_FLOPS * layers / (6.0 * parameters) if parameters else 0.0,
    }


def packed_attention(model: nn.Module, layout: PackedLayout):
    """The context a forward of ``model`` on ``packed_model_inputs(model, layout)`` runs in:
    block attention switched on for a layout with blocks, else nothing."""
    return block_attention(model, active=layout.blocks is not None)


def packed_model_inputs(model: nn.Module, layout: PackedLayout, dtype: torch.dtype) -> dict:
    """Keyword arguments running ``model`` on ``layout``: ids, positions, no cache, and the 4D
    mask in the form the attention implementation adds or selects with, or the attention
    blocks (then the forward runs inside :func:`packed_attention`)."""
    if layout.blocks is not None:
        return {
            "input_ids": layout.input_ids,
            "position_ids": layout.position_ids,
            "use_cache": False,
            "alignkit_blocks": layout.blocks,
        }
    assert layout.visible is not None
    mask: Tensor = layout.visible
    if innermost_model(model).config._attn_implementation == "eager":
        # eager attention adds the mask to the scores.
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return {
        "input_ids": layout.input_ids,
        "attention_mask": mask,
        "position_ids": layout.position_ids,
        "use_cache": False,
    }


# ----------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class _Structure:
    """What the packing decisions read from a model's modules, scanned once per model."""

    causal: bool  # a causal attention module (a bidirectional encoder gets no causal mask)
    window: int | None  # the shortest active sliding window
    parameters: int  # outside the embeddings and the LM head
    layers: int
    hidden: int


_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, _Structure] = weakref.WeakKeyDictionary()


def _structure(inner: nn.Module) -> _Structure:
    found = _STRUCTURES.get(inner)
    if found is None:
        found = _STRUCTURES[inner] = _scan(inner)
    return found


def _scan(inner: nn.Module) -> _Structure:
    config = inner.config
    modules = list(inner.modules())
    windows = [m.sliding_window for m in modules if hasattr(m, "sliding_window")]
    if not windows and getattr(config, "use_sliding_window", True):
        windows = [getattr(config, "sliding_window", None)]
    active = [w for w in windows if isinstance(w, int)]
    embeddings = {id(m.weight) for m in modules if isinstance(m, nn.Embedding)}
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None:  # runs on the scored rows only
        embeddings.add(id(head.weight))
    return _Structure(
        causal=any(getattr(m, "is_causal", None) is True for m in modules),
        window=min(active) if active else None,
        parameters=sum(p.numel() for p in inner.parameters() if id(p) not in embeddings),
        layers=getattr(config, "num_hidden_layers", None) or 0,
        hidden=getattr(config, "hidden_size", None) or 0,
    )


def _attention_cost(structure: _Structure) -> float:
    if not structure.hidden or not structure.layers or not structure.parameters:
        return 0.0
    return 2.0 * structure.hidden * structure.layers / structure.parameters
