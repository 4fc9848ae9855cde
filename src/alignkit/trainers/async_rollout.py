"""Asynchronous generation (``rollout.max_staleness``): the next batch is sampled while this one
trains.

With ``max_staleness: 1`` (one-step off-policy, as verl's one-step-off and TRL's async modes)::

    iteration i:   raw_i   = wait for the worker             # sampled by the policy after i-1 updates
                   sync the engine; submit generate(i+1)     # the worker samples with the policy after i
                   exp_i   = complete(raw_i)                 # rewards, old log-probs, reference, ...
                   update(exp_i)                             # runs while the worker generates

so every batch is trained by a policy at most one update newer than the one that sampled it
(``rollout/policy_staleness``). The trainer re-scores it with the current policy (pi_old) and
weighs it by ``rollout.correction`` against the sampler, exactly as for any other sampler that
is not the trainer. With ``max_staleness: 0`` the same code runs without overlap (the worker
samples batch i after update i-1, the trainer waits for it): it reproduces the synchronous run
to the last bit, which is what the test of this module checks.

Only the worker thread calls ``engine.generate``; everything that reads or writes the trainer's
weights (the weight sync, scoring, the update, evaluation) stays on the main thread, and the
worker is idle whenever the engine's weights change. An engine that reads the trainer's module
itself (``needs_weight_sync`` False) cannot sample the previous policy during an update: with
``max_staleness: 1`` the in-process engine runs on its own copy (``rollout.SnapshotEngine``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from alignkit.rollout import Experience, Prompt

__all__ = ["AsyncGeneration", "Generated"]


@dataclass
class Generated:
    """One batch from the worker: the raw experience (unscored), the policy version that
    sampled it (iterations of updates in the engine's weights), the worker's seconds and the
    engine's (and the rollout's) statistics of that batch."""

    exp: Experience
    version: int
    seconds: float
    engine_stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Pending:
    iteration: int
    future: Future[Generated]


class AsyncGeneration:
    """One worker thread and at most one batch in flight (see the module docstring).

    Args:
        max_staleness: 0 (the asynchronous path without overlap) or 1.
        prepare: ``prepare(iteration)`` on the main thread before a batch is submitted: the
            iteration's prompts, group offset and generator, after the engine was synced.
        generate: ``generate(prompts, offset, generator)`` on the worker: the rollout (one
            engine call, or an environment's episodes).
        stats: the batch's statistics (the engine's and the rollout's), read on the worker
            right after ``generate``.
        autocast: the run's autocast context factory (autocast is per thread).
        version: the current policy version (iterations of updates), read at submission.
    """

    def __init__(
        self,
        max_staleness: int,
        *,
        prepare: Callable[[int], tuple[list[Prompt], int, torch.Generator]],
        generate: Callable[[list[Prompt], int, torch.Generator], Experience],
        stats: Callable[[], dict[str, float]],
        autocast: Callable[[], AbstractContextManager],
        version: Callable[[], int],
    ) -> None:
        if max_staleness not in (0, 1):
            raise ValueError(f"max_staleness must be 0 or 1, got {max_staleness}")
        self.max_staleness = max_staleness
        self._prepare, self._generate, self._stats = prepare, generate, stats
        self._autocast, self._version = autocast, version
        self._pool: ThreadPoolExecutor | None = None
        self._pending: _Pending | None = None

    def take(self, iteration: int, last_iteration: int) -> tuple[Generated, float]:
        """Iteration `iteration`'s batch and the seconds the main thread waited for it; with
        ``max_staleness: 1`` the next iteration's batch is submitted before returning (unless
        `iteration` is the run's last)."""
        pending = self._pending
        if pending is None or pending.iteration != iteration:
            self.drain()  # a batch of another iteration (a resumed or restarted loop)
            pending = self._submit(iteration)
        self._pending = None
        started = time.perf_counter()
        generated = pending.future.result()  # the worker's error, if any, is raised here
        waited = time.perf_counter() - started
        if self.max_staleness >= 1 and iteration < last_iteration:
            self._submit(iteration + 1)
        return generated, waited

    def drain(self) -> None:
        """Wait for the batch in flight (if any) and drop it; the engine is idle afterwards.
        Called before the engine's weights change outside ``take`` (evaluation's sync) and at
        the end of the run. A failed batch's error is raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.future.result()

    def quiesce(self) -> None:
        """Wait for the batch in flight to be generated, keeping it (the engine is idle)."""
        if self._pending is not None:
            self._pending.future.exception()  # waits; the error stays for take()

    def close(self) -> None:
        """Drop the batch in flight (errors included: the run is ending) and stop the worker."""
        if self._pending is not None:
            self._pending.future.exception()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _submit(self, iteration: int) -> _Pending:
        prompts, offset, generator = self._prepare(iteration)  # main thread: syncs the engine
        version = self._version()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-rollout")

        def work() -> Generated:
            started = time.perf_counter()
            with self._autocast():
                exp = self._generate(prompts, offset, generator)
            stats = dict(self._stats())
            return Generated(exp, version, time.perf_counter() - started, stats)

        self._pending = _Pending(iteration, self._pool.submit(work))
        return self._pending
