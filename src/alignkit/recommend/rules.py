"""The recommender's rules: one table, read top to bottom, deterministic.

A method's score is the sum of the ``effects`` of every rule whose condition holds. Feasibility
is separate: a method that cannot run on what the user has (no pairs for DPO, no reward source
and nothing to train one from for GRPO, no memory for a critic) is listed with the reason and
never recommended, whatever its score. Ties break in ``TIE_ORDER`` (simplest first).
``docs/recommender.md`` prints this table with the evidence behind each rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alignkit.recommend.features import Features

__all__ = ["METHODS", "RULES", "TIE_ORDER", "MethodSpec", "Rule", "memory_need_gb"]

PAIRS = ("preference", "safety")
GB = 2**30
#: Bytes per parameter (Rajbhandari et al. 2020, ZeRO §3: mixed-precision Adam keeps 16 bytes
#: per trained parameter: 2 weights + 2 gradients + 12 fp32 master/moments; fp32 on a CPU is
#: 4 + 4 + 8, also 16). A frozen model held for scoring costs its bf16 weights, 2 bytes.
TRAINED_BYTES, FROZEN_BYTES = 16.0, 2.0
#: LoRA (r ~ 16) trains ~1% of the weights: frozen base + 16 bytes for the adapter share.
LORA_BYTES = FROZEN_BYTES + 0.01 * TRAINED_BYTES
#: Share of the memory left for weights and optimizer state; the rest is activations, KV cache.
USABLE_SHARE = 0.8


@dataclass(frozen=True)
class MethodSpec:
    """How a recommended method is run, and what it holds in memory at once."""

    name: str
    cli: str  # `alignkit train <cli>`
    overrides: tuple[str, ...]  # fixed overrides that make the method (e.g. dpo.kind=ipo)
    trained_models: int  # policy, critic(s)
    frozen_models: int  # reference, reward and cost models held during training
    online: bool
    when_to_prefer: str


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "dpo",
            "dpo",
            (),
            1,
            0,
            False,
            "clean pairwise preferences and no reward model: the simplest, fastest "
            "default (reference log-probs are computed once, no sampling)",
        ),
        MethodSpec(
            "ipo",
            "dpo",
            ("dpo.kind=ipo",),
            1,
            0,
            False,
            "noisy, tied or small preference sets: IPO regresses to a finite margin "
            "1/(2 beta) instead of pushing it to infinity",
        ),
        MethodSpec(
            "safe-dpo",
            "safe-dpo",
            (),
            1,
            0,
            False,
            "safety-labelled pairs: helpfulness under a safety constraint with a "
            "Lagrange multiplier, no sampling",
        ),
        MethodSpec(
            "grpo",
            "grpo",
            (),
            1,
            2,
            True,
            "a reward you can compute per sample (verifiable answers, a judge): group "
            "baselines, no critic",
        ),
        MethodSpec(
            "rloo",
            "rloo",
            (),
            1,
            2,
            True,
            "the same setting as GRPO, with the unbiased leave-one-out baseline and no std "
            "scaling (no question-difficulty bias)",
        ),
        MethodSpec(
            "ppo",
            "ppo",
            (),
            2,
            2,
            True,
            "a learned reward model and memory for a critic: token-level credit "
            "assignment with GAE, the classic RLHF stage 3",
        ),
        MethodSpec(
            "safe-ppo",
            "safe-ppo",
            (),
            3,
            3,
            True,
            "a reward and a cost model with a cost budget to hold while sampling "
            "online (PPO-Lagrangian, Safe RLHF)",
        ),
    )
}
#: Tie-break: simpler and cheaper first.
TIE_ORDER = ("dpo", "ipo", "safe-dpo", "grpo", "rloo", "ppo", "safe-ppo")


def memory_need_gb(method: MethodSpec, parameters: int, lora: bool = False) -> float:
    """Weights + optimizer state of every model the method holds at once (same size as the
    policy: reward, cost and critic models usually are). Activations are not counted."""
    trained = LORA_BYTES if lora else TRAINED_BYTES
    per_param = method.trained_models * trained + method.frozen_models * FROZEN_BYTES
    return per_param * parameters / GB


def usable_memory_gb(features: Features) -> float:
    r = features.resources
    return USABLE_SHARE * r.gpu_memory_gb * max(r.gpus, 1)


def reward_source(f: Features) -> bool:
    q = f.requirements
    return bool(q.online_reward or q.reward_model or (f.data is not None and f.data.has_answers))


def _fmt(f: Features) -> str | None:
    return f.data.format if f.data is not None else None


@dataclass(frozen=True)
class Rule:
    """When ``when(features)`` holds, add ``effects[method]`` to each method's score."""

    id: str
    when: Callable[[Features], bool]
    effects: dict[str, float]
    reason: str
    evidence: str


