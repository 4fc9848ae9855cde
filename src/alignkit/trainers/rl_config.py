"""Typed configs of the online-RL trainers (PPO, GRPO, RLOO, REINFORCE++, REINFORCE).

Every batch word names its unit (DESIGN, "Online RL"): an *iteration* samples
``rollout.prompts_per_iteration`` prompts x ``rollout.samples_per_prompt`` completions, then
makes ``train.epochs_per_iteration`` passes over them in mini-batches of
``train.sequences_per_minibatch`` sequences (one optimizer step each), each split into
micro-batches of ``train.sequences_per_device`` sequences per process.

The sections live in torch-free modules beside this one and are importable from here:
``rollout`` in ``rollout_config``, ``advantage``/``reward``/``policy_loss`` in
``policy_config``, ``rollout.vllm``/``rollout.correction`` in ``engine_config``,
``environment`` in ``environment_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.config import RunConfig
from alignkit.config.inputs import ModelConfig
from alignkit.config.schema import field_help, requires
from alignkit.errors import ConfigError
from alignkit.trainers.environment_config import EnvironmentConfig
from alignkit.trainers.policy_config import (
    AdvantageConfig,
    PolicyLossConfig,
    RewardShapingConfig,
    _require,
)
from alignkit.trainers.rollout_config import RolloutConfig


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending (valid values offered in error messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class PromptDataConfig:
    """The prompt file the rollouts sample from."""

    train_file: str = field(
        default="",
        metadata=field_help(
            "JSONL/JSON/CSV/Parquet rows with a 'prompt' (text or messages); the other columns "
            "(e.g. 'answer') are passed to reward functions as keyword arguments."
        ),
    )
    eval_file: str | None = field(
        default=None,
        metadata=field_help("Held-out prompt rows: greedy completions scored at each evaluation."),
    )
    max_prompt_length: int = field(
        default=256, metadata=field_help("Prompt tokens kept (the prompt's end is kept).")
    )
    max_eval_prompts: int | None = field(
        default=64, metadata=field_help("Evaluate on the first N held-out prompts; null: all.")
    )

    def __post_init__(self) -> None:
        _require(self.max_prompt_length >= 1, "max_prompt_length must be >= 1")
        _require(
            self.max_eval_prompts is None or self.max_eval_prompts >= 1,
            "max_eval_prompts must be >= 1 or null",
        )
        requires(self, "max_eval_prompts", bool(self.eval_file), "eval_file", scope="data")


@dataclass
class RewardSourceConfig:
    """One reward source; several are summed with their weights."""

    function: str | None = field(
        default=None,
        metadata=field_help(
            "'module:function', 'path/to/file.py:function' or a built-in name (reverse_match, "
            "sort_match, add_match, exact_match, ...); fn(prompts, completions, **row_fields) "
            "-> list[float | None]."
        ),
    )
    model: str | None = field(
        default=None,
        metadata=field_help("A reward or cost model: a run directory of `alignkit train rm/cost`."),
    )
    weight: float = field(default=1.0, metadata=field_help("Weight of this source in the sum."))
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_help(
            "Keyword arguments of a function entry that names a reward class (math_accuracy, "
            "code_tests, reasoning_gym:<task>, llm_judge, ...; see docs/rewards.md)."
        ),
    )

    def __post_init__(self) -> None:
        _require(
            (self.function is None) != (self.model is None),
            "each rewards entry needs exactly one of 'function' or 'model'",
        )
        _require(
            not self.options or self.function is not None,
            "'options' belong to a 'function' entry, not a 'model' one",
        )

    def spec(self) -> dict[str, Any]:
        key = "function" if self.function is not None else "model"
        spec = {key: self.function or self.model, "weight": self.weight}
        return {**spec, "options": dict(self.options)} if self.options else spec


@dataclass
class KLConfig:
    """A KL(pi || ref) penalty: where it goes, which estimator, its coefficient and controller.

    Gradients (tokens sampled from pi; see ops.kl.kl_loss): k1 in the *reward* and k2, k1+ or
    k3+ in the *loss* give the reverse-KL gradient grad KL(pi||ref). k3 in the loss (the GRPO
    paper's choice) gives grad KL(ref||pi), the *forward* KL. k1 in the loss has zero expected
    gradient and is refused.
    """

    coef: float = field(
        default=0.0,
        metadata=field_help("Coefficient beta (initial value when adaptive); 0: no KL."),
    )
    placement: Literal["reward", "loss"] = field(
        default="reward",
        metadata=field_help(
            "reward: r_t -= beta * KL_t before the advantages; loss: + beta * KL in the loss."
        ),
    )
    estimator: str | None = field(
        default=None,
        metadata=field_help(
            "k1, k2, k3, k1+, k3+ (straight-through: value of k1/k3, gradient of k2). null: k1 "
            "in the reward, k3+ in the loss (both the reverse-KL gradient). k3 in the loss is "
            "the forward KL's gradient (GRPO paper)."
        ),
    )
    controller: Literal["fixed", "adaptive"] = field(
        default="fixed",
        metadata=field_help("fixed coefficient, or adaptive: moved so that kl/mean tracks target."),
    )
    rule: Literal["proportional", "multiplicative"] = field(
        default="proportional",
        metadata=field_help(
            "Adaptive rule: proportional (Ziegler et al. 2019, with horizon) or multiplicative "
            "(x1.5 above 1.5*target, x0.5 below 0.5*target; seed 002)."
        ),
    )
    target: float = field(default=0.1, metadata=field_help("Adaptive: target KL per token (nats)."))
    horizon: float = field(
        default=10000.0, metadata=field_help("Adaptive proportional: horizon in sequences.")
    )

    def __post_init__(self) -> None:
        from alignkit.ops.kl import available_kl_estimators

        _require(self.coef >= 0, "kl.coef must be >= 0")
        _require(self.target > 0, "kl.target must be > 0")
        _require(self.horizon > 0, "kl.horizon must be > 0")
        _require(
            self.controller == "fixed" or self.coef > 0,
            "kl.controller=adaptive needs an initial kl.coef > 0",
        )
        names = [*available_kl_estimators()]
        valid = names if self.placement == "reward" else [*names, *(n + "+" for n in names)]
        _require(
            self.estimator is None or self.estimator in valid,
            f"kl.estimator={self.estimator!r} with placement={self.placement}; valid: "
            f"{', '.join(valid)}",
        )
        _require(
            not (self.placement == "loss" and self.estimator == "k1"),
            "kl.estimator=k1 in the loss has zero expected gradient (E[grad log pi] = 0); use "
            "k2, k1+ or k3+ (reverse KL), or k3 (forward KL)",
        )
        requires(self, ("placement", "estimator"), self.enabled, "coef > 0", scope="kl")
        adaptive = self.controller == "adaptive"
        requires(self, ("rule", "target", "horizon"), adaptive, "controller=adaptive", scope="kl")
        if adaptive:
            requires(self, "horizon", self.rule == "proportional", "rule=proportional", scope="kl")

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    @property
    def resolved_estimator(self) -> str:
        if self.estimator is not None:
            return self.estimator
        return "k1" if self.placement == "reward" else "k3+"


@dataclass
class CriticConfig:
    """PPO's critic: a value head on a copy of the policy's backbone, or a separate model."""

    model: str = field(
        default="policy",
        metadata=field_help(
            "policy: a copy of the policy's backbone with a fresh value head; or a model name/"
            "path (a reward model directory starts from its trained head)."
        ),
    )
    lr: float = field(default=1e-4, metadata=field_help("The critic's own AdamW learning rate."))
    value_clip: float | None = field(
        default=0.2, metadata=field_help("Clip V around its rollout value (PPO); null: off.")
    )
    coef: float = field(
        default=0.5,
        metadata=field_help(
            "Weight of the value loss (vf_coef). The critic has its own optimizer, so it only "
            "matters through gradient clipping and the logged loss."
        ),
    )

    def __post_init__(self) -> None:
        _require(self.lr > 0, "critic.lr must be > 0")
        _require(self.value_clip is None or self.value_clip > 0, "value_clip must be > 0")
        _require(self.coef > 0, "critic.coef must be > 0")


@dataclass
class TrainSchedule:
    """Iterations, and how each iteration's sequences make optimizer steps."""

    iterations: int = field(default=100, metadata=field_help("Rollout-then-update iterations."))
    epochs_per_iteration: int = field(
        default=1, metadata=field_help("Passes over an iteration's sequences (PPO epochs).")
    )
    sequences_per_minibatch: int | None = field(
        default=None,
        metadata=field_help(
            "Sequences per optimizer step (all processes); null: all of the iteration's."
        ),
    )
    sequences_per_device: int = field(
        default=8, metadata=field_help("Sequences per forward pass per process (micro-batch).")
    )
    samples_every: int = field(
        default=10,
        metadata=field_help(
            "Append a table of sampled (prompt, completion, reward) every N iterations."
        ),
    )

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, "iterations must be >= 1")
        _require(self.epochs_per_iteration >= 1, "epochs_per_iteration must be >= 1")
        _require(
            self.sequences_per_minibatch is None or self.sequences_per_minibatch >= 1,
            "sequences_per_minibatch must be >= 1",
        )
        _require(self.sequences_per_device >= 1, "sequences_per_device must be >= 1")
        _require(self.samples_every >= 1, "samples_every must be >= 1")


