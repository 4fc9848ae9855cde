"""One response per prompt, for evaluation: a thin wrapper over ``TransformersEngine``.

Prompts are rendered and tokenised exactly as for training (`alignkit.data.tokenize`), sorted
by length so each batch carries little padding, generated in batches by the engine (KV cache,
left padding, finished rows dropped), and returned in the caller's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.data.tokenize import tokenize_prompts
from alignkit.rollout.engine import Prompt as EnginePrompt
from alignkit.rollout.engine import SamplingConfig, TransformersEngine

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


def generate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | None = None,
    generator_seed: int | None = None,
) -> list[str]:
    """Generate one response per prompt; returns the decoded new text, in the prompts' order.

    Special tokens are stripped from the output and generation stops at the tokenizer's eos.
    ``generator_seed`` seeds the sampling generator (0 when None; ignored for greedy decoding;
    the global RNG is neither read nor reseeded). A thin wrapper over ``TransformersEngine``.
    """
    settings = settings or GenerationSettings()
    if not prompts:
        return []
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token for batched generation")
    records = [{"prompt": p} for p in prompts]
    examples = tokenize_prompts(records, tokenizer, max_length=settings.max_prompt_length)
    items = [EnginePrompt(text="", input_ids=list(e["input_ids"]), fields={}) for e in examples]
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    sampling = SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
    )
    # Its own generator: reproducible (seed 0 when none is given), the global RNG untouched.
    generator = torch.Generator().manual_seed(0 if generator_seed is None else generator_seed)
    engine = TransformersEngine(model, tokenizer)
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), settings.prompts_per_batch):
        chunk = order[start : start + settings.prompts_per_batch]
        experience = engine.generate([items[i] for i in chunk], sampling, generator=generator)
        for i, text in zip(chunk, experience.completions, strict=True):
            texts[i] = text.strip()
    return texts
