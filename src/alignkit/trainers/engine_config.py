"""Settings of where rollouts come from and how they are weighed: ``rollout.vllm`` (vLLM servers,
the weight sync, the sync probe) and ``rollout.correction`` (importance weights of rollouts not
drawn from the trainer's own distribution). Torch-free at import, like every config module."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.config.schema import field_help, requires
from alignkit.errors import ConfigError

__all__ = ["CorrectionConfig", "VLLMConfig", "vllm_engine"]


@dataclass
class CorrectionConfig:
    """Importance weights of rollouts not drawn from the trainer's distribution
    (``ops.importance.rollout_correction``)."""

    level: Literal["token", "sequence"] = field(
        default="token",
        metadata=field_help(
            "token: one ratio pi/mu per token (lower variance; the prefix stays off-policy); "
            "sequence: the product over the response, the same weight on every token (TRL's "
            "sequence_* modes, GSPO-like)."
        ),
    )
    mode: Literal["truncate", "mask"] = field(
        default="truncate",
        metadata=field_help(
            "truncate: w = min(ratio, cap) (TIS); mask: ratios above cap (or below lower) give "
            "w = 0, the token or sequence leaves the loss (TRL's *_mask, verl's rejection)."
        ),
    )
    cap: float = field(
        default=2.0,
        metadata=field_help(
            "Upper bound C >= 1 of the ratio (TRL: vllm_importance_sampling_clip_max; verl: "
            "rollout_is_threshold). Formerly rollout.max_importance_weight."
        ),
    )
    lower: float | None = field(
        default=None,
        metadata=field_help("mode=mask: ratios below this are masked too (in [0, 1)); null: none."),
    )

    def __post_init__(self) -> None:
        if not 1 <= self.cap < float("inf"):
            raise ConfigError(f"rollout.correction.cap must be finite and >= 1, got {self.cap}")
        if self.lower is not None and not 0 <= self.lower < 1:
            raise ConfigError(f"rollout.correction.lower must lie in [0, 1), got {self.lower}")
        requires(self, "lower", self.mode == "mask", "mode=mask", scope="rollout.correction")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``ops.importance.rollout_correction``."""
        return {"level": self.level, "mode": self.mode, "cap": self.cap, "lower": self.lower}


