"""The online schedule: iterations of rollout then update, on the shared run lifecycle.

One iteration (DESIGN, "Online RL")::

    prompts   = the next prompts_per_iteration of a seeded shuffle of the prompt file
    exp       = make_experience(prompts)       # rollout, rewards, reference, values, advantages
    (rollout.filter_groups: drop the groups whose rewards are all equal, make_experience on
     more prompts until prompts_per_iteration groups are left, merge_rounds(kept))
    for epoch in range(epochs_per_iteration):
        for minibatch in exp.minibatches(sequences_per_minibatch):
            optimize(minibatch)                # ONE optimizer step, micro-batched under it
    after_iteration(stats)                     # controllers (adaptive KL, ...)

The step counter counts iterations; logging, evaluation and checkpoints happen between them, so
no experience is ever saved. Every random draw of an iteration (the prompt order, the engine's
sampling generator, the mini-batch shuffle) comes from a generator seeded by ``(seed, iteration,
process)`` (and the round of dynamic sampling), so a run resumed at an iteration boundary makes
exactly the draws of the uninterrupted run; the global RNG (dropout is off) is checkpointed by
the run lifecycle. The prompts, the seeded generators and dynamic sampling's rounds live in
``trainers/online_collect.py``; the samples tables, the guards and the batch table in
``trainers/online_reporting.py``.
"""

from __future__ import annotations

import dataclasses
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.rollout import (
    Experience,
    GenerationEngine,
    Prompt,
    SnapshotEngine,
    TransformersEngine,
)
from alignkit.rollout.episodes import EnvironmentRollout, SingleTurnRollout, TextScorer
from alignkit.rollout.reward_functions import RewardLog
from alignkit.rollout.rewards import (
    RewardContext,
    RewardSource,
    RewardState,
    score_with_context,
)
from alignkit.runloop.optimizer import build_lr_scheduler, build_optimizer
from alignkit.runloop.run import RunLoop
from alignkit.runloop.runtime import MetricMeans
from alignkit.trainers.async_rollout import AsyncGeneration
from alignkit.trainers.online_collect import (
    _STREAM_MINIBATCH,
    ExperienceCollection,
    iteration_generator,
)
from alignkit.trainers.online_reporting import OnlineReporting
from alignkit.trainers.rl_config import OnlineConfig, check_batch_settings

