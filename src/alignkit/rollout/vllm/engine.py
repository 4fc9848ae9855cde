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

Capabilities (for the trainer's engine contract):

- ``samples_policy(sampling)``: the draw follows the policy at temperature T when top-k and top-p
  are off (in the engine's dtype: a bf16 server samples a slightly different distribution);
- ``behaviour_logprobs_exact``: behaviour log-probs equal the trainer's to float round-off only
  when both run in float32 (measured < 1e-6 on tiny-hd64, < 1e-4 on SmolLM2-135M); otherwise
  the trainer must re-score and correct;
- ``needs_weight_push``: True; ``sync_weights(model)`` pushes, resets the prefix caches and runs
  the sync probe (``rollout.vllm.probe``), which raises on stale or wrong weights.

Reproducibility: the same generator state gives the same seeds; where vLLM is deterministic (one
server, or several: the seed, not the server, fixes a sample's noise; batch composition can
still change float round-off in the logits) the same samples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.rollout.engine import assemble_experience, pad_prompts, unwrap_for_generation
from alignkit.rollout.experience import Experience
from alignkit.rollout.prompts import Prompt
from alignkit.rollout.sampling import SamplingConfig
from alignkit.rollout.vllm.client import Completion, VLLMClient, VLLMError
from alignkit.rollout.vllm.probe import SyncProbe, default_probe_bounds
from alignkit.rollout.vllm.server import VLLMServer, VLLMSettings, open_servers
from alignkit.rollout.vllm.sync import FileWeightSync, LoRAAdapterSync, WeightSync

__all__ = ["VLLMEngine"]

_SEED_RANGE = 2**31 - 2**16  # vLLM adds the sample index to a request's seed


class VLLMEngine:
    """Generation through vLLM servers (see the module docstring).

    Args:
        clients: one per server (several = data-parallel).
        tokenizer: the policy's tokenizer (pad and EOS ids, decoding the completions).
        sync: how weights reach the servers.
        probe: the sync probe; None switches verification off (not recommended).
        engine_dtype, trainer_dtype: the dtypes the two sides compute in.
        servers: processes this engine started (stopped by :meth:`close`).
    """

    needs_weight_push = True

    def __init__(
        self,
        clients: Sequence[VLLMClient],
        tokenizer: PreTrainedTokenizerBase,
        *,
        sync: WeightSync,
        probe: SyncProbe | None,
        engine_dtype: str,
        trainer_dtype: str,
        servers: Sequence[VLLMServer] = (),
        max_in_flight: int = 32,
    ) -> None:
        if not clients:
            raise ValueError("VLLMEngine needs at least one server")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched generation")
        self.clients = list(clients)
        self.tokenizer = tokenizer
        self.weight_sync = sync
        self.probe = probe
        self.servers = list(servers)
        self.max_in_flight = max_in_flight
        self.behaviour_logprobs_exact = engine_dtype == trainer_dtype == "float32"
        self.iteration = 0
        self.version = 0  # weight syncs done
        self._stats: dict[str, float] = {}
        self._checked: set[str] = set()

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
        """Save ``model`` to ``work_dir/model``, start (or connect to) the servers, and verify the
        probe on the initial weights (sync 0). ``adapter_sync`` pushes only a LoRA adapter
        (``settings.enable_lora`` needed); otherwise full (merged) weights go through files or,
        with ``settings.weight_transfer == "nccl"``, vLLM's NCCL weight transfer (GPU)."""
        from alignkit.models.loading import save_model

        work = Path(work_dir)
        model_dir = work / "model"
        if adapter_sync and not settings.enable_lora:
            raise VLLMError("adapter-only sync needs rollout.vllm.enable_lora: true")
        # Adapter sync: the servers serve the base weights and the adapter comes on top;
        # otherwise they serve the policy itself (a LoRA policy merged).
        policy = unwrap_for_generation(model)
        save_model(policy, tokenizer, model_dir, merge_adapter=not adapter_sync)
        clients, servers = open_servers(settings, model_dir, work)
        try:
            sync_dir = work / "weights"
            sync: WeightSync
            if adapter_sync:
                sync = LoRAAdapterSync(clients, sync_dir)
            elif settings.weight_transfer == "nccl":
                from alignkit.rollout.vllm.nccl import NCCLWeightSync

                sync = NCCLWeightSync(clients)
            else:
                sync = FileWeightSync(clients, sync_dir)
            probe = None
            if probe_prompts:
                max_gap, visible = default_probe_bounds(settings.dtype, trainer_dtype)
                probe = SyncProbe.from_prompts(
                    probe_prompts,
                    max_length=settings.max_model_len - 1,
                    max_gap=max_gap,
                    min_visible_change=visible,
                )
            engine = cls(
                clients,
                tokenizer,
                sync=sync,
                probe=probe,
                engine_dtype=settings.dtype,
                trainer_dtype=trainer_dtype,
                servers=servers,
            )
            if adapter_sync:
                engine.sync_weights(model)  # the adapter is not in the saved base weights
            elif probe is not None:
                engine.verify(model)
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return engine

    # --- the engine contract -------------------------------------------------------------

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        """Whether tokens are drawn from the policy at the sampling temperature (no top-k/top-p
        truncation, no EOS suppression)."""
        return sampling.top_k == 0 and sampling.top_p == 1.0 and not sampling.suppress_eos

    def set_iteration(self, iteration: int) -> None:
        """The trainer's iteration, named in sync errors."""
        self.iteration = iteration

    def stats(self) -> dict[str, float]:
        """Metrics of the last sync and generation (``rollout/...``, ``timing/...``)."""
        return dict(self._stats)

    def sync_weights(self, model: nn.Module) -> None:
        """Push ``model``'s weights to every server, then verify them with the probe."""
        self.version += 1
        start = time.perf_counter()
        stats = self.weight_sync.push(unwrap_for_generation(model), self.version)
        stats["timing/weight_sync"] = time.perf_counter() - start
        stats["rollout/weight_version"] = float(self.version)
        self._stats.update(stats)
        if self.probe is not None:
            self.verify(model)

    def verify(self, model: nn.Module) -> None:
        """Score the probe on every server and compare with ``model`` (raises on a bad sync)."""
        assert self.probe is not None
        start = time.perf_counter()
        trainer = self.probe.trainer_logprobs(unwrap_for_generation(model))
        worst = mean = 0.0
        for client in self.clients:
            scores = client.score(self.probe.sequences, model=self.weight_sync.served_model)
            where = f"server {client.url}, after iteration {self.iteration}"
            result = self.probe.check(
                self.version, self.probe.engine_logprobs(scores), trainer, server=where
            )
            worst, mean = max(worst, result.max_abs), max(mean, result.mean_abs)
        self._stats["rollout/sync_probe_max_abs"] = worst
        self._stats["rollout/sync_probe_mean_abs"] = mean
        self._stats["timing/sync_probe"] = time.perf_counter() - start

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
        start = time.perf_counter()
        g, steps = sampling.samples_per_prompt, sampling.max_new_tokens
        seeds = torch.randint(0, _SEED_RANGE, (len(prompts),), generator=generator).tolist()
        for client in self.clients:
            self._check_logprobs_mode(client, prompts[0].input_ids)
        eos = self.tokenizer.eos_token_id
        banned = [eos] if sampling.suppress_eos and eos is not None else []

        def one(index: int) -> list[Completion]:
            client = self.clients[index % len(self.clients)]
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
                model=self.weight_sync.served_model,
            )

        workers = max(1, min(self.max_in_flight, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            samples = [c for group in pool.map(one, range(len(prompts))) for c in group]
        experience = self._assemble(prompts, sampling, samples, group_offset)
        seconds = time.perf_counter() - start
        tokens = int(experience.response_lengths.sum())
        self._stats["timing/vllm_generate"] = seconds
        self._stats["rollout/vllm_tokens_per_s"] = tokens / max(seconds, 1e-9)
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

    def _check_logprobs_mode(self, client: VLLMClient, prompt_ids: Sequence[int]) -> None:
        if client.url not in self._checked:
            client.check_processed_logprobs(prompt_ids, model=self.weight_sync.served_model)
            self._checked.add(client.url)

    def close(self) -> None:
        """Stop the servers this engine started."""
        for server in self.servers:
            server.stop()
        self.servers = []

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
