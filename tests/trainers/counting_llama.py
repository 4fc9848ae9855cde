"""A tiny Llama (vocabulary 64, 2 layers, `llama_helpers.build_llama`) and the counting task it learns
in a few steps: what the loop, optimizer and FSDP tests train, in the test's process or in
launched ones."""

from __future__ import annotations

import torch
from llama_helpers import build_llama
from transformers import LlamaForCausalLM


def tiny_llama(*, tie_word_embeddings: bool = True) -> LlamaForCausalLM:
    """The same weights on every call (seeded with 0)."""
    return build_llama(
        64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie_word_embeddings,
    )


def counting_sequences(n: int = 48, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Token t+1 = token t + 1 (mod 64), right-padded to `length`: easy to learn."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 64, (1,), generator=generator))
        real = int(torch.randint(6, length + 1, (1,), generator=generator))
        ids = (start + torch.arange(length)) % 64
        mask = (torch.arange(length) < real).long()
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return rows


def probe_ids() -> torch.Tensor:
    """Two rows of 10 tokens to compare models' logits on."""
    return (torch.arange(20).reshape(2, 10) * 3) % 64
