"""One causal-LM forward pass to per-token log-probs: the policy-side counterpart of `ops.logprobs`.

Every trainer and the rollout scorer read token log-probs through :func:`token_logprobs`, so the
three choices that change the numbers are made once:

- **sampling temperature**: logits are divided by ``T`` before the log-softmax, so the log-probs
  are those of the distribution the tokens were sampled from (PPO/GRPO ratios compare against
  the engine's behaviour log-probs, which were recorded under ``T``);
- **positions from the attention mask**: left-padded rows (rollouts) get the positions of the
  same unpadded sequence, which absolute-position models need and RoPE models otherwise only
  approximate;
- **the LM head on scored positions only**: ``logits_to_keep`` with a boolean mask, detected on
  the model inside any DDP/FSDP/DeepSpeed/compile/peft wrapper.

Per-token tensors are ``[B, T]`` and aligned with ``input_ids``: column ``t`` concerns token
``input_ids[:, t]``, predicted by the logits at ``t - 1`` (the shift lives in `ops.logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

from torch import Tensor, nn

from alignkit.models.packing import (
    PackedLayout,
    pack_rows,
    packable_model,
    packed_attention,
    packed_model_inputs,
    packing_options,
    segments_layout,
)
from alignkit.models.wrappers import innermost_model, selects_logit_rows, takes_position_ids
from alignkit.ops.logprobs import (
    entropy_from_logits,
    predicts_scored_mask,
    sequence_logprobs,
    sequence_logprobs_at,
)
from alignkit.ops.stats import masked_sum

__all__ = [  # with the wrapper helpers of `models.wrappers`, which trainers read from here
    "innermost_model",
    "position_ids_from_mask",
    "response_logps",
    "selects_logit_rows",
    "takes_position_ids",
    "token_logprobs",
]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``[B, T]`` long positions counted from each row's first real token.

    ``position_ids = clamp(cumsum(attention_mask) - 1, min=0)``: a left-padded row gets the
    positions ``0, 1, 2, ...`` of its unpadded sequence from its first real token on, and 0 on
    the padding before it; a right-padded row gets ``0 .. n-1`` and then repeats ``n - 1`` on the
    padding after it (which no real token attends to). Rows without padding get ``arange(T)``,
    what a model uses when given no positions. Packed rows (several sequences per row) are not
    described by a mask: pass their restarting positions explicitly.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@overload
def token_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    scored: Tensor,
    *,
    temperature: float = ...,
    position_ids: Tensor | None = ...,
    packed: bool = ...,
    with_entropy: Literal[False] = ...,
    logits_filter: Callable[[Tensor], Tensor] | None = ...,
) -> Tensor: ...


@overload
def token_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    scored: Tensor,
    *,
    temperature: float = ...,
    position_ids: Tensor | None = ...,
    packed: bool = ...,
    with_entropy: Literal[True],
    logits_filter: Callable[[Tensor], Tensor] | None = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def token_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    scored: Tensor,
    *,
    temperature: float = ...,
    position_ids: Tensor | None = ...,
    packed: bool = ...,
    with_entropy: bool,
    logits_filter: Callable[[Tensor], Tensor] | None = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...


def token_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    scored: Tensor,
    *,
    temperature: float = 1.0,
    position_ids: Tensor | None = None,
    packed: bool = False,
    with_entropy: bool = False,
    logits_filter: Callable[[Tensor], Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``[B, T]`` log-probs of the tokens where ``scored`` is set (0 elsewhere), one forward.

    ``out[b, t] = log softmax(logits[b, t - 1] / temperature)[input_ids[b, t]]`` where
    ``scored[b, t]``. The division comes before the log-softmax: with ``temperature != 1`` these
    are the log-probs of the distribution the tokens were *sampled* from, which is what PPO's
    ratio ``exp(logp - old_logp)`` and the behaviour log-probs of a rollout must use (TRL's
    ``grpo_trainer`` and verl's ``dp_actor`` divide the logits the same way). Training with
    ``temperature=1`` scores the model's own distribution.

    Args:
        model: a causal LM returning ``.logits`` (possibly wrapped by DDP, FSDP, DeepSpeed,
            ``torch.compile`` or peft).
        batch: ``input_ids`` and ``attention_mask``, both ``[B, T]``; padding may be on either side.
        scored: ``[B, T]`` 1 (or True) on the tokens to score, e.g. the response mask.
        temperature: the sampling temperature the logits are divided by; must be positive.
        position_ids: ``[B, T]`` explicit positions (packed rows restart them per sequence); by
            default :func:`position_ids_from_mask` of the attention mask, for models that take
            positions (ALiBi models such as BLOOM and MPT take none: their biases are relative).
        packed: run the batch padding-free (`models.packing`): the real tokens of all rows in
            one row, a block-diagonal causal mask, positions restarting per sequence, and a
            prefix shared with an earlier row (a pair's prompt) computed once. Same log-probs
            to float round-off; used where :func:`~alignkit.models.packing.packable_model`
            holds and no explicit ``position_ids`` are given, else the padded forward runs.
        with_entropy: also return the entropy (nats) of the temperature-scaled predictive
            distribution that each scored token was drawn from, ``[B, T]``, 0 elsewhere.
        logits_filter: applied to the temperature-scaled logit rows (``[..., V]``) before the
            log-softmax, e.g. ``ops.sampling.truncate_logits`` with the sampler's top-k/top-p:
            the log-probs are then those of the truncated, renormalised distribution a
            truncated sampler draws from (what an importance weight must compare against).

    Returns:
        The log-probs (float32 for half-precision models), or ``(logprobs, entropy)`` when
        ``with_entropy``. Both are differentiable with respect to the model's parameters.

    Where the model supports it (:func:`selects_logit_rows`), its LM head runs only on the
    positions that predict a scored token, so prompt and padding positions never produce
    ``V``-wide logits; otherwise all logits are computed and the scored rows read from them.
    Neither path holds a float32 ``[B, T, V]`` log-softmax (see `ops.logprobs`).

    Precision: the forward runs in the caller's autocast (a run's ``precision``); under bf16 the
    logits are bfloat16 and everything after them float32 (`ops.logprobs`). A row's log-probs
    do not depend on the other rows of a padded batch (measured: identical in bf16), but a
    packed forward's layout moves with the batch's rows (which prompts are shared, where a
    sequence starts), and in bf16 that moves a log-prob by up to ~1e-2 (mean ~1e-7; fp32:
    ~1e-6).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if packed and position_ids is None and packable_model(model, input_ids.shape[1]):
        layout = pack_rows(input_ids, attention_mask, **packing_options(model))
        if layout is not None:
            return _packed_token_logprobs(
                model, layout, scored, temperature, with_entropy, logits_filter
            )
    if position_ids is None and takes_position_ids(model):
        position_ids = position_ids_from_mask(attention_mask)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return _scored_logprobs(model, inputs, scored, temperature, with_entropy, logits_filter)


def _scored_logprobs(
    model: nn.Module,
    inputs: dict[str, Any],
    scored: Tensor,
    temperature: float,
    with_entropy: bool,
    logits_filter: Callable[[Tensor], Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The forward of :func:`token_logprobs` on prepared model inputs (padded or packed)."""
    input_ids = inputs["input_ids"]
    predicts = predicts_scored_mask(scored)
    if selects_logit_rows(model):
        # [N, V]: one row per scored token, in row-major order of `predicts`.
        logits = model(**inputs, logits_to_keep=predicts).logits
        logits = logits if temperature == 1.0 else logits / temperature
        if logits_filter is not None:
            logits = logits_filter(logits)
        if not with_entropy:
            # Nothing else reads these logits: their gradient can take their storage.
            return sequence_logprobs_at(logits, input_ids, scored, overwrite_logits=True)
        logprobs = sequence_logprobs_at(logits, input_ids, scored)
        return logprobs, _entropy_at_scored(logits, predicts)
    logits = model(**inputs).logits  # [B, T, V]
    logits = logits if temperature == 1.0 else logits / temperature
    if logits_filter is not None:
        logits = logits_filter(logits)
    logprobs = sequence_logprobs(logits, input_ids, scored)
    if not with_entropy:
        return logprobs
    rows = predicts.reshape(-1).nonzero().squeeze(-1)
    selected = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
    return logprobs, _entropy_at_scored(selected, predicts)


