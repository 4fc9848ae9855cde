"""The model inside its wrappers, and what its class's ``forward`` accepts.

Training wraps a model in DDP, FSDP, DeepSpeed's engine, ``torch.compile`` and peft; the forward
pass, packing and block attention decide what to pass by the class of the module that computes
the logits. These helpers find that module and read its ``forward``; they import nothing else
of alignkit, so every other module of ``models`` can use them.
"""

from __future__ import annotations

import functools
import inspect
import sys

from torch import nn

__all__ = [
    "innermost_model",
    "selects_logit_rows",
    "takes_position_ids",
    "transformers_forward_owner",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that distributed training and compilation add.

    Peels ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and every wrapper that holds
    the model as ``.module``: DistributedDataParallel, DataParallel, FSDP (version 1) and
    DeepSpeed's engine, the set accelerate's ``extract_model_from_parallel`` peels, found here by
    the attribute so that neither deepspeed nor accelerate has to be imported, and without that
    function's side effect on ``forward``. FSDP2 (``fully_shard``) wraps nothing: it subclasses
    the model in place. A peft adapter is not peeled (it is part of the model being trained).
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def innermost_model(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` computes the logits, inside every wrapper around it.

    Peels the parallel and compile wrappers (:func:`unwrap_model`: DDP, DataParallel, FSDP,
    DeepSpeed, ``torch.compile``) and then peft's ``PeftModel`` / ``LoraModel``
    (``get_base_model``), whose forwards pass their keyword arguments through.
    """
    model = unwrap_model(model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def transformers_forward_owner(model_class: type) -> type | None:
    """The class in ``model_class``'s MRO that defines the ``forward`` its instances run, if
    that class is transformers' own (defined in ``transformers.models.*``); else None.

    Looked up through the MRO, so FSDP2's generated subclass (``FSDPLlamaForCausalLM``) finds
    ``LlamaForCausalLM``, while a remote-code or user subclass that overrides ``forward`` finds
    itself, outside transformers.
    """
    owner = next((c for c in model_class.__mro__ if "forward" in vars(c)), None)
    if owner is None or not owner.__module__.startswith("transformers.models."):
        return None
    return owner


def takes_position_ids(model: nn.Module) -> bool:
    """Whether the forward of :func:`innermost_model` names a ``position_ids`` parameter."""
    return _takes_position_ids(type(innermost_model(model)))


@functools.cache
def _takes_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(model_class.forward).parameters


def selects_logit_rows(model: nn.Module) -> bool:
    """Whether ``model`` takes a boolean ``[B, T]`` ``logits_to_keep`` and returns ``[N, V]``.

    Decided on the class of :func:`innermost_model`, so it holds under DDP, FSDP, DeepSpeed and
    peft wrappers alike: True when that class's ``forward`` is a transformers causal LM's own
    (:func:`transformers_forward_owner`, slicing with ``slice_logits_to_keep``, which gained the
    boolean form in 5.x). A remote-code or user subclass that overrides ``forward`` takes the
    full-logits path.
    """
    return _selects_logit_rows(type(innermost_model(model)))


@functools.cache
def _selects_logit_rows(model_class: type) -> bool:
    owner = transformers_forward_owner(model_class)
    if owner is None:
        return False
    module = sys.modules.get(owner.__module__)
    if module is None or not hasattr(module, "slice_logits_to_keep"):
        return False
    return "logits_to_keep" in inspect.signature(owner.forward).parameters
