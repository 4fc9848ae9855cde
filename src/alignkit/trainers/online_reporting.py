"""What an online run tells its user besides the metrics: ``samples/iteration-N.jsonl`` (every
sequence's prompt, completion and reward), the warnings when learning has silently stopped, and
the table of batch quantities at the start.

:class:`OnlineReporting` is the part of :class:`~alignkit.trainers.online.OnlineTrainer` that
does this; it reads the trainer's config, run directory, state and reward log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from rich.table import Table
from torch import Tensor

from alignkit.rollout import Experience
from alignkit.tracking.io import atomic_write_text

__all__ = ["OnlineReporting"]

# Warn when a guard's condition has held this many iterations in a row.
_GUARD_PATIENCE = 3
_GUARD_THRESHOLD = 0.95


class OnlineReporting:
    """Samples tables, guard warnings and the batch table of an online run (see the module
    doc)."""

    def write_samples(self, exp: Experience, iteration: int) -> None:
        """``samples/iteration-N.jsonl``: every sequence's prompt, completion and reward (and
        the columns reward functions added with ``log_extra``), of every process."""
        scores = exp.scores.float().cpu().tolist()
        groups = exp.group_index.tolist()
        rows = [
            {
                "iteration": iteration,
                "group": int(g),
                "prompt": p,
                "completion": c,
                "reward": None if math.isnan(s) else s,
                "truncated": bool(t),
                **logged,
            }
            for p, c, s, g, t, logged in zip(
                exp.prompts,
                exp.completions,
                scores,
                groups,
                exp.truncated.tolist(),
                self.reward_log.columns(self.state.step, groups),
                strict=True,
            )
        ]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)  # every process calls: write_samples runs on all
        if not self.accelerator.is_main_process:
            return
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        path = self.run_dir.root / "samples" / f"iteration-{iteration:06d}.jsonl"
        atomic_write_text(path, "\n".join(lines) + "\n")

    def _guards(self, metrics: Mapping[str, Tensor]) -> None:
        """Warn loudly when learning has silently stopped (research/online-rl.md section 2)."""
        checks = {
            "response_length/clipped_ratio": (
                "of the completions hit max_new_tokens: rewards of cut-off answers are usually "
                "0, so nothing is learnt; raise rollout.max_new_tokens"
            ),
            "reward/zero_std_frac": (
                "of the groups have the same reward for every sample: their advantages are 0; "
                "make the task easier (SFT warm-up), raise samples_per_prompt, or check the "
                "reward function"
            ),
        }
        for name, advice in checks.items():
            if name not in metrics:
                continue
            value = float(metrics[name])
            streak = self._guard_streaks.get(name, 0) + 1 if value >= _GUARD_THRESHOLD else 0
            self._guard_streaks[name] = streak
            if streak == _GUARD_PATIENCE:
                self._say(
                    f"WARNING iteration {self.state.step + 1}: {value:.0%} {advice} "
                    f"({name} >= {_GUARD_THRESHOLD} for {streak} iterations)"
                )

    def _print_batch_table(self) -> None:
        if not self.accelerator.is_main_process or not self.config.logging.progress_bar:
            return
        cfg = self.config
        table = Table(title="online batch quantities", show_header=False)
        rows = [
            ("prompts per iteration", cfg.rollout.prompts_per_iteration),
            ("samples per prompt", cfg.rollout.samples_per_prompt),
            ("sequences per iteration", cfg.rollout.sequences_per_iteration),
            ("sequences per optimizer step", cfg.sequences_per_minibatch),
            ("sequences per forward (per process)", cfg.train.sequences_per_device),
            (
                "micro-batches per optimizer step (per process)",
                self.local_sequences_per_minibatch // cfg.train.sequences_per_device,
            ),
            ("optimizer steps per iteration", self.optimizer_steps_per_iteration),
            ("processes", self.accelerator.num_processes),
            ("iterations", cfg.train.iterations),
        ]
        for label, value in rows:
            table.add_row(label, str(value))
        self.console.print(table)
