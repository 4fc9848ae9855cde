"""The ``rollout`` section of the online trainers' config: how many prompts and samples an
iteration takes, how completions are sampled (temperature, truncation, a teacher proposal), which
engine samples them (``rollout.vllm``) and how off-policy samples are weighed
(``rollout.correction``), and DAPO's dynamic sampling. Torch-free at import, like every config
module (the CLI reads and checks configs without importing torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from alignkit.config.schema import field_help, requires
from alignkit.trainers.engine_config import CorrectionConfig, VLLMConfig
from alignkit.trainers.policy_config import _require

if TYPE_CHECKING:
    from alignkit.rollout.sampling import SamplingConfig

__all__ = ["RolloutConfig"]


@dataclass
class RolloutConfig:
    """How completions are sampled each iteration."""

    prompts_per_iteration: int = field(
        default=8, metadata=field_help("Prompts sampled per iteration (all processes together).")
    )
    samples_per_prompt: int = field(
        default=8,
        metadata=field_help("Completions per prompt (the group of GRPO/RLOO; >= 2 for those)."),
    )
    max_new_tokens: int = field(
        default=16,
        metadata=field_help(
            "Completion length cap in tokens; also Dr. GRPO's constant L "
            "(policy_loss.agg=seq-mean-token-sum-norm)."
        ),
    )
    temperature: float = field(
        default=1.0,
        metadata=field_help(
            "Sampling temperature; the training forward divides the logits by it too, so the "
            "PPO ratio compares the same distribution."
        ),
    )
    top_k: int = field(
        default=0,
        metadata=field_help(
            "Sample among the k most likely tokens; 0: off. A truncated sampler differs from "
            "the trained distribution: importance weights are then applied."
        ),
    )
    top_p: float = field(
        default=1.0,
        metadata=field_help(
            "Nucleus sampling mass; 1: off (same importance-weight remark as top_k)."
        ),
    )
    suppress_eos: bool = field(
        default=False,
        metadata=field_help(
            "Forbid EOS so every completion runs to max_new_tokens (benchmarks only: the "
            "sampled distribution then differs from the policy's, so importance weights apply)."
        ),
    )
    engine: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata=field_help(
            "transformers: alignkit's in-process decode loop (exact, the default); vllm: "
            "servers in vLLM's own environment with verified weight sync (rollout.vllm; "
            "docs/vllm.md)."
        ),
    )
    vllm: VLLMConfig = field(
        default_factory=VLLMConfig, metadata=field_help("engine=vllm: the servers and the sync.")
    )
    correction: CorrectionConfig = field(
        default_factory=CorrectionConfig,
        metadata=field_help(
            "Importance weights when the sampler is not the trainer's distribution (a teacher, "
            "top_k/top_p, suppress_eos, engine=vllm): token/sequence level, truncate/mask, cap."
        ),
    )

    teacher: str | None = field(
        default=None,
        metadata=field_help(
            "A causal LM with the policy's tokenizer: sample each token from a policy/teacher "
            "proposal (seed 001) instead of the policy; importance weights then apply "
            "(docs/teacher-guided-sampling.md). null: on-policy sampling."
        ),
    )
    alpha: str | float = field(
        default="kl_symmetry",
        metadata=field_help(
            "With a teacher: kl_symmetry (per-position alpha with KL(q||pi) = KL(q||teacher)), "
            "snr (usually 1: on-policy), min_variance (the variance-optimal proposal for the "
            "teacher log-ratio), a fixed number in [0, 1] (q ~ pi^alpha teacher^(1-alpha)), or "
            "linear:START:END:ITERATIONS (a schedule over iterations)."
        ),
    )
    teacher_floor: float = field(
        default=0.1,
        metadata=field_help(
            "alpha=min_variance: the policy's share of the proposal (weights <= 1/it)."
        ),
    )
    filter_groups: bool = field(
        default=False,
        metadata=field_help(
            "DAPO's dynamic sampling (verl's algorithm.filter_groups): drop the groups whose "
            "rewards are all equal (zero advantages) and sample more prompts until the "
            "iteration has prompts_per_iteration informative groups (group estimators only)."
        ),
    )
    max_staleness: int | None = field(
        default=None,
        metadata=field_help(
            "Asynchronous generation: 1 generates the next iteration's batch in a worker "
            "thread while this one trains (one-step off-policy, as verl's and TRL's async "
            "modes; importance-corrected by rollout.correction); 0 takes the same code path "
            "without overlap (it reproduces the synchronous run exactly); null: synchronous."
        ),
    )
    filter_max_rounds: int | None = field(
        default=None,
        metadata=field_help(
            "filter_groups: at most this many extra rounds of prompts_per_iteration prompts "
            "(null: 4); still short after them, the batch is completed with uninformative "
            "groups (zero advantages), logged as rollout/filter_shortfall."
        ),
    )

    def __post_init__(self) -> None:
        # Imported here: the CLI reads and checks configs without importing torch.
        from alignkit.rollout.proposals import parse_alpha

        parse_alpha(self.alpha)  # ConfigError naming the valid forms
        _require(0 < self.teacher_floor <= 1, "teacher_floor must lie in (0, 1]")
        _require(self.prompts_per_iteration >= 1, "prompts_per_iteration must be >= 1")
        _require(self.samples_per_prompt >= 1, "samples_per_prompt must be >= 1")
        _require(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        _require(self.temperature > 0, "temperature must be > 0 (greedy rollouts cannot learn)")
        _require(self.top_k >= 0, "top_k must be >= 0 (0 = off)")
        _require(0 < self.top_p <= 1, "top_p must lie in (0, 1]")
        self._check_sampling_settings()

    def _check_sampling_settings(self) -> None:
        """Teacher settings need a teacher; importance weights need off-policy sampling."""
        teacher = self.teacher is not None
        requires(self, ("alpha", "teacher_floor"), teacher, "teacher", scope="rollout")
        floor = self.alpha == "min_variance" or not teacher
        requires(self, "teacher_floor", floor, "alpha=min_variance", scope="rollout")
        vllm_keys = tuple(f"vllm.{f.name}" for f in dataclasses.fields(VLLMConfig))
        requires(self, vllm_keys, self.engine == "vllm", "engine=vllm", scope="rollout")
        enable = "engine=vllm, teacher, top_k > 0, top_p < 1 or suppress_eos=true"
        on_policy = "with on-policy sampling (no importance weights)"
        keys = tuple(f"correction.{name}" for name in ("level", "mode", "cap", "lower"))
        requires(self, keys, self.corrected, enable, scope="rollout", because=on_policy)
        _require(
            not (teacher and self.engine == "vllm"),
            "rollout.teacher needs the in-process engine (rollout.engine=transformers)",
        )
        requires(
            self, "filter_max_rounds", self.filter_groups, "filter_groups=true", scope="rollout"
        )
        _require(
            self.filter_max_rounds is None or self.filter_max_rounds >= 1,
            "rollout.filter_max_rounds must be >= 1",
        )
        _require(
            self.max_staleness in (None, 0, 1),
            f"rollout.max_staleness must be null, 0 or 1, got {self.max_staleness!r} (a batch "
            "is generated while the previous one trains; deeper pipelines are not offered)",
        )
        if self.max_staleness is not None:
            _require(
                not self.filter_groups and not teacher,
                "rollout.max_staleness (asynchronous generation) does not combine with "
                "filter_groups or a teacher: set it to null",
            )

    @property
    def corrected(self) -> bool:
        """Whether rollouts are importance-weighted: the sampler is not exactly the trainer's
        softmax(logits / T) (a teacher, a truncation, a suppressed EOS, another engine)."""
        truncated = self.top_k > 0 or self.top_p < 1 or self.suppress_eos
        stale = bool(self.max_staleness)  # a batch sampled by the previous iteration's policy
        return self.teacher is not None or truncated or self.engine == "vllm" or stale

    @property
    def sequences_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt

    def sampling(self) -> SamplingConfig:
        """The engine's ``SamplingConfig`` for one iteration's rollouts (the one place the
        rollout settings map onto it)."""
        from alignkit.rollout.sampling import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            samples_per_prompt=self.samples_per_prompt,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            suppress_eos=self.suppress_eos,
        )

    @property
    def extra_filter_rounds(self) -> int:
        """Rounds of prompts that dynamic sampling may add to an iteration (0: off)."""
        if not self.filter_groups:
            return 0
        return 4 if self.filter_max_rounds is None else self.filter_max_rounds
