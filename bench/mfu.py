"""Model-FLOPs utilisation (MFU): the model FLOPs a training run achieves per second, as a share
of this machine's dense matmul rate in the run's precision (fp32, or bf16 for a run under bf16
autocast) at the same thread count.

Model FLOPs of one optimizer step (forward + backward), the convention of Kaplan et al. 2020
(arXiv:2001.08361, section 2.1) and of PaLM's MFU (Chowdhery et al. 2022, arXiv:2204.02311,
appendix B)::

    model_flops = 6 * N * tokens  +  6 * d * V * scored_rows  (+ 6 * d * heads_out * rows)

- ``N``: the parameters of the matmuls every token goes through, i.e. all parameters except the
  input embedding (a table lookup, no FLOPs) and except the LM head (counted separately, since
  not every position needs it). A dense layer ``y = x W`` with ``W`` of ``p`` weights costs
  ``2p`` FLOPs per token forward (a multiply and an add per weight) and ``4p`` backward (the
  gradient with respect to the input and to ``W``, ``2p`` each): ``6p`` per token trained.
  Norm weights are counted in ``N`` too (a few thousand of ~10^8: 0.01%).
- ``tokens``: the real (non-pad) tokens the model is run on; padding is not useful work, so a
  framework that computes on padding gets no credit for it.
- The LM head (``d x V``) is needed only where a log-prob enters the loss: the completion
  tokens of SFT, the response tokens of DPO (``scored_rows``). Both frameworks get the same
  count for the same job, whatever they actually compute (TRL's LM head runs on every
  position), so MFU measures the useful work, the same for both, and the MFU ratio equals the
  throughput ratio. A reward model has no LM head; its scalar head (``d x 1``) is negligible
  and left out.
- Attention's own score and value products (``QK^T``, ``AV``: ``12 * layers * T * d`` per token
  forward + backward at context length ``T``) are left out, as in the Kaplan count: for
  SmolLM2-135M (30 layers, d 576, N 106.2M) at ``T`` = 256 that is 8% of ``6N``, half of it
  with the causal mask and less for packed short examples, and how much of it a packed or
  padded batch computes differs between the frameworks.

The machine's rate is measured, not taken from a datasheet: a loop of ``torch.mm`` at the
model's own matmul shapes (``tokens x d @ d x d``, ``tokens x d @ d x ff``, ``tokens x ff @ ff
x d``), in the run's precision (float32 or bfloat16 operands: on a CPU with AMX or AVX-512
BF16 the bf16 rate is ~3x the fp32 one, so a bf16 run is judged against the bf16 peak), in a
fresh process with the benchmark's thread count. Each shape is timed
``repeats`` times; the rate of each shape is its best repeat (the least disturbed by
neighbours), the machine rate is the FLOP-weighted mean over the shapes (total FLOPs / total
best times). Both wall time and process CPU time are measured; MFU uses wall time, the CPU
variant (model FLOPs per CPU-second / matmul FLOPs per CPU-second) is less sensitive to a busy
machine.

    python bench/mfu.py --threads 1 --hidden 576 --intermediate 1536 --tokens 512 [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.runloop import flops as _flops

# The one model-FLOPs count (alignkit.runloop.flops, also behind metrics.jsonl's mfu); re-exported
# for the bench workers that import it from here.
training_flops = _flops.training_flops
non_embedding_parameters = _flops.non_embedding_parameters


def model_shapes(config: Any) -> dict[str, int]:
    """What :func:`training_flops` and the matmul loop need from a Hugging Face config."""
    return {
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
        "vocab_size": int(config.vocab_size),
    }


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def measure_matmul_rate(
    hidden: int,
    intermediate: int,
    tokens: int = 512,
    repeats: int = 7,
    repeat_s: float = 0.1,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """``torch.mm`` FLOPs/s in ``dtype`` (``fp32`` or ``bf16``) at the model's shapes in this
    process (see module docstring)."""
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype])

    generator = torch.Generator().manual_seed(0)
    shapes = [
        (tokens, hidden, hidden),
        (tokens, hidden, intermediate),
        (tokens, intermediate, hidden),
    ]
    per_shape = []
    total_flops = total_wall = total_cpu = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=generator).to(torch_dtype)
        b = torch.randn(k, n, generator=generator).to(torch_dtype)
        out = torch.empty(m, n, dtype=torch_dtype)
        torch.mm(a, b, out=out)  # warm-up: first-call allocation and kernel selection
        flops = 2.0 * m * k * n
        calls = 1
        started = time.perf_counter()
        while time.perf_counter() - started < repeat_s:
            torch.mm(a, b, out=out)
            calls += 1
        best_wall = best_cpu = float("inf")
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                torch.mm(a, b, out=out)
            best_wall = min(best_wall, (time.perf_counter() - wall) / calls)
            best_cpu = min(best_cpu, max(time.process_time() - cpu, 1e-9) / calls)
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
        "dtype": DTYPES[dtype],
        "precision": dtype,
        "repeats": repeats,
    }


def machine_matmul_rate(
    threads: int,
    hidden: int,
    intermediate: int,
    tokens: int = 512,
    env: dict[str, str] | None = None,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """:func:`measure_matmul_rate` in ``dtype`` in a fresh process with ``threads`` torch
    threads."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--threads={threads}",
        f"--hidden={hidden}",
        f"--intermediate={intermediate}",
        f"--tokens={tokens}",
        f"--dtype={dtype}",
    ]
    env = dict(env if env is not None else os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"matmul rate measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def utilisation(
    model_flops: float, wall_s: float, cpu_s: float, rate: dict[str, Any]
) -> dict[str, float]:
    """Achieved model FLOPs/s (per wall and per CPU second) and their share of the machine's."""
    achieved, achieved_cpu = model_flops / wall_s, model_flops / cpu_s
    return {
        "model_flops": model_flops,
        "model_flops_per_s": achieved,
        "mfu": achieved / rate["flops_per_s"],
        "mfu_cpu": achieved_cpu / rate["flops_per_cpu_s"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="matmul FLOPs/s at a model's shapes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--intermediate", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rate = measure_matmul_rate(
        args.hidden, args.intermediate, args.tokens, args.repeats, dtype=args.dtype
    )
    print(json.dumps(rate))


if __name__ == "__main__":
    main()
