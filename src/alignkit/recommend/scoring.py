"""Score every method against the features, pick the winner, suggest where to start."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignkit.recommend.budget import TokenCosts, max_new_tokens_for, model_costs, size_online_run
from alignkit.recommend.features import Features
from alignkit.recommend.rules import (
    METHODS,
    PAIRS,
    RULES,
    TIE_ORDER,
    MethodSpec,
    memory_need_gb,
    reward_source,
    usable_memory_gb,
)

__all__ = ["MethodScore", "Recommendation", "recommend", "run_settings", "write_config"]


@dataclass
class MethodScore:
    method: str
    score: float
    feasible: bool
    reasons: list[dict[str, Any]] = field(default_factory=list)  # {rule, delta, text}
    blockers: list[str] = field(default_factory=list)
    lora: bool = False  # fits in memory only as a LoRA adapter


@dataclass
class Recommendation:
    method: str | None
    runner_up: str | None
    scores: list[MethodScore]
    hyperparameters: dict[str, Any]
    features: Features
    command: str | None = None
    config_path: str | None = None
    notes: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None  # online methods: the time estimate behind the settings

    def as_dict(self) -> dict[str, Any]:
        spec = METHODS.get(self.runner_up) if self.runner_up else None
        return {
            "recommendation": self.method,
            "runner_up": None
            if spec is None
            else {"method": spec.name, "when_to_prefer": spec.when_to_prefer},
            "scores": [asdict(s) for s in self.scores],
            "hyperparameters": self.hyperparameters,
            "command": self.command,
            "config_path": self.config_path,
            "features": self.features.as_dict(),
            "assumptions": list(self.features.assumptions),
            "notes": self.notes,
            "budget": self.budget,
        }


def _available(cli: str) -> bool:
    from alignkit.trainers.registry import METHODS as TRAINERS

    return cli in TRAINERS


def _blockers(spec: MethodSpec, f: Features) -> tuple[list[str], bool]:
    """Why ``spec`` cannot run here (empty: it can), and whether it fits only with LoRA."""
    fmt = f.data.format if f.data is not None else None
    blockers = []
    if not _available(spec.cli):
        blockers.append(f"`alignkit train {spec.cli}` is not in this version of alignkit")
    if spec.name in ("dpo", "ipo") and fmt not in (*PAIRS, "rating"):
        blockers.append("needs preference pairs (or ratings to convert); --data has none")
    if spec.name == "safe-dpo" and fmt != "safety":
        blockers.append("needs safety-labelled pairs (PKU-SafeRLHF style)")
    if spec.online and not reward_source(f) and fmt not in PAIRS:
        blockers.append(
            "needs a reward source: --online-reward, --reward-model, prompts with answers, "
            "or preference pairs to train a reward model from"
        )
    if spec.name == "safe-ppo" and not f.requirements.cost_model and fmt != "safety":
        blockers.append("needs a cost model (--cost-model) or safety pairs to train one")
    need = memory_need_gb(spec, f.model.parameters)
    have = usable_memory_gb(f)
    lora = False
    if need > have:
        if memory_need_gb(spec, f.model.parameters, lora=True) <= have:
            lora = True
        else:
            blockers.append(
                f"needs ~{need:.0f} GB for weights and optimizer state (LoRA: "
                f"~{memory_need_gb(spec, f.model.parameters, lora=True):.0f} GB); "
                f"{have:.0f} GB usable"
            )
    return blockers, lora


def score_methods(f: Features) -> list[MethodScore]:
    """Every method's score, reasons and blockers, best first (feasible before infeasible)."""
    scores = []
    for spec in METHODS.values():
        reasons = [
            {"rule": rule.id, "delta": rule.effects[spec.name], "text": rule.reason}
            for rule in RULES
            if spec.name in rule.effects and rule.when(f)
        ]
        blockers, lora = _blockers(spec, f)
        if lora:
            reasons.append(
                {
                    "rule": "lora-only",
                    "delta": -1.5,
                    "text": "full fine-tuning does not fit; a LoRA adapter does",
                }
            )
        total = round(sum(r["delta"] for r in reasons), 6)
        scores.append(MethodScore(spec.name, total, not blockers, reasons, blockers, lora))
    return sorted(scores, key=lambda s: (not s.feasible, -s.score, TIE_ORDER.index(s.method)))


def _learning_rate(parameters: int, online: bool) -> float:
    # Tiny presets need large steps (this project's examples: 1e-3); pretrained models the
    # usual small ones (Zephyr DPO 5e-7 at 7B; InstructGPT PPO ~1e-6 range).
    if parameters < 10e6:
        return 1e-3
    if parameters < 1e9:
        return 1e-6 if online else 5e-6
    return 1e-6 if online else 5e-7 if parameters < 10e9 else 1e-7


