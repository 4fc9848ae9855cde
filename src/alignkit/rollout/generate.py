"""Batched generation with the transformers backend (KV cache, left padding).

Prompts are rendered and tokenised exactly as for training (`alignkit.data.tokenize`), sorted
by length so each batch carries little padding, generated in batches with the model's KV cache,
and returned in the caller's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.data.collate import PromptCollator
from alignkit.data.tokenize import tokenize_prompts

Prompt = str | Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    prompts_per_batch: int = 32
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.prompts_per_batch < 1:
            raise ValueError("prompts_per_batch must be >= 1")


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | None = None,
    generator_seed: int | None = None,
) -> list[str]:
    """Generate one response per prompt; returns the decoded new text, in the prompts' order.

    Special tokens are stripped from the output and generation stops at the tokenizer's eos.
    ``generator_seed`` seeds sampling (ignored for greedy decoding).
    """
    settings = settings or GenerationSettings()
    if not prompts:
        return []
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token for batched generation")
    examples = tokenize_prompts(
        [{"prompt": p} for p in prompts], tokenizer, max_length=settings.max_prompt_length
    )
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    collate = PromptCollator(pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = settings.temperature > 0
    extra = (
        {
            "do_sample": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
        }
        if sampling
        else {"do_sample": False}
    )
    if sampling and generator_seed is not None:
        torch.manual_seed(generator_seed)
    texts: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), settings.prompts_per_batch):
            chunk = order[start : start + settings.prompts_per_batch]
            batch = collate([examples[i] for i in chunk])
            input_ids = batch["input_ids"].to(device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **extra,
            )
            new_tokens = output[:, input_ids.shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(chunk, decoded, strict=True):
                texts[i] = text.strip()
    finally:
        model.train(was_training)
    return texts