@dataclass
class OnlineConfig(RunConfig):
    """Settings shared by every online trainer: model, prompts, rollout, rewards, schedule."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata=field_help("The policy."))
    reference: str | None = field(
        default=None,
        metadata=field_help(
            "Reference model for the KL term; null: the initial policy (with LoRA: the policy "
            "with its adapter disabled). Loaded only when kl.coef > 0."
        ),
    )
    data: PromptDataConfig = field(
        default_factory=PromptDataConfig, metadata=field_help("Prompts.")
    )
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata=field_help("Sampling."))
    rewards: list[RewardSourceConfig] = field(
        default_factory=list,
        metadata=field_help("Reward sources, summed with their weights: [{function: ...}, ...]."),
    )
    train: TrainSchedule = field(default_factory=TrainSchedule, metadata=field_help("Schedule."))
    environment: EnvironmentConfig | None = field(
        default=None,
        metadata=field_help(
            "Multi-turn episodes with an environment and tools: {name: calculator, max_turns: "
            "4, ...}; null: one completion per sample (docs/environments.md)."
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_settings(self, num_processes=1)
        requires(self, "eval.every", bool(self.data.eval_file), "data.eval_file")
        # The offline loop's: no data loader here (the engine samples, held-out prompts are
        # generated at once), no activation checkpointing.
        offline = ("eval.examples_per_device", "dataloader_workers", "gradient_checkpointing")
        only = "it applies to the offline trainers (sft, dpo, rm, ...) only"
        requires(self, offline, False, because="in an online trainer", advice=only)
        self._check_vllm_settings()

    def _check_vllm_settings(self) -> None:
        """What rollout.vllm needs from the model and the data."""
        if self.rollout.engine != "vllm":
            return
        vllm = self.rollout.vllm
        requires(self, "rollout.vllm.lora_sync", self.model.lora is not None, "model.lora")
        adapter = vllm.lora_sync == "adapter"
        _require(
            not (adapter and vllm.weight_transfer == "nccl"),
            "rollout.vllm.lora_sync=adapter loads adapters through files; it needs "
            "rollout.vllm.weight_transfer=file",
        )
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        _require(
            longest <= vllm.max_model_len,
            f"rollout.vllm.max_model_len={vllm.max_model_len} is below data.max_prompt_length + "
            f"rollout.max_new_tokens = {longest}: raise it (or shorten those)",
        )
        # An episode's later turns continue conversations of up to environment.max_length
        # tokens; the server shortens a turn at its context (the episode then ends on length).
        episode = None if self.environment is None else self.environment.max_length
        _require(
            episode is None or episode <= vllm.max_model_len,
            f"rollout.vllm.max_model_len={vllm.max_model_len} is below environment.max_length = "
            f"{episode}, the longest conversation an episode continues: raise it (or lower that)",
        )

    @property
    def sequences_per_minibatch(self) -> int:
        return self.train.sequences_per_minibatch or self.rollout.sequences_per_iteration


def check_batch_settings(cfg: OnlineConfig, num_processes: int) -> None:
    """Divisibility of the batch words, with the valid values in the error."""
    per_iteration = cfg.rollout.sequences_per_iteration
    per_minibatch = cfg.sequences_per_minibatch
    if per_iteration % per_minibatch:
        raise ConfigError(
            f"train.sequences_per_minibatch={per_minibatch} does not divide the "
            f"{per_iteration} sequences of an iteration (rollout.prompts_per_iteration="
            f"{cfg.rollout.prompts_per_iteration} x samples_per_prompt="
            f"{cfg.rollout.samples_per_prompt}); valid: {divisors(per_iteration)}"
        )
    if per_minibatch % num_processes:
        raise ConfigError(
            f"train.sequences_per_minibatch={per_minibatch} cannot be shared by {num_processes} "
            f"processes; valid: multiples of {num_processes} dividing {per_iteration}"
        )
    local = per_minibatch // num_processes
    if local % cfg.train.sequences_per_device:
        raise ConfigError(
            f"train.sequences_per_device={cfg.train.sequences_per_device} does not divide the "
            f"{local} sequences each process gets per optimizer step "
            f"(sequences_per_minibatch={per_minibatch} / {num_processes} processes); valid: "
            f"{divisors(local)}"
        )
    if cfg.rollout.prompts_per_iteration % num_processes:
        raise ConfigError(
            f"rollout.prompts_per_iteration={cfg.rollout.prompts_per_iteration} must be a "
            f"multiple of the {num_processes} processes (each samples whole groups)"
        )


@dataclass
class PGConfig(OnlineConfig):
    """One policy-gradient trainer; ppo/grpo/rloo/reinforce++/reinforce are presets of it."""

    advantage: AdvantageConfig = field(
        default_factory=AdvantageConfig, metadata=field_help("Advantage estimator.")
    )
    kl: KLConfig = field(default_factory=KLConfig, metadata=field_help("KL penalty."))
    policy_loss: PolicyLossConfig = field(
        default_factory=PolicyLossConfig, metadata=field_help("Policy loss.")
    )
    reward: RewardShapingConfig = field(
        default_factory=RewardShapingConfig,
        metadata=field_help("Shaping of the summed reward (DAPO's overlong punishment)."),
    )
    critic: CriticConfig | None = field(
        default=None,
        metadata=field_help(
            "Critic for estimators that need values (gae); null: none, or the default critic "
            "(a value head on a copy of the policy) when the estimator needs one."
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from alignkit.ops.advantages import get_advantage_estimator

        needs = get_advantage_estimator(self.advantage.estimator).needs
        if "values" in needs and self.critic is None:
            self.critic = CriticConfig()  # the estimator needs one: the default critic
        if self.critic is not None and "values" not in needs:
            raise ConfigError(
                f"critic is set but advantage.estimator={self.advantage.estimator} does not use "
                "values; use estimator=gae or critic=null"
            )
        requires(self, "reference", self.kl.enabled, "kl.coef > 0")
        if "group_index" in needs and self.rollout.samples_per_prompt < 2:
            raise ConfigError(
                f"advantage.estimator={self.advantage.estimator} compares samples of a prompt: "
                "rollout.samples_per_prompt must be >= 2"
            )
        if self.rollout.filter_groups and "group_index" not in needs:
            raise ConfigError(
                "rollout.filter_groups drops the groups whose rewards are all equal, which only "
                "carry no gradient for a group estimator (grpo, dr_grpo, rloo), not for "
                f"advantage.estimator={self.advantage.estimator}"
            )
        if self.policy_loss.name == "gspo" and "group_index" not in needs:
            raise ConfigError(
                "policy_loss.name=gspo needs one advantage per sequence (estimator grpo, "
                f"dr_grpo or rloo), not advantage.estimator={self.advantage.estimator}'s "
                "per-token ones; use policy_loss.name=gspo_token"
            )
        buffer = self.reward.overlong_buffer
        if buffer is not None and buffer > self.rollout.max_new_tokens:
            raise ConfigError(
                f"reward.overlong_buffer={buffer} exceeds rollout.max_new_tokens="
                f"{self.rollout.max_new_tokens} (the punishment ramps over the last "
                "overlong_buffer tokens before the cap)"
            )
