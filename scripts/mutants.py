"""Targeted mutation testing: does the test suite notice when a formula or option breaks?

Each mutation replaces one exact piece of source text (its *anchor*) in a scratch copy of
``src/``, runs the tests that should notice, and is reported as

- ``caught``: the tests failed (what we want),
- ``SURVIVED``: the tests passed with the mutation in place (a test gap),
- ``anchor missing``: the anchor text is no longer in the file (the code moved or changed:
  update the entry), never counted as caught.

Usage (from the repository root, not part of CI; about 10 minutes for the whole list)::

    make mutants                                  # every mutation
    .venv/bin/python scripts/mutants.py k1 gae    # those whose name contains k1 or gae
    .venv/bin/python scripts/mutants.py --list

To add one: append a ``Mutation`` with a short name, the file under ``src/alignkit``, the exact
text to replace (unique in that file) and its replacement, and the tests that must catch it.
Exit status: 0 when every selected mutation is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to src/alignkit
    anchor: str  # exact text, unique in the file
    replacement: str
    tests: tuple[str, ...]  # pytest arguments (paths, -k expressions)


MUTATIONS: list[Mutation] = [
    # ----------------------------------------------------------------------------- formulas
    Mutation(
        "logit shift",
        "ops/logprobs.py",
        "predicts[..., :-1] = response_mask[..., 1:] != 0",
        "predicts[..., :-1] = response_mask[..., :-1] != 0",
        ("tests/ops/test_logprobs.py",),
    ),
    Mutation(
        "k1 sign",
        "ops/kl.py",
        "def _k1(log_ratio: Tensor) -> Tensor:\n    return log_ratio",
        "def _k1(log_ratio: Tensor) -> Tensor:\n    return -log_ratio",
        ("tests/ops/test_kl.py",),
    ),
    Mutation(
        "k2 factor",
        "ops/kl.py",
        "return 0.5 * log_ratio.square()",
        "return log_ratio.square()",
        ("tests/ops/test_kl.py",),
    ),
    Mutation(
        "k3 drops -x",
        "ops/kl.py",
        "return (torch.expm1(x) - x).clamp(0.0, _K3_MAX)",
        "return torch.expm1(x).clamp(0.0, _K3_MAX)",
        ("tests/ops/test_kl.py",),
    ),
    Mutation(
        "IPO target 1/beta",
        "ops/preference.py",
        "return (h - 1.0 / (2.0 * beta)).square()",
        "return (h - 1.0 / beta).square()",
        ("tests/ops/test_preference.py", "tests/trainers/test_dpo.py", "-k", "ipo"),
    ),
    Mutation(
        "GAE recursion drops the discount",
        "ops/advantages.py",
        "carry = torch.where(valid[:, t], x[:, t] + discount * carry, carry)",
        "carry = torch.where(valid[:, t], x[:, t] + carry, carry)",
        ("tests/ops/test_advantages.py",),
    ),
    Mutation(
        "Lagrange update sign",
        "ops/lagrange.py",
        "new_log = self._log_value + self.lr * self._value * self._j_c_ema",
        "new_log = self._log_value - self.lr * self._value * self._j_c_ema",
        ("tests/ops/test_lagrange.py",),
    ),
    Mutation(
        "Lagrange update without lambda",
        "ops/lagrange.py",
        "new_log = self._log_value + self.lr * self._value * self._j_c_ema",
        "new_log = self._log_value + self.lr * self._j_c_ema",
        ("tests/ops/test_lagrange.py",),
    ),
    # ----------------------------------------------------------------------------- registries
    Mutation(
        "gae adapter swaps gamma and lambda",
        "ops/advantages.py",
        "return gae(token_rewards, values, mask, gamma, lam)",
        "return gae(token_rewards, values, mask, lam, gamma)",
        ("tests/ops/test_advantages.py", "tests/ops/test_advantage_adapters.py"),
    ),
    Mutation(
        "grpo adapter without std",
        "ops/advantages.py",
        "grpo_advantages(scores, group_index, norm_by_std=True), mask)",
        "grpo_advantages(scores, group_index, norm_by_std=False), mask)",
        ("tests/ops/test_advantages.py", "tests/ops/test_advantage_adapters.py"),
    ),
    Mutation(
        "dr_grpo adapter with std",
        "ops/advantages.py",
        "grpo_advantages(scores, group_index, norm_by_std=False), mask)",
        "grpo_advantages(scores, group_index, norm_by_std=True), mask)",
        ("tests/ops/test_advantages.py", "tests/ops/test_advantage_adapters.py"),
    ),
    Mutation(
        "rloo adapter is grpo",
        "ops/advantages.py",
        "_broadcast_outcome(rloo_advantages(scores, group_index), mask)",
        "_broadcast_outcome(grpo_advantages(scores, group_index), mask)",
        ("tests/ops/test_advantages.py", "tests/ops/test_advantage_adapters.py"),
    ),
    Mutation(
        "reinforce adapter without normalising",
        "ops/advantages.py",
        "return _normalise_returns(returns, mask.bool(), moments=moments), returns",
        "return returns, returns",
        ("tests/ops/test_advantages.py", "tests/ops/test_advantage_adapters.py"),
    ),
    Mutation(
        "reinforce_pp adapter without whitening",
        "ops/advantages.py",
        "return _whiten_returns(returns, mask.bool(), moments), returns",
        "return returns, returns",
        ("tests/ops/test_advantages.py", "tests/ops/test_advantage_adapters.py"),
    ),
    Mutation(
        "length policy keeps the prompt's start",
        "data/tokenize.py",
        "return ids[len(ids) - keep :]",
        "return ids[:keep]",
        ("tests/data/test_tokenize.py",),
    ),
    # ----------------------------------------------------------------------------- reference cache
    Mutation(
        "cache key without the weights",
        "trainers/dpo.py",
        "digest.update(weights_digest(self.accelerator.unwrap_model(reference)).encode())",
        "pass",
        ("tests/trainers/test_reference_cache.py",),
    ),
    Mutation(
        "cache key without the mixed precision",
        "trainers/dpo.py",
        "digest.update(repr((*settings, cfg.precision)).encode())",
        "digest.update(repr(settings).encode())",
        ("tests/trainers/test_reference_cache.py",),
    ),
    Mutation(
        "cache key without the data",
        "trainers/dpo.py",
        '                for key in ("prompt_ids", "chosen_ids", "rejected_ids"):\n'
        "                    digest.update(repr(example[key]).encode())",
        '                for key in ("prompt_ids", "chosen_ids", "rejected_ids"):\n'
        "                    pass",
        ("tests/trainers/test_reference_cache.py",),
    ),
    Mutation(
        "overwrite keeps the cache",
        "tracking/run_dir.py",
        "for path in (*derived, self.root / self.REFERENCE_CACHE):",
        "for path in derived:",
        ("tests/trainers/test_reference_cache.py",),
    ),
    # ----------------------------------------------------------------------------- options
    Mutation(
        "separate reference model ignored",
        "trainers/dpo.py",
        "        if self.config.reference:\n",
        "        if False:\n",
        ("tests/trainers/test_reference_cache.py", "-k", "separate"),
    ),
    Mutation(
        "Safe-DPO normalize always on",
        "trainers/safe_dpo.py",
        "loss_s, self.multiplier.value, self.config.normalize)",
        "loss_s, self.multiplier.value, True)",
        ("tests/trainers/test_safe_dpo_options.py",),
    ),
    Mutation(
        "lambda.preference=implicit_reward ignored",
        "trainers/safe_dpo.py",
        'if settings.preference == "implicit_reward":',
        "if False:",
        ("tests/trainers/test_safe_dpo_options.py",),
    ),
    Mutation(
        "packed examples attend to each other",
        "data/packing.py",
        "attention = causal & same_example & real[:, :, None]",
        "attention = causal & real[:, :, None]",
        ("tests/trainers/test_sft_packing.py",),
    ),
    Mutation(
        "resume: an allowed lr change is not applied",
        "runloop/run.py",
        'rescale_learning_rate(self.optimizer_steps, change["from"], change["to"])',
        "pass",
        ("tests/trainers/test_resume_changes.py",),
    ),
    Mutation(
        "resume: config.yaml stores resume_from",
        "runloop/resume.py",
        "return dataclasses.replace(cfg, resume_from=None, overwrite=False, allow_change=[])",
        "return cfg",
        ("tests/trainers/test_resume_changes.py",),
    ),
    Mutation(
        "cost model kind not checked",
        "models/reward.py",
        "        if saved == kind:\n",
        "        if saved is not None:\n",
        ("tests/models/test_model_kind.py",),
    ),
    Mutation(
        "LoRA base seed not restored",
        "models/loading.py",
        'seed = int(record.get("seed", seed))',
        "pass",
        ("tests/models/test_lora_base.py",),
    ),
]


def apply(mutation: Mutation, src: Path) -> str | None:
    """Apply `mutation` under `src`; None if done, else why not."""
    path = src / "alignkit" / mutation.file
    if not path.is_file():
        return "anchor missing (no such file)"
    text = path.read_text(encoding="utf-8")
    count = text.count(mutation.anchor)
    if count != 1:
        return "anchor missing" if count == 0 else f"anchor ambiguous ({count} matches)"
    path.write_text(text.replace(mutation.anchor, mutation.replacement), encoding="utf-8")
    return None


def run(mutation: Mutation, python: str) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="alignkit-mutant-") as scratch:
        src = Path(scratch) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        problem = apply(mutation, src)
        if problem is not None:
            return problem, 0.0
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return "caught (timeout)", time.perf_counter() - started
        seconds = time.perf_counter() - started
        if done.returncode == 0:
            return "SURVIVED", seconds
        if done.returncode == 1:
            return "caught", seconds
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:]  # collection error etc.
        return f"caught (pytest exit {done.returncode}: {' '.join(tail)[:80]})", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run mutations whose name contains any of these")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [
        m
        for m in MUTATIONS
        if not args.names or any(n.lower() in m.name.lower() for n in args.names)
    ]
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.file}")
        return 0
    width = max(len(m.name) for m in chosen)
    results = []
    for mutation in chosen:
        outcome, seconds = run(mutation, sys.executable)
        results.append(outcome)
        print(f"{mutation.name:{width}s}  {outcome:14s}  {seconds:6.1f}s", flush=True)
    caught = sum(r.startswith("caught") for r in results)
    print(f"\n{caught}/{len(results)} caught", end="")
    others = [r for r in results if not r.startswith("caught")]
    print(f"; {len(others)} survived or missing their anchor" if others else "")
    return 0 if not others else 1


if __name__ == "__main__":
    sys.exit(main())
