"""Generation engines: the ``GenerationEngine`` protocol and ``TransformersEngine``.

``TransformersEngine`` is a lean decode loop (no ``generate()``: no logits-processor lists, no
finished rows fed pad tokens):

1. the B unique prompts are left-padded to a width P and prefilled once (positions counted
   from each row's first real token), keeping only the last position's logits;
2. the cache and those logits are repeated ``samples_per_prompt`` (G) times, so each prompt's
   prefill is shared by its G samples;
3. every step samples one token per live row (temperature, then top-k / top-p on the scaled
   logits) from the engine's ``torch.Generator`` and records its log-prob under that final,
   renormalised distribution;
4. rows that emitted EOS leave the batch: the decoder's cache, mask and positions are
   compacted and an index map sends each live row's token to its output row;
5. the next token's logits come from a decoder (``rollout.decode``): for Llama, Qwen2 and
   Mistral models a lean step over a preallocated cache, otherwise the model's own forward
   with a transformers ``DynamicCache`` (``lean_decode=False`` forces the latter).

All B x G rows run in one batch. The model is put in eval mode for the call (its previous mode
restored) and run under ``torch.inference_mode()``; the global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from alignkit.data.collate import PromptCollator
from alignkit.models.forward import position_ids_from_mask
from alignkit.rollout.decode import start_decoding
from alignkit.rollout.experience import Experience

__all__ = [
    "GenerationEngine",
    "Prompt",
    "SamplingConfig",
    "TransformersEngine",
    "load_prompt_file",
    "prompts_from_records",
    "sampling_distribution",
    "unwrap_for_generation",
]


@dataclass
class SamplingConfig:
    """How to sample. ``temperature == 0`` is greedy decoding (recorded log-probs are 0: the
    greedy distribution is a point mass). ``top_k == 0`` and ``top_p == 1`` switch those off.
    ``suppress_eos`` forbids EOS (every row runs to ``max_new_tokens``; for benchmarks; the
    recorded log-probs are then under the EOS-masked distribution)."""

    max_new_tokens: int
    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Prompt:
    """A prompt: its text, its token ids (rendered and tokenised as for training), its row's
    other columns (passed to reward functions as keyword arguments)."""

    text: str
    input_ids: list[int]
    fields: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class GenerationEngine(Protocol):
    """Samples responses; returns an ``Experience`` with NaN scores and
    ``group_index = group_offset + position of the prompt in prompts``."""

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience: ...

    def sync_weights(self, model: nn.Module) -> None: ...


def unwrap_for_generation(model: nn.Module) -> nn.Module:
    """The module to run generation on: the model inside DDP / FSDP / accelerate wrappers
    (a peft model is kept: its adapters are part of the policy)."""
    try:
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    except ImportError:  # accelerate is a core dependency; walk `.module` if it is ever absent
        pass
    while isinstance(model, nn.parallel.DistributedDataParallel) or (
        type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module")
    ):
        model = model.module
    return model


def sampling_distribution(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Log-probs ``[R, V]`` (float32) of the distribution tokens are drawn from.

    ``logits / temperature``; then top-k keeps the k largest, top-p the smallest set of tokens
    (in decreasing probability) whose mass reaches p (the token crossing p kept); removed tokens
    get -inf and the rest are renormalised. ``suppress_eos`` handling is the caller's.
    """
    scaled = logits.float()
    if sampling.temperature != 1.0:  # x / 1 == x: skip a pass over [R, V]
        scaled = scaled / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token: a token is kept while that is below p.
        before = probs.cumsum(dim=-1) - probs
        remove = before >= sampling.top_p
        remove[:, 0] = False
        scaled = scaled.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scaled.log_softmax(dim=-1)


