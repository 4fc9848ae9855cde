"""Peak memory and time of `selective_log_softmax` against log_softmax-then-gather.

    PYTHONPATH=src .venv/bin/python bench/logprobs.py [--tokens 1024] [--vocab 32000,151936]
        [--dtypes float32,bfloat16] [--repeats 5] [--out bench/results/logprobs.json]

One case = one method, logits dtype and vocabulary size: ``[tokens, V]`` random logits and one
target id per row; forward (the log-prob of each target) and backward (of their sum) down to the
gradient of a leaf. The logits are a copy of that leaf made before the measured pass, so that
they are what an LM head's output is to a trainer: an intermediate tensor that nothing else
reads. The methods:

- ``naive``: ``logits.float().log_softmax(-1).gather(-1, index)``, what a trainer writes without
  a fused op (the ``.float()`` is a no-op for float32 logits);
- ``selective``: ``alignkit.ops.logprobs.selective_log_softmax`` (logsumexp + gather by blocks of
  rows, backward recomputed per block) with its default block size (2**22 elements);
- ``overwrite``: the same with ``overwrite_logits=True``, what alignkit's trainers run on their
  LM head's output: the backward writes the logits' gradient into the logits' own storage;
- ``selective@E`` (``--block-elements E``, default 16777216 = 2**24): the op with blocks of
  ``E // V`` rows, to show what the block size costs on this machine.

Every case runs in a fresh Python process, so one case's freed memory cannot hide another's
peak. **Peak extra memory** is the process' peak RSS (``ru_maxrss``) during the first forward +
backward minus its RSS just before it (the logits and ids already allocated and written, a few
rows at a time so that the set-up never peaks above that baseline; the worker checks it). It
includes the ``[tokens, V]`` gradient of the logits in the logits' dtype, which the LM head's
backward needs: its size is printed as the floor, and the ratio of what each method needs beyond
it (its workspace) is printed next to the ratio of the whole peaks. ``overwrite`` puts that
gradient where the logits were, so its whole peak is its workspace. **Time**
is the median of ``--repeats`` further forward + backward passes (one torch thread), wall clock and process CPU
time (less disturbed by busy neighbours; the 1-minute load average is recorded per case). The
table also checks that the methods give the same log-probs and gradients (sums compared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
METHODS = ("naive", "selective", "overwrite")
MIB = 1 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:  # pages: size resident shared ...
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_case(method: str, dtype_name: str, vocab: int, tokens: int, repeats: int) -> dict:
    """Measure one case in this process (called in a fresh worker process)."""
    import torch

    from alignkit.ops.logprobs import selective_log_softmax

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    # Filled a few rows at a time: a float32 copy of the whole tensor would set the process'
    # high-water mark before the measured pass (bfloat16 cases).
    source = torch.empty(tokens, vocab, dtype=dtype)
    for start in range(0, tokens, 16):
        block = torch.randn(min(16, tokens - start), vocab, generator=generator).mul_(3)
        source[start : start + block.shape[0]] = block
    source.requires_grad_()
    index = torch.randint(0, vocab, (tokens,), generator=generator)

    def forward_backward(logits: torch.Tensor) -> torch.Tensor:
        if method == "naive":
            logps = logits.float().log_softmax(-1).gather(-1, index[:, None]).squeeze(-1)
        elif method in ("selective", "overwrite"):
            logps = selective_log_softmax(logits, index, overwrite_logits=method == "overwrite")
        else:  # selective@E
            block_elements = int(method.partition("@")[2])
            logps = selective_log_softmax(logits, index, chunk_size=max(1, block_elements // vocab))
        logps.sum().backward()
        return logps.detach()

    logits = source.clone()  # the LM head's output: its backward passes the gradient through
    rss_before, peak_before = _rss_bytes(), _peak_rss_bytes()
    started = time.perf_counter()
    logps = forward_backward(logits)
    first_s = time.perf_counter() - started
    peak_after = _peak_rss_bytes()
    if peak_before > rss_before + 16 * MIB:
        raise RuntimeError(
            f"the set-up peaked {(peak_before - rss_before) / MIB:.0f} MiB above the baseline: "
            "the measured pass's peak would be hidden"
        )
    checksums = {
        "logps_sum": float(logps.double().sum()),
        "grad_abs_sum": float(source.grad.double().abs().sum()),
        "grad_in_place": source.grad.data_ptr() == logits.data_ptr(),
    }
    times, cpu_times = [], []
    for _ in range(repeats):
        source.grad = None
        logits = source.clone()
        started, cpu_started = time.perf_counter(), time.process_time()
        forward_backward(logits)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {
        "method": method,
        "dtype": dtype_name,
        "vocab": vocab,
        "tokens": tokens,
        "peak_extra_mib": (peak_after - rss_before) / MIB,
        "logits_mib": source.numel() * source.element_size() / MIB,
        "first_pass_s": first_s,
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(),
        **checksums,
    }


def run_worker(method: str, dtype: str, vocab: int, tokens: int, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"{method},{dtype},{vocab},{tokens},{repeats}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {command[-1]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(cases: list[dict]) -> list[dict]:
    """One row per (dtype, vocab, selective variant): naive / selective ratios and the agreement
    of their sums."""
    rows = []
    keys = sorted({(c["dtype"], c["vocab"]) for c in cases}, key=lambda k: (k[0], k[1]))
    for dtype, vocab in keys:
        by_method = {c["method"]: c for c in cases if (c["dtype"], c["vocab"]) == (dtype, vocab)}
        naive = by_method["naive"]
        for method, selective in by_method.items():
            if method == "naive":
                continue
            rows.append(
                {
                    "dtype": dtype,
                    "vocab": vocab,
                    "method": method,
                    "memory_ratio": naive["peak_extra_mib"] / selective["peak_extra_mib"],
                    # Beyond the logits' gradient, which the LM head needs: the op's own
                    # workspace (all of the peak when the gradient took the logits' storage).
                    "workspace_ratio": (naive["peak_extra_mib"] - naive["logits_mib"])
                    / (
                        selective["peak_extra_mib"]
                        - (0.0 if selective["grad_in_place"] else selective["logits_mib"])
                    ),
                    "time_ratio": naive["median_s"] / selective["median_s"],
                    "cpu_time_ratio": naive["median_cpu_s"] / selective["median_cpu_s"],
                    "logps_sum_rel_diff": abs(naive["logps_sum"] - selective["logps_sum"])
                    / abs(naive["logps_sum"]),
                    "grad_abs_sum_rel_diff": abs(naive["grad_abs_sum"] - selective["grad_abs_sum"])
                    / naive["grad_abs_sum"],
                }
            )
    return rows


def print_table(cases: list[dict], rows: list[dict]) -> None:
    print(
        f"{'dtype':<9} {'vocab':>7} {'method':<18} {'peak extra MiB':>14} {'grad floor MiB':>14} "
        f"{'fwd+bwd s':>10} {'CPU s':>7} {'load':>5}"
    )
    for case in sorted(cases, key=lambda c: (c["dtype"], c["vocab"], c["method"])):
        print(
            f"{case['dtype']:<9} {case['vocab']:>7} {case['method']:<18} "
            f"{case['peak_extra_mib']:>14.0f} {case['logits_mib']:>14.0f} {case['median_s']:>10.3f} "
            f"{case['median_cpu_s']:>7.3f} {case['load_average'][0]:>5.1f}"
        )
    print()
    for row in rows:
        print(
            f"{row['dtype']:<9} {row['vocab']:>7} {row['method']:<18}: peak "
            f"x{row['memory_ratio']:.1f} smaller (beyond the gradient "
            f"x{row['workspace_ratio']:.1f}), speed x{row['time_ratio']:.2f} of naive "
            f"(CPU time x{row['cpu_time_ratio']:.2f}); sums agree to "
            f"{max(row['logps_sum_rel_diff'], row['grad_abs_sum_rel_diff']):.1e} (relative)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", default="32000,151936")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--block-elements",
        default="16777216",
        help="comma-separated block sizes (rows x vocab) for extra selective@E cases; '' for none",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "logprobs.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, dtype, vocab, tokens, repeats = args.worker.split(",")
        print(json.dumps(run_case(method, dtype, int(vocab), int(tokens), int(repeats))))
        return

    cases = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        for dtype in args.dtypes.split(","):
            extra = [f"selective@{e}" for e in args.block_elements.split(",") if e]
            for method in (*METHODS, *extra):
                case = run_worker(method, dtype, vocab, args.tokens, args.repeats)
                print(
                    f"{method:<18} {dtype:<9} V={vocab:<7} peak extra "
                    f"{case['peak_extra_mib']:.0f} MiB, {case['median_s']:.3f} s",
                    flush=True,
                )
                cases.append(case)
    rows = compare(cases)
    print()
    print_table(cases, rows)

    import torch

    from alignkit.config import atomic_write_text

    result: dict[str, Any] = {
        "benchmark": "logprobs",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "cases": cases,
        "comparison": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
