"""Models: load and save policies and tokenizers, the ``tiny`` preset, reward/cost/value models,
LoRA adapters, fetching a real small model into the local cache, and the forward pass to token
log-probs (``alignkit.models.forward``: sampling temperature, positions from the attention mask,
the LM head on scored positions only, under any DDP/FSDP/DeepSpeed/peft wrapper).

tiny: 166,208 parameters (0.17M), vocab 1024 (see ``alignkit.models.tiny``).
"""

from __future__ import annotations

from alignkit.models.fetch import KNOWN_MODELS, cache_root, cached_models, fetch_model
from alignkit.models.forward import position_ids_from_mask, response_logps, token_logprobs
from alignkit.models.loading import (
    ResolvedModel,
    load_policy,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
    save_model,
)
from alignkit.models.lora import LoraSettings, apply_lora, disabled_adapter, has_adapter
from alignkit.models.pad_token import ensure_pad_token
from alignkit.models.pooling import POOLINGS, pool
from alignkit.models.reward import (
    AUX_HEADS,
    REWARD_HEADS,
    RewardModel,
    RewardModelConfig,
    RewardOutput,
    load_reward_model,
)
from alignkit.models.tiny import TINY_NAME, TINY_NUM_PARAMETERS
from alignkit.models.wrappers import innermost_model, selects_logit_rows, unwrap_model

__all__ = [
    "AUX_HEADS",
    "KNOWN_MODELS",
    "POOLINGS",
    "REWARD_HEADS",
    "TINY_NAME",
    "TINY_NUM_PARAMETERS",
    "LoraSettings",
    "ResolvedModel",
    "RewardModel",
    "RewardModelConfig",
    "RewardOutput",
    "apply_lora",
    "cache_root",
    "cached_models",
    "disabled_adapter",
    "ensure_pad_token",
    "fetch_model",
    "has_adapter",
    "innermost_model",
    "load_policy",
    "load_reward_model",
    "load_tokenizer",
    "pool",
    "position_ids_from_mask",
    "resolve_dtype",
    "resolve_model",
    "response_logps",
    "save_model",
    "selects_logit_rows",
    "token_logprobs",
    "unwrap_model",
]