def _draw(logprobs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row by inverse-CDF sampling with uniforms from ``generator``.

    Uniforms are drawn on the generator's device and moved, so a CPU generator drives a GPU
    model and the same seed gives the same tokens wherever the model lives.
    """
    cdf = logprobs.exp().cumsum(dim=-1)
    u = torch.rand(logprobs.shape[0], 1, generator=generator, device=generator.device)
    u = u.to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return index.clamp_(max=logprobs.shape[-1] - 1)


class TransformersEngine:
    """The in-process transformers backend (see the module docstring)."""

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, lean_decode: bool = True
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched generation")
        self.tokenizer = tokenizer
        self.model = unwrap_for_generation(model)
        #: decode Llama / Qwen2 / Mistral models with the lean static-cache step
        #: (``rollout.decode``); False always calls the model's own forward.
        self.lean_decode = lean_decode

    def sync_weights(self, model: nn.Module) -> None:
        """In-process: generate with ``model`` itself from now on (no copy)."""
        self.model = unwrap_for_generation(model)

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience:
        """Sample ``sampling.samples_per_prompt`` responses per prompt (rows grouped by prompt,
        in the prompts' order)."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._generate(prompts, sampling, generator, group_offset)
        finally:
            self.model.train(was_training)

    def _generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        generator: torch.Generator,
        group_offset: int,
    ) -> Experience:
        device = next(self.model.parameters()).device
        g, steps = sampling.samples_per_prompt, sampling.max_new_tokens
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prompt_ids, prompt_mask, positions = pad_prompts(prompts, pad, device)
        decoder, logits = start_decoding(
            self.model, prompt_ids, prompt_mask, positions, g, steps, lean=self.lean_decode
        )
        n = len(prompts) * g
        tokens = torch.full((n, steps), pad, dtype=torch.long, device=device)
        token_logprobs = torch.zeros((n, steps), dtype=torch.float32, device=device)
        lengths = torch.full((n,), steps, dtype=torch.long, device=device)
        # Per batch row: its output row, and its tokens / log-probs so far. Until a row
        # leaves, batch rows are output rows and the step writes straight into the outputs.
        rows = torch.arange(n, device=device)
        batch_tokens, batch_logprobs = tokens, token_logprobs
        greedy = sampling.temperature == 0
        for step in range(steps):
            if sampling.suppress_eos and eos is not None:
                logits[:, eos] = float("-inf")
            if greedy:
                batch_tokens[:, step] = logits.argmax(dim=-1)  # log-prob 0: a point mass
            else:
                logprobs = sampling_distribution(logits, sampling)
                chosen = _draw(logprobs, generator)
                batch_tokens[:, step] = chosen
                batch_logprobs[:, step] = logprobs.gather(1, chosen[:, None]).squeeze(1)
            if step == steps - 1:
                break
            chosen = batch_tokens[:, step]
            if eos is not None and not sampling.suppress_eos:
                done = chosen == eos
                if bool(done.any()):
                    finished = done.nonzero().squeeze(1)
                    lengths[rows[finished]] = step + 1
                    if batch_tokens is not tokens:  # move the finished rows to the outputs
                        tokens[rows[finished]] = batch_tokens[finished]
                        token_logprobs[rows[finished]] = batch_logprobs[finished]
                    keep = (~done).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    decoder.select(keep)
                    rows, chosen = rows[keep], chosen[keep]
                    batch_tokens, batch_logprobs = batch_tokens[keep], batch_logprobs[keep]
            logits = decoder.step(chosen)
        if batch_tokens is not tokens:
            tokens[rows], token_logprobs[rows] = batch_tokens, batch_logprobs

        return assemble_experience(
            prompts,
            self.tokenizer,
            prompt_ids,
            prompt_mask,
            tokens,
            token_logprobs,
            lengths,
            sampling,
            group_offset,
        )


def pad_prompts(
    prompts: Sequence[Prompt], pad: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded prompt ids ``[P, W]``, their mask and positions from the mask."""
    batch = PromptCollator(pad_token_id=pad)([{"input_ids": list(p.input_ids)} for p in prompts])
    prompt_mask = batch["attention_mask"].to(device)
    return batch["input_ids"].to(device), prompt_mask, position_ids_from_mask(prompt_mask)


def assemble_experience(
    prompts: Sequence[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    tokens: Tensor,
    behaviour: Tensor,
    lengths: Tensor,
    sampling: SamplingConfig,
    group_offset: int,
) -> Experience:
    """An :class:`Experience` from a decode loop's ``[N, max_new_tokens]`` sampled tokens, their
    behaviour log-probs and per-row lengths (rows grouped by prompt, ``samples_per_prompt``
    each): prompt and response side by side, texts decoded once, EOS and truncation recorded."""
    device, g = tokens.device, sampling.samples_per_prompt
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    n, width = tokens.shape[0], prompt_ids.shape[1]
    longest = int(lengths.max())
    tokens, behaviour = tokens[:, :longest], behaviour[:, :longest]
    response_mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]
    last_token = tokens.gather(1, (lengths - 1)[:, None]).squeeze(1)
    emitted_eos = (last_token == eos) if eos is not None else lengths < 0
    full_prompt_mask = prompt_mask.repeat_interleave(g, dim=0)
    response_ids = tokens.masked_fill(~response_mask, pad)
    return Experience(
        input_ids=torch.cat([prompt_ids.repeat_interleave(g, dim=0), response_ids], dim=1),
        attention_mask=torch.cat([full_prompt_mask, response_mask.long()], dim=1),
        response_mask=torch.cat(
            [torch.zeros_like(full_prompt_mask, dtype=torch.bool), response_mask], dim=1
        ),
        prompt_width=width,
        behaviour_logprobs=torch.cat(
            [torch.zeros(n, width, device=device), behaviour.masked_fill(~response_mask, 0.0)],
            dim=1,
        ),
        scores=torch.full((n,), float("nan"), device=device),
        group_index=torch.arange(len(prompts), device=device).repeat_interleave(g) + group_offset,
        response_lengths=lengths,
        truncated=(lengths == sampling.max_new_tokens) & ~emitted_eos,
        prompts=[p.text for p in prompts for _ in range(g)],
        completions=tokenizer.batch_decode(response_ids.tolist(), skip_special_tokens=True),
        row_fields=[dict(p.fields) for p in prompts for _ in range(g)],
    )


def prompts_from_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
) -> list[Prompt]:
    """``Prompt``s from rows with a ``prompt`` field (a string or a message list), rendered
    and tokenised exactly as for training; the row's other columns become ``fields``."""
    from alignkit.data.tokenize import render_prompt, tokenize_prompts

    examples = tokenize_prompts(records, tokenizer, max_length=max_length)
    return [
        Prompt(
            text=render_prompt(tokenizer, r["prompt"]),
            input_ids=list(e["input_ids"]),
            fields={k: v for k, v in r.items() if k != "prompt"},
        )
        for r, e in zip(records, examples, strict=True)
    ]


def load_prompt_file(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    split: str | None = None,
) -> list[Prompt]:
    """``Prompt``s of a prompt file (any format ``load_records`` reads), validated as the
    ``prompt`` format, with each row's other columns (e.g. ``answer``) kept as ``fields``."""
    from alignkit.data.loaders import load_records, read_rows

    records = load_records(path, "prompt", split=split)
    raw = {r.row: r.value for r in read_rows(path, split=split)}
    rows = [
        {**{k: v for k, v in raw[row].items() if k != "prompt"}, "prompt": record["prompt"]}
        for record, row in zip(records, records.rows, strict=True)
    ]
    return prompts_from_records(rows, tokenizer, max_length=max_length)
