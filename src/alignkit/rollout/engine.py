"""Generation engines: the ``GenerationEngine`` contract and ``TransformersEngine``, the one
decode loop of the package.

``GenerationEngine`` is what a trainer may ask of an engine, declared rather than guessed from
its type: ``generate``; ``samples_policy(sampling)`` and ``logprobs_match_trainer`` (whether
its samples and its recorded log-probs are the trainer's distribution and numbers, which
decide whether the trainer re-scores and applies importance weights); ``needs_weight_sync``
with ``sync_weights``; ``set_iteration``; ``stats``; ``close``.
``tests/rollout/test_engine_contract.py`` checks every engine against what it declares.

``TransformersEngine`` is a lean decode loop (no ``generate()``: no logits-processor lists, no
finished rows fed pad tokens) over one model, or several when its proposal reads more than the
policy (a teacher):

1. the B unique prompts are left-padded to a width P and prefilled once per model (positions
   counted from each row's first real token), keeping only the last position's logits;
2. each model's cache and logits are repeated ``samples_per_prompt`` (G) times, so each
   prompt's prefill is shared by its G samples;
3. every step, the proposal (``rollout.proposals``: the policy's own distribution, or its
   mixture with a teacher) turns the models' next-token logits into ``log q``; one token per
   live row is drawn from it with the engine's ``torch.Generator`` (inverse CDF,
   ``ops.sampling``) and ``log q`` of that token is recorded as its behaviour log-prob;
4. rows that emitted EOS leave the batch: every decoder's cache, mask and positions are
   compacted and an index map sends each live row's token to its output row;
5. the next logits come from one decoder per model (``rollout.decode``): for Llama, Qwen2 and
   Mistral models a lean step over a preallocated cache, otherwise the model's own forward
   with a transformers ``DynamicCache`` (``lean_decode=False`` forces the latter).

All B x G rows run in one batch. Greedy decoding (temperature 0) is the policy's argmax alone,
whatever the proposal. The models are put in eval mode for the call (their previous modes
restored) and run under ``torch.inference_mode()``; the global RNG is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from alignkit.data.collate import PromptCollator
from alignkit.models.forward import position_ids_from_mask
from alignkit.ops.sampling import inverse_cdf_sample
from alignkit.rollout.decode import start_decoding
from alignkit.rollout.experience import Experience
from alignkit.rollout.prompts import Prompt
from alignkit.rollout.proposals import PolicyProposal, Proposal
from alignkit.rollout.sampling import SamplingConfig

__all__ = [
    "GenerationEngine",
    "SnapshotEngine",
    "TransformersEngine",
    "assemble_experience",
    "pad_prompts",
    "unwrap_for_generation",
]


@runtime_checkable
class GenerationEngine(Protocol):
    """What a trainer may ask of a rollout engine; an engine declares its capabilities here.

    ``generate`` returns an ``Experience`` with NaN scores, ``samples_per_prompt`` rows per
    prompt (grouped, in the prompts' order), ``group_index = group_offset + position of the
    prompt`` and ``behaviour_logprobs``: the log-prob of every sampled token under the
    distribution it was drawn from (0 off the response and under greedy decoding).
    """

    logprobs_match_trainer: bool
    """The recorded log-probs are the trainer's own numbers: the same weights in this process,
    arithmetic that agrees with the trainer's fp32 forward (``models.forward.token_logprobs``)
    to ~1e-5. Then, when ``samples_policy`` holds, they can stand for the old log-probs. An
    engine in another process (vLLM, in any dtype) samples the policy but its numbers are not
    the trainer's: False, and the trainer re-scores the tokens and weighs them by
    ``rollout.correction`` (the sampler/trainer mismatch of Yao et al. 2025)."""

    needs_weight_sync: bool
    """The engine serves its own copy of the weights: ``sync_weights(model)`` must run after
    every optimizer step that changes the policy, before the next ``generate``. False: it
    reads the trainer's module itself (one ``sync_weights`` hands it the prepared module)."""

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience:
        """Sample ``sampling.samples_per_prompt`` responses per prompt, every random number
        from ``generator`` (same seed, same samples; an engine in another process draws its
        requests' seeds from it)."""
        ...

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        """True when, under ``sampling``, every token is drawn from exactly the distribution the
        trainer scores: the policy's ``softmax(logits / T)`` (no truncation, no suppressed
        EOS, no teacher). Otherwise importance weights correct the mismatch."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Generate with ``model``'s current weights from now on."""
        ...

    def set_iteration(self, iteration: int) -> None:
        """The training iteration the next ``generate`` belongs to (schedules read it)."""
        ...

    def stats(self) -> dict[str, float]:
        """Statistics of the last ``generate`` that only the engine knows (e.g. a teacher
        mixture's ``sampling/alpha_mean``); logged as they are."""
        ...

    def close(self) -> None:
        """Release what the engine started (servers); the trainer calls it when training ends,
        normally or by an error. Generating afterwards is not supported."""
        ...


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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class TransformersEngine:
    """The in-process transformers backend (see the module docstring).

    Args:
        model: the policy (unwrapped from DDP / FSDP wrappers).
        tokenizer: pad and EOS ids, and decoding of the completions.
        proposal: what each step samples (default: the policy's own distribution).
        lean_decode: decode Llama / Qwen2 / Mistral models with the lean static-cache step
            (``rollout.decode``); False always calls the models' own forward.
    """

    logprobs_match_trainer = True
    needs_weight_sync = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        proposal: Proposal | None = None,
        lean_decode: bool = True,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched generation")
        self.tokenizer = tokenizer
        self.model = unwrap_for_generation(model)
        self.proposal: Proposal = proposal or PolicyProposal()
        self.lean_decode = lean_decode
        self.iteration = 0
        self._stats: dict[str, float] = {}

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        return self.proposal.samples_policy(sampling)

    def sync_weights(self, model: nn.Module) -> None:
        """In-process: generate with ``model`` itself from now on (no copy)."""
        self.model = unwrap_for_generation(model)

    def set_iteration(self, iteration: int) -> None:
        self.iteration = iteration

    def stats(self) -> dict[str, float]:
        """The proposal's per-position quantities, averaged over the sampled positions of the
        last ``generate`` (empty for the policy's own distribution and greedy decoding)."""
        return dict(self._stats)

    def close(self) -> None:
        """In-process: nothing to release."""

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
        models = [self.model] if sampling.greedy else [self.model, *self.proposal.models]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            with torch.inference_mode():
                return self._generate(models, prompts, sampling, generator, group_offset)
        finally:
            for m, mode in zip(models, modes, strict=True):
                m.train(mode)

    def _generate(
        self,
        models: list[nn.Module],
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        generator: torch.Generator,
        group_offset: int,
    ) -> Experience:
        device = _device(self.model)
        g, steps = sampling.samples_per_prompt, sampling.max_new_tokens
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prompt_ids, prompt_mask, positions = pad_prompts(prompts, pad, device)
        # One decoder per model, each on its model's device; logits come back to the policy's.
        decoders, logits, devices = [], [], [_device(m) for m in models]
        for model, where in zip(models, devices, strict=True):
            inputs = (t.to(where) for t in (prompt_ids, prompt_mask, positions))
            decoder, first = start_decoding(model, *inputs, g, steps, lean=self.lean_decode)
            decoders.append(decoder)
            logits.append(first.to(device))
        n = len(prompts) * g
        tokens = torch.full((n, steps), pad, dtype=torch.long, device=device)
        token_logprobs = torch.zeros((n, steps), dtype=torch.float32, device=device)
        lengths = torch.full((n,), steps, dtype=torch.long, device=device)
        # Per batch row: its output row, and its tokens / log-probs so far. Until a row
        # leaves, batch rows are output rows and the step writes straight into the outputs.
        rows = torch.arange(n, device=device)
        batch_tokens, batch_logprobs = tokens, token_logprobs
        # The proposal's per-position quantities, summed on the device (no sync per step).
        sums: dict[str, Tensor] = {}
        sampled = 0
        for step in range(steps):
            if sampling.suppress_eos and eos is not None:
                for x in logits:
                    x[:, eos] = float("-inf")
            if sampling.greedy:
                batch_tokens[:, step] = logits[0].argmax(dim=-1)  # log-prob 0: a point mass
            else:
                logq, extras = self.proposal(logits, sampling, self.iteration)
                chosen = inverse_cdf_sample(logq, generator)
                batch_tokens[:, step] = chosen
                batch_logprobs[:, step] = logq.gather(1, chosen[:, None]).squeeze(1)
                for name, value in extras.items():
                    sums[name] = sums[name] + value.sum() if name in sums else value.sum()
                sampled += chosen.shape[0]
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
                    for decoder, where in zip(decoders, devices, strict=True):
                        decoder.select(keep.to(where))
                    rows, chosen = rows[keep], chosen[keep]
                    batch_tokens, batch_logprobs = batch_tokens[keep], batch_logprobs[keep]
            logits = [
                decoder.step(chosen.to(where)).to(device)
                for decoder, where in zip(decoders, devices, strict=True)
            ]
        if batch_tokens is not tokens:
            tokens[rows], token_logprobs[rows] = batch_tokens, batch_logprobs
        self._stats = {name: float(total) / max(sampled, 1) for name, total in sums.items()}

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


class SnapshotEngine(TransformersEngine):
    """The in-process engine on its own copy of the policy's weights, refreshed by
    ``sync_weights``: it may generate in a worker thread while the trainer updates the policy
    (``rollout.max_staleness: 1``). The arithmetic is the trainer's (``logprobs_match_trainer``),
    but between two syncs the weights are an older policy's, which the trainer knows from the
    staleness and corrects for.

    Args:
        model: the policy; a deep copy is taken (gradients off), the original is never read
            again except by ``sync_weights``.
        tokenizer, proposal, lean_decode: as :class:`TransformersEngine`.
    """

    needs_weight_sync = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        proposal: Proposal | None = None,
        lean_decode: bool = True,
    ) -> None:
        snapshot = copy.deepcopy(unwrap_for_generation(model)).requires_grad_(False)
        super().__init__(snapshot, tokenizer, proposal=proposal, lean_decode=lean_decode)

    def sync_weights(self, model: nn.Module) -> None:
        """Copy ``model``'s parameters and buffers into the snapshot (same architecture)."""
        source = unwrap_for_generation(model)
        with torch.no_grad():
            pairs = [
                *zip(self.model.parameters(), source.parameters(), strict=True),
                *zip(self.model.buffers(), source.buffers(), strict=True),
            ]
            for mine, theirs in pairs:
                mine.copy_(theirs)
