"""Decoders for ``TransformersEngine``: a shared prefill, then one new token per live row.

Both decoders prefill the B unique left-padded prompts once (last position's logits only,
repeated to each prompt's rows) and then offer the same two calls: ``step(tokens) -> [R, V]``
logits of the next token of each live row, and ``select(keep)`` to drop finished rows.

- :class:`DynamicCacheDecoder` calls the model's own ``forward`` with a transformers
  ``DynamicCache`` (any causal LM).
- :class:`StaticCacheDecoder` is a lean prefill and decode step for Llama, Qwen2 and Mistral
  models: the cache is preallocated once (``[L, R, H_kv, W + max_new_tokens - 1, D]``), the
  attention mask is a preallocated boolean row mask, the rotary cos/sin are read from a table
  computed once per call, and the layers are applied with the module weights directly. A
  transformers forward of one token on a small model is mostly per-call overhead (mask
  building, cache concatenation, output dataclasses, ~20 module calls per layer); this runs the
  same arithmetic in the same order without it. Its logits agree with the model's forward to
  float rounding (tests compare both paths' logits, tokens and log-probs).

:func:`lean_decode_support` decides which path a model can take: the exact transformers class
(a subclass may override ``forward``), plain ``nn.Linear`` projections or peft's vanilla LoRA
over them (applied as peft's forward applies them, in its order and dtypes, so a LoRA policy
decodes lean too; no DoRA, no quantised layers), the class's own RMSNorm, SiLU MLPs, a static
RoPE table (``default``, ``linear``, ``llama3``, ``yarn``), ``sdpa`` or ``eager`` attention, no
module hooks, and no sliding window shorter than the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from alignkit.models.wrappers import innermost_model

__all__ = [
    "DynamicCacheDecoder",
    "StaticCacheDecoder",
    "lean_decode_support",
    "start_decoding",
]

#: transformers causal-LM classes whose decoder layer is Llama's (pre-norm attention + SiLU
#: MLP, RMSNorm, RoPE); Qwen2 adds q/k/v biases, Mistral and Qwen2 optional sliding windows.
_LLAMA_LIKE = {
    "transformers.models.llama.modeling_llama": "LlamaForCausalLM",
    "transformers.models.qwen2.modeling_qwen2": "Qwen2ForCausalLM",
    "transformers.models.mistral.modeling_mistral": "MistralForCausalLM",
}
#: RoPE types whose cos/sin at a position never change with the sequence length.
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _lora_reason(layer: nn.Module) -> str | None:
    """``None`` when ``layer`` is peft's LoRA ``Linear`` over a plain ``nn.Linear`` in a state
    :func:`_linear` reproduces (vanilla LoRA, dropout idle); else the reason."""
    cls = type(layer)
    if (cls.__module__, cls.__name__) != ("peft.tuners.lora.layer", "Linear"):
        return "a projection that is not a plain nn.Linear (a quantised or custom layer)"
    if type(layer.base_layer) is not nn.Linear:
        return "a LoRA adapter over a layer that is not a plain nn.Linear"
    if layer.disable_adapters or layer.merged:
        return None  # the forward is the base layer's alone (merged: the delta is in it)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            return f"LoRA adapter {name!r} is a variant (DoRA or another), not vanilla LoRA"
        dropout = layer.lora_dropout[name]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return f"LoRA adapter {name!r} has a {type(dropout).__name__} on its input"
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            return f"LoRA adapter {name!r} has dropout active (the model is in training mode)"
        if any(type(m) is not nn.Linear for m in (layer.lora_A[name], layer.lora_B[name])):
            return f"LoRA adapter {name!r} has A/B modules that are not plain nn.Linear"
        same = layer.lora_A[name].weight.dtype == layer.base_layer.weight.dtype
        if not (same or getattr(layer, "cast_input_dtype_enabled", True)):
            return f"LoRA adapter {name!r} computes in its input's dtype (cast disabled)"
    return None


def lean_decode_support(model: nn.Module, sequence_length: int) -> str | None:
    """``None`` when :class:`StaticCacheDecoder` can decode ``model`` for sequences of up to
    ``sequence_length`` tokens (prompt and response); otherwise the reason it cannot. A peft
    model is decoded through its base model, its LoRA adapters applied as peft applies them."""
    model = innermost_model(model)
    cls = type(model)
    if _LLAMA_LIKE.get(cls.__module__) != cls.__name__:
        return f"{cls.__name__} is not one of {sorted(_LLAMA_LIKE.values())}"
    config = model.config
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r}"
    rope_type = getattr(model.model.rotary_emb, "rope_type", None)
    if rope_type not in _STATIC_ROPE:
        return f"rope type {rope_type!r}"
    norm_class = type(model.model.norm)
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return f"a hook on {type(module).__name__}"
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
        projections += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for projection in projections:
            if type(projection) is not nn.Linear and (why := _lora_reason(projection)):
                return why
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n) is not norm_class for n in norms):
            return "a norm of another class"
        window = (
            attention.sliding_window
            if hasattr(attention, "sliding_window")
            else getattr(config, "sliding_window", None)
        )
        if window is not None and sequence_length > window:
            return f"a sliding window of {window} < {sequence_length} tokens"
    if type(model.lm_head) is not nn.Linear or type(model.model.embed_tokens) is not nn.Embedding:
        return "a non-standard embedding or LM head"
    return None


def start_decoding(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    positions: Tensor,
    repeats: int,
    max_new_tokens: int,
    lean: bool = True,
) -> tuple[DynamicCacheDecoder | StaticCacheDecoder, Tensor]:
    """Prefill the ``[B, W]`` left-padded prompts once; return a decoder over ``B * repeats``
    rows (each prompt's rows adjacent) and their ``[B * repeats, V]`` next-token logits.

    The decoder is a :class:`StaticCacheDecoder` when ``lean`` and the model supports it
    (:func:`lean_decode_support`), else a :class:`DynamicCacheDecoder`."""
    width = prompt_ids.shape[1]
    if lean and lean_decode_support(model, width + max_new_tokens) is None:
        lean_decoder = StaticCacheDecoder(
            model, prompt_mask, positions, repeats, max(max_new_tokens - 1, 0)
        )
        return lean_decoder, lean_decoder.prefill(prompt_ids)
    cache = DynamicCache(config=getattr(model, "config", None))
    logits = forward_last(model, prompt_ids, prompt_mask, positions, cache)
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits = logits.repeat_interleave(repeats, dim=0)
    decoder = DynamicCacheDecoder(
        model,
        cache,
        prompt_mask.repeat_interleave(repeats, dim=0),
        (positions[:, -1] + 1).repeat_interleave(repeats),
    )
    return decoder, logits


def forward_last(
    model: nn.Module, input_ids: Tensor, mask: Tensor, positions: Tensor, cache: Any
) -> Tensor:
    """The model's ``[R, V]`` logits at the last position, appending to ``cache``."""
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


class DynamicCacheDecoder:
    """One token per row through the model's own forward and a transformers ``DynamicCache``."""

    def __init__(self, model: nn.Module, cache: Any, mask: Tensor, next_position: Tensor):
        self.model, self.cache, self.mask = model, cache, mask
        self.next_position = next_position[:, None]

    def select(self, keep: Tensor) -> None:
        """Keep only the rows ``keep`` (indices into the current rows)."""
        self.cache.batch_select_indices(keep)
        self.mask, self.next_position = self.mask[keep], self.next_position[keep]

    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` ``[R]``; return the ``[R, V]`` logits of the next token."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        logits = forward_last(
            self.model, tokens[:, None], self.mask, self.next_position, self.cache
        )
        self.next_position = self.next_position + 1
        return logits


class _Adapter(NamedTuple):
    """One active LoRA adapter of a projection: ``scaling * B(A(x))`` (B may have a bias), its
    weights in the dtype its matmuls run in."""

    a: Tensor
    b: Tensor
    b_bias: Tensor | None
    scaling: float


class _Linear(NamedTuple):
    """An ``nn.Linear``'s weight and bias in the decoder's matmul dtype, with the active LoRA
    adapters of a peft ``Linear`` around it (none for a plain one)."""

    weight: Tensor
    bias: Tensor | None
    adapters: tuple[_Adapter, ...] = ()

    @classmethod
    def of(cls, layer: nn.Module, dtype: torch.dtype) -> _Linear:
        """Cast once per decoder (no copy when the dtype already is ``dtype``)."""
        if type(layer) is nn.Linear:
            bias = None if layer.bias is None else layer.bias.detach().to(dtype)
            return cls(layer.weight.detach().to(dtype), bias)
        base = cls.of(layer.base_layer, dtype)
        if layer.disable_adapters or layer.merged:
            return base
        adapters = []
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name], layer.lora_B[name]
            lora_dtype = matmul_dtype(a.weight)  # peft casts the input to A's dtype
            b_bias = None if b.bias is None else b.bias.detach().to(lora_dtype)
            adapters.append(
                _Adapter(
                    a.weight.detach().to(lora_dtype),
                    b.weight.detach().to(lora_dtype),
                    b_bias,
                    layer.scaling[name],
                )
            )
        return base._replace(adapters=tuple(adapters))


@dataclass
class _Layer:
    input_norm: nn.Module
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    post_norm: nn.Module
    gate: _Linear
    up: _Linear
    down: _Linear


def _linear(x: Tensor, layer: _Linear) -> Tensor:
    """``x W^T + b`` in the weights' dtype (the input is cast to it, as autocast would), plus
    each active LoRA adapter's ``scaling * B(A(x))`` in the order and dtypes of peft's
    ``lora.Linear.forward`` (the sum is cast back to the base output's dtype)."""
    out = F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)
    if not layer.adapters:
        return out
    result_dtype = out.dtype
    for adapter in layer.adapters:
        inner = F.linear(x.to(adapter.a.dtype), adapter.a)
        out = out + F.linear(inner, adapter.b, adapter.b_bias) * adapter.scaling
    return out.to(result_dtype)


def matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a forward of float32 ``weight`` runs its matmuls in here: autocast's (bfloat16)
    when autocast is on for the weight's device, else the weight's own."""
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _rms_norm(x: Tensor, norm: Any) -> Tensor:
    """Llama's RMSNorm: ``weight * (x / sqrt(mean(x^2) + eps))`` computed in float32, cast
    back to the input dtype before the weight multiplies it."""
    shape, eps = (x.shape[-1],), norm.variance_epsilon
    if x.dtype == torch.float32:
        return F.rms_norm(x, shape, norm.weight, eps)
    return norm.weight * F.rms_norm(x.float(), shape, eps=eps).to(x.dtype)


class StaticCacheDecoder:
    """The lean prefill and decode step over a preallocated cache (see the module docstring).

    Rows are ``B * repeats`` (each prompt's ``repeats`` rows adjacent). :meth:`prefill` runs the
    B prompts once and writes their keys and values into the first ``W`` cache slots of all
    their rows; each :meth:`step` fills the next slot.

    Precision follows the caller's autocast, decided once when the decoder is built
    (:func:`matmul_dtype`). Under bf16 autocast with float32 weights it does what the model's
    forward under autocast does, without autocast's per-call casts: the projection and LM-head
    weights are cast to bfloat16 once per decoder, the cache holds bfloat16 keys and values (what
    attention reads under autocast), and what autocast keeps in float32 stays float32: the
    residual stream (bf16 matmul outputs are added to it in float32), RMSNorm and the rotary
    embedding (computed in float32 from the bf16 projections, then rounded for attention). The
    logits are bfloat16, as the model's are; the sampler upcasts them (``ops.sampling``).
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_mask: Tensor,
        positions: Tensor,
        repeats: int,
        new_slots: int,
    ) -> None:
        model = innermost_model(model)
        config = model.config
        inner = model.model
        self.embed, self.final_norm = inner.embed_tokens, inner.norm
        weight = self.embed.weight
        self.device_type = weight.device.type
        self.dtype = matmul_dtype(weight)
        self.lm_head = _Linear.of(model.lm_head, self.dtype)
        self.layers = [
            _Layer(
                layer.input_layernorm,
                *(
                    _Linear.of(p, self.dtype)
                    for p in (
                        layer.self_attn.q_proj,
                        layer.self_attn.k_proj,
                        layer.self_attn.v_proj,
                    )
                ),
                _Linear.of(layer.self_attn.o_proj, self.dtype),
                layer.post_attention_layernorm,
                *(
                    _Linear.of(p, self.dtype)
                    for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
                ),
            )
            for layer in inner.layers[: config.num_hidden_layers]
        ]
        attention = inner.layers[0].self_attn
        self.scaling = attention.scaling
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.repeats = repeats
        self.prompt_mask, self.positions = prompt_mask.bool(), positions

        prompts, width = prompt_mask.shape
        rows = prompts * repeats
        shape = (len(self.layers), rows, self.kv_heads, width + new_slots, self.head_dim)
        self.keys = weight.new_empty(shape, dtype=self.dtype)
        self.values = weight.new_empty(shape, dtype=self.dtype)
        self.length = 0  # filled slots

        # Key mask [R, slots]: the prompt's padding is masked, generated tokens are not.
        # Without padding no mask is needed at all.
        self.mask: Tensor | None = None
        if not bool(self.prompt_mask.all()):
            self.mask = torch.ones(
                (rows, width + new_slots), dtype=torch.bool, device=weight.device
            )
            self.mask[:, :width] = self.prompt_mask.repeat_interleave(repeats, dim=0)
        self.next_position = (positions[:, -1] + 1).repeat_interleave(repeats)

        # cos/sin of every position a token can take, computed once by the model's own rotary
        # module; sin carries rotate_half's sign: rotate_half(x) * sin equals
        # roll(x, D/2) * signed_sin exactly (only signs move).
        last = int(self.next_position.max()) + new_slots + 1
        table_positions = torch.arange(last, device=weight.device)[None]
        cos, sin = inner.rotary_emb(weight.new_zeros(()), table_positions)
        self.cos = cos[0]
        sign = torch.ones(self.head_dim, dtype=sin.dtype, device=sin.device)
        sign[: self.head_dim // 2] = -1
        self.signed_sin = sin[0] * sign

    def select(self, keep: Tensor) -> None:
        """Keep only the rows ``keep`` (indices into the current rows); only the filled slots
        are copied."""
        self.keys, self.values = (self._kept(cache, keep) for cache in (self.keys, self.values))
        self.next_position = self.next_position[keep]
        if self.mask is not None:
            self.mask = self.mask[keep]

    def _kept(self, cache: Tensor, keep: Tensor) -> Tensor:
        kept = cache.new_empty((cache.shape[0], keep.shape[0], *cache.shape[2:]))
        filled = cache[:, :, :, : self.length]
        kept[:, :, :, : self.length] = filled.index_select(1, keep)
        return kept

    def _rotate(self, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        # (x * cos) + (rotate_half(x) * sin), with rotate_half(x) = cat(-x2, x1).
        return (x * cos) + (x.roll(self.head_dim // 2, dims=-1) * signed_sin)

    def _mlp(self, hidden: Tensor, layer: _Layer) -> Tensor:
        x = _rms_norm(hidden, layer.post_norm).to(self.dtype)
        return hidden + _linear(F.silu(_linear(x, layer.gate)) * _linear(x, layer.up), layer.down)

    def _logits(self, hidden: Tensor) -> Tensor:
        return _linear(_rms_norm(hidden, self.final_norm), self.lm_head)

    def prefill(self, prompt_ids: Tensor) -> Tensor:
        """Run the ``[B, W]`` prompts, fill the first ``W`` slots of every row; return the
        ``[B * repeats, V]`` next-token logits."""
        if self.length:
            raise RuntimeError("prefill runs once, before the first step")
        # Autocast off: the casts it would make per call are made once (class docstring).
        with torch.autocast(self.device_type, enabled=False):
            return self._prefill(prompt_ids)

    def _prefill(self, prompt_ids: Tensor) -> Tensor:
        prompts, width = prompt_ids.shape
        # Causal and padding mask [B, 1, W, W]. A padding query may see itself only: it has no
        # real key before it, and a fully masked row would give NaN keys/values in the next
        # layer (they are masked for every real query, but 0 * NaN is NaN).
        causal = torch.ones((width, width), dtype=torch.bool, device=prompt_ids.device).tril()
        mask = causal & self.prompt_mask[:, None, :]
        mask |= torch.eye(width, dtype=torch.bool, device=prompt_ids.device)
        mask = mask[:, None]
        cos = self.cos[self.positions][:, None]  # [B, 1, W, D]
        signed_sin = self.signed_sin[self.positions][:, None]
        groups = self.heads // self.kv_heads
        # [L, B, repeats, Hkv, slots, D]: each prompt's keys go to its `repeats` rows at once.
        grouped = (len(self.layers), prompts, self.repeats, *self.keys.shape[2:])
        keys, values = self.keys.view(grouped), self.values.view(grouped)
        hidden = F.embedding(prompt_ids, self.embed.weight)  # [B, W, hidden]
        for i, layer in enumerate(self.layers):
            x = _rms_norm(hidden, layer.input_norm).to(self.dtype)
            q = _linear(x, layer.q).view(prompts, width, self.heads, -1).transpose(1, 2)
            k = _linear(x, layer.k).view(prompts, width, self.kv_heads, -1).transpose(1, 2)
            v = _linear(x, layer.v).view(prompts, width, self.kv_heads, -1).transpose(1, 2)
            k = self._rotate(k, cos, signed_sin).to(self.dtype)
            keys[i, :, :, :, :width] = k[:, None]
            values[i, :, :, :, :width] = v[:, None]
            if groups > 1:  # what transformers' repeat_kv does
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            attended = F.scaled_dot_product_attention(
                self._rotate(q, cos, signed_sin).to(self.dtype),
                k,
                v,
                attn_mask=mask,
                scale=self.scaling,
            )
            hidden = hidden + _linear(attended.transpose(1, 2).reshape(prompts, width, -1), layer.o)
            hidden = self._mlp(hidden, layer)
        self.length = width
        return self._logits(hidden[:, -1]).repeat_interleave(self.repeats, dim=0)

    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` ``[R]``; return the ``[R, V]`` logits of the next token."""
        if not self.length:
            raise RuntimeError("step needs the prefill first")
        if self.length >= self.keys.shape[3]:
            raise RuntimeError(f"the preallocated cache has {self.length} slots, all filled")
        with torch.autocast(self.device_type, enabled=False):
            return self._step(tokens)

    def _step(self, tokens: Tensor) -> Tensor:
        rows, slot = tokens.shape[0], self.length
        groups = self.heads // self.kv_heads
        cos = self.cos.index_select(0, self.next_position).unsqueeze(1)  # [R, 1, D]
        signed_sin = self.signed_sin.index_select(0, self.next_position).unsqueeze(1)
        mask = None if self.mask is None else self.mask[:, None, None, : slot + 1]
        hidden = F.embedding(tokens, self.embed.weight)  # [R, hidden]
        for i, layer in enumerate(self.layers):
            x = _rms_norm(hidden, layer.input_norm).to(self.dtype)
            q = _linear(x, layer.q).view(rows, self.heads, self.head_dim)
            k = _linear(x, layer.k).view(rows, self.kv_heads, self.head_dim)
            self.keys[i, :, :, slot] = self._rotate(k, cos, signed_sin)
            self.values[i, :, :, slot] = _linear(x, layer.v).view(rows, self.kv_heads, -1)
            q = self._rotate(q, cos, signed_sin).to(self.dtype)
            # One query token: the `groups` query heads of a key/value head attend as `groups`
            # queries of that head (what transformers does for GQA decoding, no repeat_kv).
            attended = F.scaled_dot_product_attention(
                q.view(rows, self.kv_heads, groups, self.head_dim),
                self.keys[i, :, :, : slot + 1],
                self.values[i, :, :, : slot + 1],
                attn_mask=mask,
                scale=self.scaling,
            )
            hidden = hidden + _linear(attended.reshape(rows, -1), layer.o)
            hidden = self._mlp(hidden, layer)
        self.length = slot + 1
        self.next_position = self.next_position + 1
        return self._logits(hidden)
