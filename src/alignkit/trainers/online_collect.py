"""Which prompts an online iteration samples and the experience it collects from them.

Every random draw of an iteration comes from :func:`iteration_generator`, a generator seeded by
``(seed, iteration, stream, process)`` (and the round of dynamic sampling) only, so a run resumed
at an iteration boundary makes exactly the draws of the uninterrupted run. An iteration's
prompts walk through seeded permutations of the prompt file (``iteration_prompts``); with
``rollout.filter_groups`` (DAPO's dynamic sampling) extra rounds of prompts (``round_prompts``)
are sampled until enough groups are informative (``collect_experience``).

:class:`ExperienceCollection` is the part of :class:`~alignkit.trainers.online.OnlineTrainer`
that does this; it calls the trainer's ``make_experience`` and ``merge_rounds``.
"""

from __future__ import annotations

import numpy as np
import torch

from alignkit.ops.shaping import informative_groups
from alignkit.rollout import Experience, Prompt

__all__ = ["ExperienceCollection", "iteration_generator"]

#: The streams of :func:`iteration_generator` (fixed: a resumed run must draw the same).
_STREAM_PROMPTS, _STREAM_ROLLOUT, _STREAM_MINIBATCH, _STREAM_ROUND_PROMPTS = 0, 1, 2, 3


def iteration_generator(
    seed: int, iteration: int, stream: int, process: int = 0, round_: int = 0
) -> torch.Generator:
    """A CPU generator seeded by ``(seed, iteration, stream, process)`` only (and ``round_``,
    the round of dynamic sampling, when > 0)."""
    entropy = [seed, iteration, stream, process, *([round_] if round_ else [])]
    state = np.random.SeedSequence(entropy).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class ExperienceCollection:
    """The prompts and the experience of an online iteration (see the module doc)."""

    def collect_experience(self, iteration: int) -> tuple[Experience, dict[str, float]]:
        """This process' experience of `iteration`, and dynamic sampling's counts.

        With ``rollout.filter_groups`` the groups whose rewards are all equal are dropped and
        rounds of ``prompts_per_iteration`` more prompts (``round_prompts``) are sampled until
        every process has its share of informative groups, or ``filter_max_rounds`` extra
        rounds were made; a shortfall is filled with dropped groups (zero advantages). Every
        process makes every round, so the collective operations inside ``make_experience``
        stay in step. Logged: ``rollout/filter_rounds`` (extra rounds), ``rollout/
        filtered_groups`` (groups dropped, all processes) and ``rollout/filter_shortfall``.
        """
        if self.async_generation is not None:
            return self._take_generated(iteration)
        acc = self.accelerator
        seed, rounds = self.config.seed, self.config.rollout.extra_filter_rounds
        prompts, offset = self.iteration_prompts(iteration)
        rng = iteration_generator(seed, iteration, _STREAM_ROLLOUT, acc.process_index)
        exp = self.make_experience(prompts, offset, rng)
        if not rounds:
            return exp, {}
        share, parts = len(prompts), [exp]
        made = 0
        while True:
            pool = Experience.cat(parts)
            informative = informative_groups(pool.scores, pool.group_index)
            found = pool.group_index[informative].unique().numel()
            missing = self._global_sum(max(share - found, 0))
            if missing == 0 or made == rounds:
                break
            made += 1
            prompts, offset = self.round_prompts(iteration, made)
            rng = iteration_generator(seed, iteration, _STREAM_ROLLOUT, acc.process_index, made)
            parts.append(self.make_experience(prompts, offset, rng))
        # Group ids grow with the round and the prompt: sorted ids are generation order.
        good = pool.group_index[informative].unique()
        groups = pool.group_index.unique()
        poor = groups[~torch.isin(groups, good)]
        chosen = torch.cat([good[:share], poor[: max(share - good.numel(), 0)]])
        exp = self.merge_rounds(pool.select(torch.isin(pool.group_index, chosen).nonzero()[:, 0]))
        return exp, {
            "rollout/filter_rounds": float(made),
            "rollout/filtered_groups": self._global_sum(poor.numel()),
            "rollout/filter_shortfall": float(missing),
        }

    def _take_generated(self, iteration: int) -> tuple[Experience, dict[str, float]]:
        """``rollout.max_staleness``: the worker's batch of `iteration` (``async_rollout``),
        completed on this thread; its staleness in iterations of updates is logged."""
        assert self.async_generation is not None
        generated, waited = self.async_generation.take(iteration, self.total_steps - 1)
        self.timings["rollout"] = generated.seconds  # on the worker, overlapping the update
        self.timings["rollout_wait"] = waited
        self.engine_stats = generated.engine_stats
        exp = self.complete_experience(generated.exp)
        return exp, {"rollout/policy_staleness": float(iteration - generated.version)}

    def _prepare_generation(self, iteration: int) -> tuple[list[Prompt], int, torch.Generator]:
        """On the main thread, before the worker samples `iteration`: its prompts, group
        offset and generator (the synchronous path's), and the engine synced."""
        prompts, offset = self.iteration_prompts(iteration)
        process = self.accelerator.process_index
        generator = iteration_generator(self.config.seed, iteration, _STREAM_ROLLOUT, process)
        self.engine.set_iteration(iteration)
        self.sync_engine()
        return prompts, offset, generator

    def round_prompts(self, iteration: int, round_: int) -> tuple[list[Prompt], int]:
        """This process' prompts of dynamic sampling's extra round `round_` (>= 1) and the
        group id of the first: ``prompts_per_iteration`` draws of a permutation seeded by
        ``(seed, iteration, round_)`` only, so a resumed run draws the same. Group ids follow
        every id of the run's first rounds, so they never collide."""
        per_iteration = self.config.rollout.prompts_per_iteration
        share = per_iteration // self.accelerator.num_processes
        first = self.accelerator.process_index * share
        generator = iteration_generator(
            self.config.seed, iteration, _STREAM_ROUND_PROMPTS, 0, round_
        )
        order = torch.randperm(len(self.prompts), generator=generator).tolist()
        chosen = [self.prompts[order[k % len(order)]] for k in range(first, first + share)]
        total = self.config.train.iterations * per_iteration
        return chosen, total * round_ + iteration * per_iteration + first

    def _global_sum(self, count: int) -> float:
        """`count` summed over the processes (an all-reduce: every process calls)."""
        if self.accelerator.num_processes == 1:
            return float(count)
        total = torch.tensor(float(count), device=self.accelerator.device)
        return float(self.accelerator.reduce(total, reduction="sum"))

    def iteration_prompts(self, iteration: int) -> tuple[list[Prompt], int]:
        """This process' prompts of `iteration` and the global index of the first.

        Position k = iteration * prompts_per_iteration + j walks through epochs of the prompt
        file, each a permutation seeded by (seed, epoch): resumable from the iteration alone.
        """
        per_iteration = self.config.rollout.prompts_per_iteration
        size = len(self.prompts)
        start = iteration * per_iteration
        share = per_iteration // self.accelerator.num_processes
        first = start + self.accelerator.process_index * share
        chosen = []
        orders: dict[int, list[int]] = {}
        for k in range(first, first + share):
            epoch = k // size
            if epoch not in orders:
                generator = iteration_generator(self.config.seed, epoch, _STREAM_PROMPTS)
                orders[epoch] = torch.randperm(size, generator=generator).tolist()
            chosen.append(self.prompts[orders[epoch][k % size]])
        return chosen, first
