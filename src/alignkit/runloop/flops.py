"""Model FLOPs and the matmul peak they are measured against: the ``mfu`` of ``metrics.jsonl``.

Model FLOPs, the convention of Kaplan et al. 2020 (arXiv:2001.08361, section 2.1) and of PaLM's
MFU (Chowdhery et al. 2022, arXiv:2204.02311, appendix B)::

    training   = 6 * N * tokens + 6 * d * V * scored
    inference  = 2 * N * tokens + 2 * d * V * scored

- ``N`` (:func:`non_embedding_parameters`): the parameters of the matmuls every token goes
  through: all but the input embedding (a lookup) and the LM head. A weight costs 2 FLOPs per
  token forward (multiply, add) and 4 backward (the gradients of the input and of the weight).
- ``tokens``: real (non-pad) tokens; padding is no useful work.
- ``d * V``: the LM head, counted only on the ``scored`` tokens whose log-prob a loss or a
  sampler reads (completion tokens of SFT, response tokens of DPO and RL, generated tokens);
  0 for a reward model (its scalar head is negligible).
- Attention's own ``QK^T`` and ``AV`` products are left out (8% of ``6N`` for SmolLM2-135M at
  256 tokens), as in the Kaplan count.

The peak is measured, not read from a datasheet (:func:`matmul_rate`): ``torch.mm`` at the
model's own matmul shapes (``512 x d @ d x d``, ``512 x d @ d x ff``, ``512 x ff @ ff x d``) in
the run's precision and thread count, the best of a few short repeats per shape, FLOP-weighted
over the shapes. :func:`peak_matmul_rate` measures it once per process and shapes (~0.3 s).
MFU is then ``model FLOPs per second / peak``: against the bf16 peak in a bf16 run, the fp32
peak in an fp32 one.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.runloop.precision import matmul_width

__all__ = [
    "ModelFlops",
    "matmul_rate",
    "matmul_shapes",
    "non_embedding_parameters",
    "peak_matmul_rate",
    "training_flops",
]


def training_flops(
    non_embedding_params: int,
    tokens: int,
    *,
    hidden_size: int = 0,
    vocab_size: int = 0,
    scored_rows: int = 0,
) -> float:
    """``6 * N * tokens + 6 * hidden_size * vocab_size * scored_rows`` (module docstring)."""
    return 6.0 * non_embedding_params * tokens + 6.0 * hidden_size * vocab_size * scored_rows


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` except its input embedding and LM head (tied or not).

    Works for a Hugging Face causal LM and for alignkit's ``RewardModel`` (its backbone's input
    embedding is excluded; the scalar heads stay in, they are tiny).
    """
    excluded: set[int] = set()
    for module in _embedding_modules(model):
        excluded.update(id(p) for p in module.parameters())
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in excluded:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _embedding_modules(model: Any) -> list[Any]:
    modules = []
    for owner in (model, getattr(model, "backbone", None)):
        if owner is None:
            continue
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(owner, getter, lambda: None)()
            if isinstance(module, nn.Module):
                modules.append(module)
    return modules


def _lm_head_size(model: nn.Module) -> int:
    """``d * V`` of the LM head (0 when the model has none)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    return int(weight.numel()) if isinstance(weight, Tensor) else 0


def matmul_shapes(model: nn.Module) -> tuple[int, int]:
    """``(hidden, intermediate)``: the model's config's sizes (a reward model's backbone's), or
    the widest ``nn.Linear`` input twice; ``(1, 1)`` for a model without either."""
    for owner in (model, getattr(model, "backbone", None)):
        config = getattr(owner, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if isinstance(hidden, int):
            return hidden, int(getattr(config, "intermediate_size", None) or 4 * hidden)
    width = matmul_width(model) or 1
    return width, width


@dataclass(frozen=True)
class ModelFlops:
    """The model-FLOPs counts of one model (module docstring): ``body`` is ``N``, ``head`` is
    ``d * V`` (0 without an LM head), ``shapes`` its ``(hidden, intermediate)``."""

    body: int
    head: int
    shapes: tuple[int, int]

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops:
        return cls(non_embedding_parameters(model), _lm_head_size(model), matmul_shapes(model))

    def training(self, tokens: Tensor | float, scored: Tensor | float = 0) -> Tensor | float:
        """Forward + backward on ``tokens`` tokens, the LM head on ``scored`` of them."""
        return 6.0 * self.body * tokens + 6.0 * self.head * scored

    def inference(self, tokens: Tensor | float, scored: Tensor | float = 0) -> Tensor | float:
        """A forward on ``tokens`` tokens, the LM head on ``scored`` of them."""
        return 2.0 * self.body * tokens + 2.0 * self.head * scored


def matmul_rate(
    hidden: int,
    intermediate: int,
    *,
    dtype: torch.dtype = torch.float32,
    tokens: int = 512,
    repeats: int = 7,
    repeat_s: float = 0.1,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Dense ``torch.mm`` FLOPs/s in ``dtype`` at the model's shapes, in this process.

    Each of the three shapes (module docstring) runs for about ``repeat_s`` to size a repeat,
    then ``repeats`` times; its rate is its best repeat (the least disturbed by neighbours). The
    result's ``flops_per_s`` is total FLOPs / total best times (wall clock), ``flops_per_cpu_s``
    the same over process CPU time (less sensitive to a busy machine), with each shape's rates.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = [
        (tokens, hidden, hidden),
        (tokens, hidden, intermediate),
        (tokens, intermediate, hidden),
    ]
    per_shape = []
    total_flops = total_wall = total_cpu = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=generator, device=device).to(dtype)
        b = torch.randn(k, n, generator=generator, device=device).to(dtype)
        out = torch.empty(m, n, dtype=dtype, device=device)
        torch.mm(a, b, out=out)  # warm-up: first-call allocation and kernel selection
        _synchronize(device)
        calls = 1
        started = time.perf_counter()
        while time.perf_counter() - started < repeat_s:
            torch.mm(a, b, out=out)
            _synchronize(device)
            calls += 1
        best_wall = best_cpu = float("inf")
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                torch.mm(a, b, out=out)
            _synchronize(device)
            best_wall = min(best_wall, (time.perf_counter() - wall) / calls)
            best_cpu = min(best_cpu, max(time.process_time() - cpu, 1e-9) / calls)
        flops = 2.0 * m * k * n
        per_shape.append(
            {
                "shape": [m, k, n],
                "flops_per_s": flops / best_wall,
                "flops_per_cpu_s": flops / best_cpu,
            }
        )
        total_flops += flops
        total_wall += best_wall
        total_cpu += best_cpu
    return {
        "flops_per_s": total_flops / total_wall,
        "flops_per_cpu_s": total_flops / total_cpu,
        "threads": torch.get_num_threads(),
        "shapes": per_shape,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
    }


def peak_matmul_rate(
    dtype: torch.dtype, shapes: tuple[int, int], device: torch.device | str = "cpu"
) -> float:
    """:func:`matmul_rate`'s FLOPs per wall second, measured once per process for each
    ``(dtype, shapes, device, thread count)`` in short repeats (~0.3 s)."""
    return _peak(dtype, shapes, str(torch.device(device)), torch.get_num_threads())


@functools.cache
def _peak(dtype: torch.dtype, shapes: tuple[int, int], device: str, threads: int) -> float:
    hidden, intermediate = shapes
    rate = matmul_rate(hidden, intermediate, dtype=dtype, repeats=3, repeat_s=0.02, device=device)
    return float(rate["flops_per_s"])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