def _packed_token_logprobs(
    model: nn.Module,
    layout: PackedLayout,
    scored: Tensor,
    temperature: float,
    with_entropy: bool,
    logits_filter: Callable[[Tensor], Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`token_logprobs` through the packed layout, returned in the padded layout."""
    dtype = next(model.parameters()).dtype
    inputs = packed_model_inputs(model, layout, dtype)
    with packed_attention(model, layout):
        packed_scored = layout.pack_scored(scored)
        out = _scored_logprobs(
            model, inputs, packed_scored, temperature, with_entropy, logits_filter
        )
    keep = scored != 0
    packed_outputs = out if isinstance(out, tuple) else (out,)
    unpacked = tuple(
        layout.unpack(x, layout.scored_at).masked_fill(~keep, 0.0) for x in packed_outputs
    )
    return unpacked if with_entropy else unpacked[0]


def _entropy_at_scored(selected_logits: Tensor, predicts: Tensor) -> Tensor:
    """Entropies of the ``[N, V]`` logit rows selected by ``predicts``, placed at the token each
    row predicts (column ``t + 1``), in a ``[B, T]`` tensor that is 0 elsewhere."""
    entropy = entropy_from_logits(selected_logits)  # chunked; no float32 [N, V] kept for backward
    rows = predicts.reshape(-1).nonzero().squeeze(-1)
    out = entropy.new_zeros(predicts.numel()).index_put((rows + 1,), entropy)
    return out.view(predicts.shape)


def response_logps(model: nn.Module, batch: dict[str, Tensor], *, packed: bool = False) -> Tensor:
    """Summed log-probs of each row's response tokens, ``[rows]``, from one forward pass
    (padding-free if ``packed``: see :func:`token_logprobs`)."""
    scored = batch["response_mask"]
    return masked_sum(token_logprobs(model, batch, scored, packed=packed), scored, dim=-1)


def segment_logprobs(
    model: nn.Module, batch: dict[str, Tensor], scored: Tensor, *, packed: bool = True
) -> Tensor:
    """:func:`token_logprobs` of rows that hold several sequences each (``PackedSFTCollator``:
    ``position_ids`` restarting per sequence, a 4D ``attention_mask`` and a ``token_mask``).

    Where the model takes block attention (`models.block_attention`) and it costs less
    (`models.packing.segments_layout`), the rows' real tokens run as one padding-free row in
    which each sequence attends only to itself (attention ``sum(n**2)`` instead of ``T**2`` per
    row, no padding); otherwise (or without ``packed``) the rows run as they are, with their 4D
    mask. Same log-probs either way, to float round-off.
    """
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    token_mask = batch.get("token_mask")
    packable = packed and token_mask is not None and packable_model(model, input_ids.shape[1])
    options = packing_options(model) if packable else {}
    if options.get("blocks"):
        costs = {key: options[key] for key in ("attention_cost", "call_cost")}
        layout = segments_layout(input_ids, position_ids, token_mask.bool(), **costs)
        if layout is not None:
            out = _packed_token_logprobs(model, layout, scored, 1.0, False)
            assert isinstance(out, Tensor)
            return out
    return token_logprobs(model, batch, scored, position_ids=position_ids)