__all__ = ["OnlineTrainer", "applicable", "disable_dropout", "iteration_generator"]


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0 (``nn.Dropout`` modules and the float
    ``*dropout`` attributes attention layers read); returns how many were nonzero.

    RL needs it: with dropout on, the PPO ratio is not 1 on the first epoch and the KL is noisy
    (TRL PR #3234). Zeroed rather than relying on eval mode, which the run loop leaves after
    each evaluation.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value:
                setattr(module, name, 0.0)
                changed += 1
    return changed


class OnlineTrainer(ExperienceCollection, OnlineReporting, RunLoop):
    """Iterations of rollout then update; a subclass writes the algorithm:

    - ``make_experience(prompts, group_offset, generator) -> Experience``;
    - ``optimize(minibatch) -> metrics``: one optimizer step (per trained model) on it;
    - ``experience_metrics(exp) -> metrics`` and ``after_iteration(metrics) -> values``.
    """

    primary_model_name: ClassVar[str] = "model"
    progress_metrics: ClassVar[tuple[str, ...]] = ("reward/mean", "response_length/mean")
    # The step counter counts iterations; "epoch" is passes over the prompt file.
    step_label: ClassVar[str] = "iteration"
    epoch_label: ClassVar[str] = "prompt epoch"

    def __init__(
        self,
        config: OnlineConfig,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        reward: RewardSource,
        *,
        engine: GenerationEngine | None = None,
        eval_prompts: Sequence[Prompt] | None = None,
        rollout: SingleTurnRollout | EnvironmentRollout | None = None,
    ) -> None:
        super().__init__(config, model, tokenizer=tokenizer)
        self.config: OnlineConfig = config
        if not prompts:
            raise ValueError("the prompt file has no prompts")
        self.prompts = list(prompts)
        self.eval_prompts = list(eval_prompts or [])
        self.reward = reward
        self.own_engine = engine is None
        staleness = config.rollout.max_staleness
        if engine is None:
            # One update ahead, the engine samples while the trainer's weights change: on a copy.
            engine = (SnapshotEngine if staleness else TransformersEngine)(model, tokenizer)
        elif staleness and not engine.needs_weight_sync:
            raise ConfigError(
                f"rollout.max_staleness: {staleness} samples while the policy updates, which "
                f"{type(engine).__name__} cannot: it reads the trainer's own module"
            )
        self.engine: GenerationEngine = engine
        self.engine_stats: dict[str, float] = {}  # the last batch's (_generation_stats)
        self.async_generation = (
            None
            if staleness is None
            else AsyncGeneration(
                staleness,
                prepare=self._prepare_generation,
                generate=self.generate_experience,
                stats=self._generation_stats,
                autocast=self.accelerator.autocast,
                version=lambda: self.state.step,
            )
        )
        self.sampling = config.rollout.sampling()
        # How an iteration's sequences are made: one completion per sample, or the multi-turn
        # episodes of an environment (which may then score them itself: reward None).
        self.rollout = rollout or SingleTurnRollout()
        self.timings: dict[str, float] = {}
        vllm = config.rollout.engine == "vllm"
        self.sync_every = config.rollout.vllm.sync_every if vllm else 1
        self._engine_version: int | None = None  # the optimizer steps the engine's copy is of
        self._staleness = 0
        self.initial_eval: dict[str, float] = {}
        self._guard_streaks: dict[str, int] = {}
        # Reward functions see a conversational row's prompt as its messages (TRL's contract).
        self._prompt_messages = {
            p.text: p.messages for p in [*self.prompts, *self.eval_prompts] if p.messages
        }
        self.reward_log = RewardLog()  # what reward functions log (log_extra, log_metric)
        disable_dropout(model)

    # ----------------------------------------------------------------- the algorithm

    def make_experience(
        self, prompts: Sequence[Prompt], group_offset: int, generator: torch.Generator
    ) -> Experience:
        """Sample, score and prepare one iteration's sequences (this process' share)."""
        self.engine.set_iteration(self.state.step)  # before the sync: its errors name it
        self.sync_engine()
        with self.timed("rollout"):  # one generate call, or episodes turn by turn
            exp = self.generate_experience(prompts, group_offset, generator)
        self.engine_stats = self._generation_stats()
        return self.complete_experience(exp)

    def _generation_stats(self) -> dict[str, float]:
        """A batch's statistics, read right after it was generated (on the worker thread with
        ``rollout.max_staleness``): the engine's, the rollout's and, for an engine with its own
        copy of the weights, the optimizer steps that copy lagged behind the policy when the
        batch was submitted (``rollout/weight_staleness``; set by the sync before it)."""
        stats = {**self.engine.stats(), **self.rollout.stats()}
        if self.engine.needs_weight_sync:
            stats["rollout/weight_staleness"] = float(self._staleness)
        return stats

    def generate_experience(
        self, prompts: Sequence[Prompt], group_offset: int, generator: torch.Generator
    ) -> Experience:
        """The engine's sequences of `prompts` (unscored). Touches no trainer state: with
        ``rollout.max_staleness`` it runs on the generation worker thread."""
        exp = self.rollout.generate(
            self.engine, prompts, self.sampling, generator=generator, group_offset=group_offset
        )
        return exp.to(self.accelerator.device)

    @abstractmethod
    def complete_experience(self, exp: Experience) -> Experience:
        """Score and prepare freshly sampled sequences for the update (rewards, and whatever
        the algorithm needs: old and reference log-probs, values, advantages)."""

    @abstractmethod
    def optimize(self, minibatch: Experience) -> Mapping[str, Tensor]:
        """One optimizer step on ``minibatch`` (micro-batched); its metrics (0-dim tensors)."""

    def experience_metrics(self, exp: Experience) -> dict[str, Tensor]:
        """Metrics of the rollout itself (0-dim tensors, this process' rows)."""
        return {}

    def merge_rounds(self, exp: Experience) -> Experience:
        """The batch dynamic sampling kept from several rounds of ``make_experience``: redo
        what depends on the whole batch (the policy-gradient trainer's advantages)."""
        return exp

    def after_iteration(self, metrics: Mapping[str, Tensor]) -> dict[str, float]:
        """Update controllers from the iteration's metrics (identical on every process);
        return their values to log."""
        return {}

    # ----------------------------------------------------------------- schedule quantities

    @property
    def minibatches_per_iteration(self) -> int:
        cfg = self.config
        return cfg.rollout.sequences_per_iteration // cfg.sequences_per_minibatch

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return self.config.train.epochs_per_iteration * self.minibatches_per_iteration

    @property
    def local_sequences_per_minibatch(self) -> int:
        return self.config.sequences_per_minibatch // self.accelerator.num_processes

    def build_optimizer_for(self, name: str, model: nn.Module, optim: Any) -> Any:
        """Prepare `model` with a fresh AdamW and its schedule over the whole run; register
        them under `name` (checkpointed) and return the OptimizerStep."""
        optimizer = build_optimizer(model, optim)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        total = self.config.train.iterations * self.optimizer_steps_per_iteration
        scheduler = build_lr_scheduler(optimizer, optim, total)
        return model, self.add_optimizer(name, model, optimizer, scheduler)

    # ----------------------------------------------------------------- RunLoop's hooks

    def train(self) -> dict[str, Any]:
        """The run (see ``RunLoop.train``); the engine's servers, if it started any, are
        stopped when it ends, normally or by an error."""
        try:
            return super().train()
        finally:
            if self.async_generation is not None:
                self.async_generation.close()
            self.engine.close()

    def _prepare_training(self) -> None:
        cfg = self.config
        check_batch_settings(cfg, self.accelerator.num_processes)
        self.model, self.policy_step = self.build_optimizer_for("model", self.model, cfg.optim)
        self.engine.sync_weights(self.model)
        self.total_steps = cfg.train.iterations
        self._print_batch_table()

    def _data_order_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "num_processes": self.accelerator.num_processes,
            "seed": cfg.seed,
            "prompts": len(self.prompts),
            "prompts_per_iteration": cfg.rollout.prompts_per_iteration,
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "sequences_per_minibatch": cfg.sequences_per_minibatch,
            "sequences_per_device": cfg.train.sequences_per_device,
            "epochs_per_iteration": cfg.train.epochs_per_iteration,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"initial_eval": dict(self.initial_eval)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.initial_eval = dict(state.get("initial_eval", {}))

    def _summary_fields(self) -> dict[str, Any]:
        return {"initial_eval": dict(self.initial_eval)}

    def _record_fields(self) -> dict[str, float]:
        return {"epoch": self.prompt_epoch}

    @property
    def prompt_epoch(self) -> float:
        """Passes over the prompt file made by the iterations done (TRL's ``epoch``)."""
        return self.state.step * self.config.rollout.prompts_per_iteration / len(self.prompts)

    def _run(self) -> None:
        state, acc = self.state, self.accelerator
        self.model.train()
        if state.step == 0 and self._has_evaluation():
            # The starting point, so that a run shows its own before/after (logged at step 0).
            self.initial_eval = self._run_evaluation()
            for sink in self.sinks:
                sink.log(0, dict(self.initial_eval))
        while state.step < self.total_steps and state.stop_reason is None:
            iteration = state.step
            self.timings = {}
            started = time.perf_counter()
            with acc.autocast():  # rollout, rewards, reference, values: the run's precision
                exp, filtering = self.collect_experience(iteration)
            stats = self.experience_metrics(exp)
            with self.timed("update"):
                updates = self.update(exp, iteration)
            means = MetricMeans()
            means.add(stats, acc.device)
            metrics = {**means.mean_across_processes(acc), **updates}
            values = self.after_iteration(metrics)
            self._guards(metrics)
            if self.throughput is not None:
                self.throughput.add(exp.attention_mask.sum(), self.iteration_flops(exp))
            if (iteration + 1) % self.config.train.samples_every == 0 or iteration == 0:
                self.write_samples(exp, iteration + 1)
            self.timings["iteration"] = time.perf_counter() - started
            values = {
                "lr": self.policy_step.scheduler.get_last_lr()[0],
                **filtering,
                **values,
                **{f"timing/{name}": seconds for name, seconds in self.timings.items()},
            }
            if self.end_step(metrics, values):
                break
        if state.stop_reason is None:
            state.stop_reason = "iterations"

    def update(self, exp: Experience, iteration: int) -> dict[str, Tensor]:
        """``epochs_per_iteration`` passes of mini-batches, one optimizer step each."""
        generator = iteration_generator(
            self.config.seed, iteration, _STREAM_MINIBATCH, self.accelerator.process_index
        )
        means = MetricMeans()
        for _ in range(self.config.train.epochs_per_iteration):
            for minibatch in exp.minibatches(self.local_sequences_per_minibatch, generator):
                means.add(self.optimize(minibatch), self.accelerator.device)
        return means.mean_across_processes(self.accelerator)

    def iteration_flops(self, exp: Experience) -> Tensor | float | None:
        """Model FLOPs of the policy in an iteration (``runloop.flops``), for ``mfu``: sampling
        (each prompt prefilled once, each response token decoded through the LM head) and the
        update (every token, ``epochs_per_iteration`` times, the LM head on the responses). The
        scoring passes (old and reference log-probs, reward and value models) are left out."""
        if self.model_flops is None:
            return None
        response = exp.response_mask.sum()
        prompt = (exp.attention_mask.sum() - response) / self.config.rollout.samples_per_prompt
        epochs = self.config.train.epochs_per_iteration
        sampling = self.model_flops.inference(prompt + response, response)
        return sampling + self.model_flops.training(
            epochs * exp.attention_mask.sum(), epochs * response
        )

    # ----------------------------------------------------------------- engine and evaluation

    @property
    def policy_version(self) -> int:
        """Optimizer steps taken so far (the policy changes once per step)."""
        return self.state.step * self.optimizer_steps_per_iteration

    def sync_engine(self, *, force: bool = False) -> None:
        """An engine with its own copy of the weights gets the policy before it generates, once
        its copy is ``rollout.vllm.sync_every`` optimizer steps behind (``force``, for
        evaluation: whenever behind). Nothing is generated between the optimizer steps of one
        iteration, so pushing after each of them would send weights no rollout reads."""
        if not self.engine.needs_weight_sync:
            return
        version = self.policy_version
        behind = None if self._engine_version is None else version - self._engine_version
        if behind is None or behind >= self.sync_every or (force and behind > 0):
            with self.timed("weight_sync"):
                self.engine.sync_weights(self.model)
            self._engine_version = version
        self._staleness = version - self._engine_version

    def _has_evaluation(self) -> bool:
        scored = self.reward is not None or isinstance(self.rollout, EnvironmentRollout)
        return bool(self.eval_prompts) and scored

    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the held-out prompts: mean reward, and accuracy = the share
        that earn the full reward (>= 1, the exact answer of a verifiable task)."""
        scores = applicable(self.score_eval_generations(self.reward))
        return {
            "eval/reward": float(scores.mean()),
            "eval/accuracy": float((scores >= 1).float().mean()),
        }

    def score_eval_generations(self, *sources: RewardSource) -> Tensor:
        """``[len(sources), N]``: each source's scores of one greedy completion per held-out
        prompt (generated once, all prompts in one batch)."""
        if self.async_generation is not None:
            self.async_generation.quiesce()  # the worker must be idle while the weights move
        self.sync_engine(force=True)
        greedy = dataclasses.replace(self.sampling, samples_per_prompt=1, temperature=0.0)
        exp = self.rollout.evaluate(self.engine, self.eval_prompts, greedy)
        scorer = self.text_scorer(exp, training=False)
        return torch.stack([self.rollout.score(exp, source, scorer) for source in sources])

    # ----------------------------------------------------------------- helpers

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timing/<stage>`` of this iteration."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started

    def reward_context(self, exp: Experience, *, training: bool = True) -> RewardContext:
        """What reward functions get besides texts and columns (``rollout.rewards``): the
        prompts as the data gave them, the sampled ids, the run's state and, in a training
        iteration, the hooks whose values reach the samples table and the metrics."""
        ids, lengths = exp.input_ids[:, exp.prompt_width :].tolist(), exp.response_lengths
        context = RewardContext(
            prompts=[self._prompt_messages.get(text, text) for text in exp.prompts],
            completion_ids=[row[:n] for row, n in zip(ids, lengths.tolist(), strict=True)],
            trainer_state=RewardState(
                self.state.step, self.config.train.iterations, self.prompt_epoch
            ),
        )
        if training:
            hooks = self.reward_log.hooks(self.state.step, exp.group_index.tolist())
            context.log_extra, context.log_metric = hooks
        return context

    def score(
        self,
        source: RewardSource,
        exp: Experience,
        *,
        training: bool = True,
        completions: Sequence[str] | None = None,
    ) -> Tensor:
        """``source``'s ``[N]`` scores of `exp` (or of its rows with other ``completions``: an
        episode's last answer), reward functions called with TRL's arguments
        (:meth:`reward_context`)."""
        context = self.reward_context(exp, training=training)
        texts = exp.completions if completions is None else list(completions)
        return score_with_context(source, exp.prompts, texts, exp.row_fields, context)

    def text_scorer(self, exp: Experience, *, training: bool = True) -> TextScorer:
        """:meth:`score` as a rollout's ``score_texts(source, completions)``."""
        return lambda source, texts: self.score(source, exp, training=training, completions=texts)


def applicable(scores: Tensor) -> Tensor:
    """The scores that are not NaN ("not applicable")."""
    return scores[torch.isfinite(scores)]