@dataclass
class VLLMConfig:
    """Rollouts served by vLLM in its own environment (rollout.engine=vllm; docs/vllm.md)."""

    urls: list[str] = field(
        default_factory=list,
        metadata=field_help(
            "Running vLLM servers to use (several: prompts split across them); empty: start "
            "one from `python` or `command`. They need --logprobs-mode processed_logprobs, "
            "VLLM_SERVER_DEV_MODE=1 and the alignkit worker extension (docs/vllm.md)."
        ),
    )
    python: str | None = field(
        default=None,
        metadata=field_help(
            "The vLLM venv's interpreter; null: $ALIGNKIT_VLLM_VENV or "
            "~/.cache/alignkit/vllm-cpu-venv (`make vllm-venv`)."
        ),
    )
    command: list[str] = field(
        default_factory=list,
        metadata=field_help(
            "A launch command instead, e.g. [vllm, serve] (the model directory and alignkit's "
            "arguments are appended)."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata=field_help(
            "The served weights' dtype. float32 matches an fp32 trainer to ~1e-6 per token; "
            "bf16 does not (wider probe bound, larger importance corrections)."
        ),
    )
    max_model_len: int = field(
        default=1024,
        metadata=field_help("Longest prompt + completion the server accepts (tokens)."),
    )
    sync_every: int = field(
        default=1,
        metadata=field_help(
            "Push the weights when the served copy is this many optimizer steps behind, before "
            "a rollout; the staleness is logged (rollout/weight_staleness) and corrected by "
            "rollout.correction. 1: every rollout sees the current policy."
        ),
    )
    lora_sync: Literal["merged", "adapter"] = field(
        default="merged",
        metadata=field_help(
            "With model.lora: merged pushes W + (alpha/r) BA as full weights; adapter pushes "
            "only the adapter to a server started with --enable-lora (23 KB instead of the "
            "model)."
        ),
    )
    probe: bool = field(
        default=True,
        metadata=field_help(
            "After every sync, score a fixed probe on every server and compare with the "
            "trainer: a gap above probe_max_gap, or stale weights, stops the run (exit 2)."
        ),
    )
    probe_max_gap: float | None = field(
        default=None,
        metadata=field_help(
            "Largest |engine - trainer| probe log-prob allowed (nats); null: 1e-3 when both run "
            "in float32, else 1.0."
        ),
    )
    weight_transfer: Literal["file", "nccl"] = field(
        default="file",
        metadata=field_help(
            "file: safetensors in the run directory, loaded by a vLLM worker extension (CPU and "
            "GPU); nccl: vLLM's weight-transfer API (GPU only)."
        ),
    )
    enforce_eager: bool = field(
        default=True,
        metadata=field_help("--enforce-eager: no compile warm-up (a faster start on CPU)."),
    )
    cpu_kv_cache_gib: int = field(
        default=1, metadata=field_help("KV cache of a CPU server, GiB (VLLM_CPU_KVCACHE_SPACE).")
    )
    startup_timeout: float = field(
        default=600.0, metadata=field_help("Seconds to wait for a started server's /health.")
    )
    request_timeout: float = field(
        default=300.0,
        metadata=field_help("Seconds to wait for any one answer; longer is an error (exit 2)."),
    )
    retries: int = field(
        default=2, metadata=field_help("Retries of a refused connection or a 502/503 answer.")
    )
    extra_args: list[str] = field(
        default_factory=list, metadata=field_help("More `vllm serve` arguments, as given.")
    )
    env: dict[str, str] = field(
        default_factory=dict, metadata=field_help("More environment variables of the server.")
    )

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise ConfigError(f"rollout.vllm.sync_every must be >= 1, got {self.sync_every}")
        if self.probe_max_gap is not None and not self.probe_max_gap > 0:
            raise ConfigError(f"rollout.vllm.probe_max_gap must be > 0, got {self.probe_max_gap}")
        requires(self, "probe_max_gap", self.probe, "probe=true", scope="rollout.vllm")
        self.settings()  # the server settings' own checks (urls vs a launch, timeouts, ...)

    def settings(self, *, enable_lora: bool = False, max_lora_rank: int = 16) -> Any:
        """The ``rollout.vllm.server.VLLMSettings`` these settings describe."""
        from alignkit.rollout.vllm.server import VLLMSettings

        return VLLMSettings(
            urls=list(self.urls),
            python=self.python,
            command=list(self.command),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            cpu_kv_cache_gib=self.cpu_kv_cache_gib,
            weight_transfer=self.weight_transfer,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
            startup_timeout=self.startup_timeout,
            request_timeout=self.request_timeout,
            retries=self.retries,
            extra_args=list(self.extra_args),
            env=dict(self.env),
        )


def vllm_engine(
    cfg: Any, tokenizer: Any, prompts: Sequence[Any], work_dir: Callable[[], Path]
) -> Any:
    """``rollout.engine=vllm`` of an online config ``cfg``: a ``VLLMEngine`` whose servers start
    at the trainer's first weight sync, in ``work_dir()``; the sync probe is made of the first
    prompts of the prompt file."""
    from alignkit.rollout.vllm import VLLMEngine

    adapter = cfg.rollout.vllm.lora_sync == "adapter"
    rank = cfg.model.lora.r if cfg.model.lora is not None else 1
    settings = cfg.rollout.vllm.settings(
        enable_lora=adapter,
        max_lora_rank=next(r for r in (8, 16, 32, 64, 128, 256, rank) if r >= rank),
    )
    return VLLMEngine.deferred(
        settings,
        tokenizer,
        work_dir,
        probe_prompts=[p.input_ids for p in prompts[:5]],
        trainer_dtype=cfg.model.dtype,
        adapter_sync=adapter,
        probe=cfg.rollout.vllm.probe,
        probe_max_gap=cfg.rollout.vllm.probe_max_gap,
    )