def suggest_hyperparameters(spec: MethodSpec, f: Features, lora: bool) -> dict[str, Any]:
    """Starting overrides for ``alignkit train``, as dotted keys of the method's config."""
    hp: dict[str, Any] = {"optim.lr": _learning_rate(f.model.parameters, spec.online)}
    devices = max(f.resources.gpus, 1)
    if not spec.online:
        hp["examples_per_device"] = 8
        hp["grad_accum_steps"] = max(1, 64 // (8 * devices)) if f.model.parameters >= 10e6 else 1
    noisy = f.data is not None and (
        (f.data.tie_share or 0) > 0.1 or (f.data.agreement is not None and f.data.agreement < 0.7)
    )
    if spec.name in ("dpo", "safe-dpo"):
        hp["dpo.beta"] = 0.1  # Rafailov et al. 2023
        if noisy:
            hp["dpo.label_smoothing"] = 0.1  # cDPO: assume ~10% flipped labels
    if spec.name == "ipo":
        hp["dpo.beta"] = 0.1  # target margin 1/(2 beta) = 5 nats
    if spec.online:
        sources = []
        if f.requirements.online_reward:
            sources.append({"function": f.requirements.online_reward, "weight": 1.0})
        if f.requirements.reward_model:
            sources.append({"model": f.requirements.reward_model, "weight": 1.0})
        if sources:
            hp["rewards"] = sources
    if spec.name == "safe-ppo" and f.requirements.cost_model:
        hp["costs"] = [{"model": f.requirements.cost_model, "weight": 1.0}]
    if lora:
        hp["model.lora"] = {"r": 16, "alpha": 32}
    return hp


def _config_overrides(spec: MethodSpec, f: Features, hp: dict[str, Any]) -> list[str]:
    import yaml

    overrides = [*spec.overrides, f"model.name={f.model.name}", f"run_name={spec.name}"]
    if f.data is not None:
        overrides.append(f"data.train_file={f.data.path}")
    for key, value in hp.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        overrides.append(f"{key}={text}")
    return overrides


def run_settings(rec: Recommendation) -> tuple[type, Any, list[str]]:
    """The winner's config class, trainer entry point and every override of its config."""
    from alignkit.trainers.registry import get_method

    spec = METHODS[rec.method]
    method = get_method(spec.cli)
    config_class, entry_point = method.load()
    overrides = [*method.defaults, *_config_overrides(spec, rec.features, rec.hyperparameters)]
    return config_class, entry_point, overrides


def write_config(rec: Recommendation, path: str | Path) -> Path:
    """Write the winner's complete config (defaults + the suggestions) as YAML, atomically;
    it is loaded through the method's own config class first, so every key is valid."""
    from alignkit.config import load_config, save_resolved_config

    config_class, _, overrides = run_settings(rec)
    return save_resolved_config(load_config(config_class, None, overrides), path)


def recommend(features: Features, costs: TokenCosts | None = None) -> Recommendation:
    """Scores, the winner among the feasible methods, its runner-up and starting settings.

    An online winner's batch, ``rollout.max_new_tokens`` and iterations are sized to the stated
    hours from `costs` (measured by `recommend.budget.measure_costs`), or from costs modelled on
    the model's size and the machine's rate when `costs` is None."""
    scores = score_methods(features)
    feasible = [s for s in scores if s.feasible]
    notes = []
    if not feasible:
        return Recommendation(
            None,
            None,
            scores,
            {},
            features,
            notes=["no method can run on what was given: see each blocker"],
        )
    best = feasible[0]
    runner = feasible[1].method if len(feasible) > 1 else None
    spec = METHODS[best.method]
    if features.data is not None and features.data.format == "rating" and not spec.online:
        notes.append(
            "convert the ratings first: alignkit data convert IN pairs.jsonl "
            "--from rating --to preference, and train on pairs.jsonl"
        )
    if (
        spec.online
        and features.data is not None
        and features.data.format in PAIRS
        and not reward_source(features)
    ):
        notes.append(
            "train a reward model on the pairs first (alignkit train rm) and name it "
            "as the reward source"
        )
    hp = suggest_hyperparameters(spec, features, best.lora)
    budget = None
    if spec.online:
        sized, budget, budget_notes = _size_online(spec, features, best.lora, costs)
        hp.update(sized)
        notes += budget_notes
    return Recommendation(best.method, runner, scores, hp, features, notes=notes, budget=budget)


#: Prompt length assumed when the data do not say (no prompts, or no --data).
ASSUMED_PROMPT_TOKENS = 64.0


def _size_online(
    spec: MethodSpec, f: Features, lora: bool, costs: TokenCosts | None
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Batch, answer length and iterations that fit the stated hours (`recommend.budget`)."""
    r = f.resources
    if costs is None:
        costs = model_costs(f.model.parameters, lora, r.gpus, r.flops_per_s, r.bandwidth)
    data = f.data
    prompt_tokens = data.prompt_tokens_mean if data is not None else None
    new_tokens, length_note = max_new_tokens_for(
        data.answer_tokens_p95 if data is not None else None, costs.completion_tokens, costs.cap
    )
    overrides, estimate = size_online_run(
        costs,
        r.hours,
        prompt_tokens if prompt_tokens is not None else ASSUMED_PROMPT_TOKENS,
        new_tokens,
        group=spec.name in ("grpo", "rloo"),
    )
    notes = [length_note] if length_note else []
    if prompt_tokens is None:
        notes.append(f"prompt length assumed {ASSUMED_PROMPT_TOKENS:.0f} tokens (no prompts read)")
    if estimate["too_short"]:
        notes.append(
            f"{r.hours:g} h fit only {estimate['iterations']} iterations of "
            f"{overrides['rollout.prompts_per_iteration']} prompts x "
            f"{overrides['rollout.samples_per_prompt']} samples "
            f"({estimate['seconds_per_iteration']:.0f} s each): allow more hours, a smaller "
            "model or fewer rollout.max_new_tokens"
        )
    return overrides, estimate, notes