RULES: tuple[Rule, ...] = (
    Rule(
        "pairs-offline",
        lambda f: _fmt(f) in PAIRS,
        {"dpo": 3.0, "ipo": 2.5, "safe-dpo": 1.0},
        "the data are pairwise preferences: the DPO family trains on them directly",
        "Rafailov et al. 2023 (DPO); seed 002 §4.4.3 table: no reward model, no sampling",
    ),
    Rule(
        "pairs-need-rm",
        lambda f: _fmt(f) in PAIRS and not reward_source(f),
        {"ppo": -1.5, "grpo": -1.5, "rloo": -1.5, "safe-ppo": -1.5},
        "online RL would first need a reward model trained from these pairs (an extra stage)",
        "Ouyang et al. 2022 (InstructGPT): SFT -> reward model -> PPO",
    ),
    Rule(
        "safety-labels",
        lambda f: _fmt(f) == "safety",
        {"safe-dpo": 2.0, "safe-ppo": 1.0},
        "the pairs carry safety labels, which a constrained method uses",
        "Dai et al. 2023 (Safe RLHF); seed 000 (Safe-DPO multiplier)",
    ),
    Rule(
        "ratings",
        lambda f: _fmt(f) == "rating",
        {"dpo": 1.5, "ipo": 1.5, "ppo": 0.5},
        "ratings convert to pairs (`alignkit data convert --from rating --to preference`); "
        "their gaps become margins",
        "seed 002 §4.2.3 (ratings to comparisons)",
    ),
    Rule(
        "online-reward",
        lambda f: bool(f.requirements.online_reward),
        {"grpo": 3.0, "rloo": 2.5, "ppo": 1.5, "safe-ppo": 1.0},
        "a reward function scores fresh samples: online RL optimises it directly",
        "Shao et al. 2024 (DeepSeekMath, GRPO); Ahmadian et al. 2024 (RLOO)",
    ),
    Rule(
        "verifiable-answers",
        lambda f: f.data is not None and f.data.has_answers,
        {"grpo": 1.5, "rloo": 1.0},
        "prompts come with answers: a rule-based reward needs no reward model",
        "DeepSeek-AI 2025 (R1): rule-based rewards with GRPO",
    ),
    Rule(
        "reward-model",
        lambda f: bool(f.requirements.reward_model),
        {"ppo": 2.0, "grpo": 1.0, "rloo": 1.0, "safe-ppo": 1.0},
        "a trained reward model gives dense, learned scores: PPO's classic setting",
        "Ziegler et al. 2019; Ouyang et al. 2022",
    ),
    Rule(
        "small-pairs",
        lambda f: _fmt(f) in PAIRS and f.data.rows < 2000,
        {"ipo": 1.0, "dpo": -0.5},
        "under 2,000 pairs: DPO's loss keeps widening margins on data it fits (overfits); "
        "IPO's squared loss has a finite target",
        "Azar et al. 2023 (IPO) §4",
    ),
    Rule(
        "noisy-labels",
        lambda f: (
            f.data is not None
            and (
                (f.data.tie_share or 0) > 0.1
                or (f.data.agreement is not None and f.data.agreement < 0.7)
            )
        ),
        {"ipo": 1.0, "dpo": -0.5},
        "over 10% ties or annotator agreement under 0.7: noisy labels",
        "Azar et al. 2023; Chowdhury et al. 2024 (robust DPO); seed 002 §4.2.3",
    ),
    Rule(
        "safety-required",
        lambda f: f.requirements.safety,
        {
            "safe-dpo": 3.0,
            "safe-ppo": 3.0,
            "dpo": -3.0,
            "ipo": -3.0,
            "grpo": -3.0,
            "rloo": -3.0,
            "ppo": -3.0,
        },
        "--need safety: only the constrained methods bound the cost",
        "Dai et al. 2023 (Safe RLHF); seed 000",
    ),
    Rule(
        "cost-model",
        lambda f: bool(f.requirements.cost_model),
        {"safe-ppo": 1.5},
        "a trained cost model scores fresh samples for the cost constraint",
        "Dai et al. 2023 (Safe RLHF) §3",
    ),
    Rule(
        "stability",
        lambda f: f.requirements.stability,
        {
            "dpo": 1.0,
            "ipo": 1.5,
            "safe-dpo": 1.0,
            "grpo": -0.5,
            "rloo": -0.5,
            "ppo": -1.5,
            "safe-ppo": -1.5,
        },
        "--stability: supervised-style losses are steadier than sampled policy gradients",
        "seed 002 §4.4.3 table (stability: PPO medium, DPO/IPO high)",
    ),
    Rule(
        "simplicity",
        lambda f: f.requirements.simplicity,
        {
            "dpo": 1.5,
            "ipo": 1.0,
            "safe-dpo": 0.5,
            "grpo": -0.5,
            "rloo": -0.5,
            "ppo": -1.5,
            "safe-ppo": -2.0,
        },
        "--simplicity: fewer models and hyperparameters",
        "seed 002 §4.4.3 table (hyperparameter sensitivity: PPO high, DPO/IPO low)",
    ),
    Rule(
        "large-model",
        lambda f: f.model.parameters > 10e9,
        {"ppo": -1.0, "safe-ppo": -1.0},
        "over 10B parameters: a critic as large as the policy doubles the trained state",
        "seed 002 exercise 4.4 (model compatibility)",
    ),
    Rule(
        "short-budget",
        lambda f: f.resources.hours < 6,
        {"ppo": -1.0, "safe-ppo": -1.0, "grpo": -0.5, "rloo": -0.5},
        "under 6 hours: online methods spend most of their time generating",
        "seed 002 §4.4.3 table (compute efficiency: PPO low, DPO/IPO high)",
    ),
)
