"""Padding-free packed forwards: a padded batch's real tokens in one (or a few) rows.

A padded ``[R, T]`` batch spends compute on pad positions (a quarter of a DPO step on real
data). :func:`pack_rows` lays the batch's real tokens end to end in ``[P, L]`` rows, with

- **positions restarting per sequence** (each token keeps the position it had in its own row),
- **a block-diagonal causal mask** ``[P, 1, L, L]``: a token sees the earlier tokens of its own
  sequence and nothing else,
- **shared prefixes computed once**: when a row starts with the same tokens as an earlier row
  (the prompt of a DPO pair's chosen and rejected rows, a GRPO group's prompt), its first
  ``s = lcp - 1`` tokens are not repeated; its own tokens attend to the earlier row's copies of
  them (a tree mask). The last common token is kept in the later row as well, so that every
  token of a row is still predicted by the position just before it in the packed row.

The model then sees exactly the attention pattern of the padded batch, so logits, log-probs,
hidden states and gradients are those of the padded forward (tested to float32 round-off). The
mask is passed to the model as a 4D mask (boolean for ``sdpa``, additive for ``eager``), which
transformers uses as given; ``use_cache=False`` keeps the model from allocating a cache.

:meth:`PackedLayout.unpack` maps any per-token output (``[P, L]`` log-probs, ``[P, L, H]``
hidden states) back to the padded ``[R, T]`` layout, 0 at pads.

With ``blocks=True`` (for sdpa models, :func:`packing_options`) everything goes into one row
without padding and no ``[L, L]`` mask is built: each row's own tokens are an
:class:`~alignkit.models.block_attention.AttentionBlock` whose attention runs on its own, over
the keys of its sequence (`models.block_attention`), so attention costs about
``sum(own_tokens * sequence_length)`` instead of ``L**2``.

Two modules: ``layout`` (the layouts, pure tensor and list code, no model) and ``model`` (which
models can run them, the cost weights read from a model, and the model's inputs).
"""

from __future__ import annotations

from alignkit.models.packing.layout import PackedLayout, pack_rows, segments_layout
from alignkit.models.packing.model import (
    attention_cost,
    packable_model,
    packed_attention,
    packed_model_inputs,
    packing_options,
)

__all__ = [
    "PackedLayout",
    "attention_cost",
    "pack_rows",
    "packable_model",
    "packed_attention",
    "packed_model_inputs",
    "packing_options",
    "segments_layout",
]
