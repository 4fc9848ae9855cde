"""The small Llamas the tests build from a config (any vocabulary, a few layers): one builder.

Tests that need the built-in ``tiny`` preset (vocabulary 1024, the bundled tokenizer) call
``alignkit.models.load_policy("tiny")`` or ``alignkit.models.tiny.build_tiny_model`` instead;
this is for the shapes the preset does not have (a vocabulary of 8 to 64 ids, one layer,
grouped-query attention, a chat tokenizer's vocabulary).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    max_position_embeddings: int = 64,
    seed: int = 0,
    **config: Any,
) -> LlamaForCausalLM:
    """A freshly initialised Llama: the same ``seed`` gives the same weights, and the global
    random state is left as it was. ``intermediate_size`` defaults to twice ``hidden_size``;
    ``config`` passes any other `LlamaConfig` field (key/value heads, special-token ids,
    ``tie_word_embeddings``). In training mode, as a model class builds it."""
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=config.pop("intermediate_size", 2 * hidden_size),
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        **config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config)
