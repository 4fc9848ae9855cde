"""Do the online examples learn? Held-out greedy reward and accuracy before and after, per seed.

Runs every online example in ``examples/`` as shipped, changing only ``seed``, ``run_name``,
``output_dir`` and ``logging.progress_bar``, and reads the held-out greedy evaluation at step 0
(``initial_eval``) and at the last iteration from the run's ``metrics.jsonl``. An example passes
a seed when the final ``eval/reward`` is above the initial one and ``eval/accuracy`` is not below
it. Prints a Markdown table (the one in ``examples/README.md``) and writes the numbers as JSON.

The SFT warm-ups that the examples start from are run once, as shipped (seed 0), the way a user
runs them from the examples' header comments; only the RL run's seed varies. Every run is a
separate ``nice -n 19`` process with one torch thread, one at a time::

    python scripts/check_examples.py --workdir /tmp/check-examples
    python scripts/check_examples.py --examples rloo ppo --seeds 0 1 2

A measurement, not a test: it takes minutes per example on one CPU core.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# example file stem -> `alignkit train` method
ONLINE_EXAMPLES: dict[str, str] = {
    "grpo": "grpo",
    "ppo": "ppo",
    "rloo": "rloo",
    "reinforce_pp": "reinforce++",
    "reinforce": "reinforce",
    "safe_ppo": "safe-ppo",
    "grpo_teacher": "grpo",
}

# The warm-ups named in the examples' header comments: (checkpoint they write, train arguments).
WARMUPS: list[tuple[str, list[str]]] = [
    ("runs/sft-sort/checkpoints/step-190/model", ["sft", "-c", str(EXAMPLES / "sft_sort.yaml")]),
    (
        "runs/sft-sort-short/checkpoints/step-19/model",
        ["sft", "-c", str(EXAMPLES / "sft_sort.yaml"), "run_name=sft-sort-short", "epochs=1"],
    ),
    ("runs/sft/checkpoints/step-168/model", ["sft", "-c", str(EXAMPLES / "sft.yaml")]),
]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def _alignkit(args: list[str], workdir: Path, log: Path) -> float:
    """Run ``nice -n 19 python -m alignkit ARGS`` in WORKDIR; returns its wall-clock seconds."""
    command = ["nice", "-n", "19", sys.executable, "-m", "alignkit", *args]
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(command, cwd=workdir, env=_environment(), stdout=out, stderr=out)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}; see {log}")
    return time.perf_counter() - started


def prepare(workdir: Path) -> None:
    """The data and the warm-up checkpoints in WORKDIR (each made only when missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "data" / "sort_prompts.jsonl").is_file():
        _alignkit(["data", "synthetic"], workdir, workdir / "data.log")
    for checkpoint, args in WARMUPS:
        if not (workdir / checkpoint).is_dir():
            name = Path(checkpoint).parts[1]
            # overwrite: a warm-up of the same name with other settings (an older example's)
            args = [*args, "overwrite=true", "logging.progress_bar=false"]
            _alignkit(["train", *args], workdir, workdir / f"{name}.log")


def _evaluations(metrics_file: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return [r for r in records if "eval/reward" in r]


def measure(example: str, seed: int, workdir: Path, out_dir: Path) -> dict[str, Any]:
    """One run of EXAMPLE with SEED into OUT_DIR: held-out reward and accuracy before and after."""
    run_name = f"{example}-seed{seed}"
    args = [
        "train",
        ONLINE_EXAMPLES[example],
        "-c",
        str(EXAMPLES / f"{example}.yaml"),
        f"seed={seed}",
        f"run_name={run_name}",
        f"output_dir={out_dir}",
        "logging.progress_bar=false",
    ]
    seconds = _alignkit(args, workdir, out_dir / f"{run_name}.log")
    iterations = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())["train"]["iterations"]
    evaluations = _evaluations(out_dir / run_name / "metrics.jsonl")
    first, last = evaluations[0], evaluations[-1]
    if first["step"] != 0 or last["step"] != iterations:
        raise SystemExit(
            f"{run_name}: evaluations at steps {[e['step'] for e in evaluations]}, "
            f"expected 0 and {iterations}"
        )
    row = {
        "example": example,
        "seed": seed,
        "iterations": iterations,
        "seconds": round(seconds, 1),
        "run_dir": str(out_dir / run_name),
        "reward": [first["eval/reward"], last["eval/reward"]],
        "accuracy": [first["eval/accuracy"], last["eval/accuracy"]],
    }
    for extra in ("eval/cost", "eval/violation_rate"):
        if extra in first:
            row[extra.split("/")[1]] = [first[extra], last[extra]]
    row["learns"] = bool(
        row["reward"][1] > row["reward"][0] and row["accuracy"][1] >= row["accuracy"][0]
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of README.md: one line per example and seed."""
    lines = [
        "| example | seed | iterations | held-out greedy reward | held-out accuracy | "
        "learns | time (s) | held-out cost, violations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (r0, r1), (a0, a1) = r["reward"], r["accuracy"]
        safety = ""
        if "cost" in r:  # Safe-PPO: the constraint it trades reward for
            (c0, c1), (v0, v1) = r["cost"], r["violation_rate"]
            safety = f"{c0:.3f} -> {c1:.3f}, {v0:.0%} -> {v1:.0%}"
        lines.append(
            f"| `{r['example']}.yaml` | {r['seed']} | {r['iterations']} | {r0:.3f} -> {r1:.3f} | "
            f"{a0:.0%} -> {a1:.0%} | {'yes' if r['learns'] else '**no**'} | {r['seconds']:.0f} | "
            f"{safety} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", choices=list(ONLINE_EXAMPLES), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/alignkit-check-examples"))
    parser.add_argument("--json", type=Path, default=None, help="default: WORKDIR/results.json")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    prepare(workdir)
    # a fresh folder per invocation: a run directory that already holds a run is refused
    out_dir = workdir / "check" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    rows = []
    for example in args.examples or list(ONLINE_EXAMPLES):
        for seed in args.seeds:
            rows.append(measure(example, seed, workdir, out_dir))
            r = rows[-1]
            print(
                f"{example} seed {seed}: reward {r['reward'][0]:.3f} -> {r['reward'][1]:.3f}, "
                f"accuracy {r['accuracy'][0]:.3f} -> {r['accuracy'][1]:.3f} "
                f"({r['seconds']:.0f} s)",
                flush=True,
            )
    out = args.json or workdir / "results.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    print(f"\nwritten: {out}")
    return 0 if all(r["learns"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
