"""A setting that has no effect under the others is a ConfigError naming what would enable it
(issue 27 section 3); its default, written out, still loads; the shipped configs all load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from alignkit.config import load_config
from alignkit.config.schema import is_changed, setting, shown
from alignkit.errors import ConfigError
from alignkit.pipeline import load_pipeline
from alignkit.pipeline.spec import PipelineError, resolve
from alignkit.quickstart import PRESETS
from alignkit.trainers.registry import get_method

ROOT = Path(__file__).resolve().parents[2]
EVAL = "data.eval_file=heldout.jsonl"
KL_ON = "kl.coef=0.1"
ADAPTIVE = [KL_ON, "kl.controller=adaptive"]


@dataclass(frozen=True)
class Case:
    """`change` (key=value) under the settings `unused` is ignored, so an error matching
    `message`; under `used` (None: nothing enables it) it loads."""

    method: str
    change: str
    unused: tuple[str, ...]
    used: tuple[str, ...] | None
    message: str

    @property
    def key(self) -> str:
        return self.change.split("=", 1)[0]


def case(method: str, change: str, unused=(), used=(), message: str = "") -> Case:
    return Case(method, change, tuple(unused), None if used is None else tuple(used), message)


CASES = [
    # every run
    case("sft", "overwrite=true", ["resume_from=runs/x"], [], "with resume_from=runs/x"),
    case("sft", "allow_change=[optim.lr]", [], ["resume_from=runs/x"], "set resume_from"),
    case("sft", "optim.warmup_ratio=0.1", ["optim.warmup_steps=5"], [], "optim.warmup_steps=5"),
    case("sft", "logging.wandb_project=mine", [], ["logging.report_to=[jsonl, wandb]"], "wandb"),
    *(
        case("sft", change, [], ["eval.early_stopping.metric=eval/loss"], "metric=null")
        for change in (
            "eval.early_stopping.mode=max",
            "eval.early_stopping.patience=5",
            "eval.early_stopping.min_delta=0.1",
        )
    ),
    # data of the offline trainers
    case(
        "sft",
        "data.train_weights=[2.0]",
        ["data.train_file=a.jsonl"],
        ["data.train_file=[a.jsonl]"],
        "a single data.train_file",
    ),
    case("sft", "data.eval_split=test", [], [EVAL], "data.eval_file=null"),
    case("sft", "data.max_eval_examples=5", [], [EVAL], "data.eval_file=null"),
    # evaluation without held-out data, per trainer
    case("sft", "eval.every=5", [], [EVAL], "data.eval_file=null"),
    case("sft", "eval.examples_per_device=4", [], [EVAL], "data.eval_file=null"),
    case("rm", "eval.every=5", [], [EVAL], "data.eval_file=null"),
    case("rm", "eval.examples_per_device=4", [], [EVAL], "data.eval_file=null"),
    case("dpo", "eval.every=5", [], [EVAL], "data.eval_file=null"),
    case(
        "dpo",
        "eval.examples_per_device=4",
        ["dpo.kind=simpo"],
        ["dpo.kind=sigmoid"],
        "no reference pass",
    ),
    case("grpo", "eval.every=5", [], [EVAL], "data.eval_file=null"),
    case("grpo", "data.max_eval_prompts=10", [], [EVAL], "data.eval_file=null"),
    # SFT
    case("sft", "model.packed=false", [], ["packing=true"], "packing=false"),
    # reward and cost models
    case("cost", "use_margin=false", [], ["kind=reward"], "kind=cost"),
    case("cost", "reward_model.task_weights.preference=2", [], ["kind=reward"], "kind=cost"),
    case("rm", "reward_model.mlp_dropout=0.2", [], ["reward_model.head=mlp"], "head=linear"),
    case(
        "rm",
        "reward_model.task_weights.helpfulness=2",
        [],
        ["reward_model.aux_heads=[helpfulness]"],
        "aux_heads=[]",
    ),
    case(
        "rm",
        "reward_model.task_weights.safety=2",
        [],
        ["reward_model.aux_heads=[safety]"],
        "aux_heads=[]",
    ),
    case("rm-ensemble", "checkpoint.every=5", [EVAL], None, "in rm-ensemble"),
    case("rm-ensemble", "checkpoint.keep_last=1", [EVAL], None, "in rm-ensemble"),
    # Safe-DPO (the reported case first) and Safe-PPO's multiplier
    case(
        "safe-dpo",
        "safety.cost_model=runs/cost",
        [],
        None,
        "safety.cost_model is set but has no effect with safety.source=data; set "
        "safety.source=cost_model to use it",
    ),
    case(
        "safe-dpo",
        "lambda.preference=implicit_reward",
        ["lambda.cost_estimator=data"],
        [],
        "lambda.cost_estimator=data",
    ),
    case("safe-dpo", "lambda.ema=0.5", ["lambda.rule=linear"], [], "lambda.rule=linear"),
    case("safe-ppo", "lambda.ema=0.5", ["lambda.rule=linear"], [], "lambda.rule=linear"),
    # online RL: the reference and the KL penalty
    case("grpo", "reference=tiny", [], [KL_ON], "kl.coef=0.0"),
    case("grpo", "kl.placement=loss", [], [KL_ON], "kl.coef=0.0"),
    case("grpo", "kl.estimator=k2", [], [KL_ON], "kl.coef=0.0"),
    case("grpo", "kl.rule=multiplicative", [KL_ON], ADAPTIVE, "kl.controller=fixed"),
    case("grpo", "kl.target=0.2", [KL_ON], ADAPTIVE, "kl.controller=fixed"),
    case("grpo", "kl.horizon=100", [KL_ON], ADAPTIVE, "kl.controller=fixed"),
    case(
        "grpo",
        "kl.horizon=100",
        [*ADAPTIVE, "kl.rule=multiplicative"],
        ADAPTIVE,
        "kl.rule=multiplicative",
    ),
    # advantage estimators and policy losses
    case("grpo", "advantage.gamma=0.9", [], ["advantage.estimator=reinforce"], "estimator=grpo"),
    case("grpo", "advantage.lam=0.9", [], ["advantage.estimator=gae"], "estimator=grpo"),
    case("reinforce", "advantage.lam=0.9", [], ["advantage.estimator=gae"], "estimator=reinforce"),
    *(
        case("reinforce", change, [], ["policy_loss.name=ppo_clip"], "name=policy_gradient")
        for change in (
            "policy_loss.clip_ratio=0.3",
            "policy_loss.clip_ratio_high=0.3",
            "policy_loss.dual_clip=3",
        )
    ),
    # rollouts
    case("grpo", "rollout.alpha=snr", [], ["rollout.teacher=tiny"], "rollout.teacher=null"),
    case(
        "grpo",
        "rollout.teacher_floor=0.2",
        ["rollout.teacher=tiny"],
        ["rollout.teacher=tiny", "rollout.alpha=min_variance"],
        "alpha=kl_symmetry",
    ),
    case("grpo", "rollout.correction.cap=3", [], ["rollout.top_p=0.9"], "on-policy"),
    case("grpo", "rollout.correction.level=sequence", [], ["rollout.engine=vllm"], "on-policy"),
    case(
        "grpo",
        "rollout.correction.lower=0.5",
        ["rollout.top_k=5"],
        ["rollout.top_k=5", "rollout.correction.mode=mask"],
        "mode=truncate",
    ),
    case("grpo", "rollout.vllm.sync_every=2", [], ["rollout.engine=vllm"], "engine=transformers"),
    case(
        "grpo",
        "rollout.vllm.probe_max_gap=0.1",
        ["rollout.engine=vllm", "rollout.vllm.probe=false"],
        ["rollout.engine=vllm"],
        "probe=false",
    ),
    # the offline loop's settings in an online trainer
    case("grpo", "eval.examples_per_device=4", [], None, "online trainer"),
    case("grpo", "dataloader_workers=2", [], None, "online trainer"),
    case("ppo", "gradient_checkpointing=true", [], None, "online trainer"),
]


def load(method: str, overrides: list[str]):
    chosen = get_method(method)
    config_class, _ = chosen.load()
    return load_config(config_class, None, [*chosen.defaults, *overrides])


def ids(c: Case) -> str:
    return f"{c.method}:{c.change}" + (f"|{','.join(c.unused)}" if c.unused else "")


@pytest.mark.parametrize("c", CASES, ids=ids)
def test_an_ignored_setting_is_an_error_naming_what_enables_it(c: Case) -> None:
    with pytest.raises(ConfigError) as error:
        load(c.method, [*c.unused, c.change])
    message = str(error.value)
    assert f"{c.key} is set but has no effect" in message
    assert c.message in message


@pytest.mark.parametrize("c", [c for c in CASES if c.used is not None], ids=ids)
def test_the_same_setting_loads_where_it_is_used(c: Case) -> None:
    cfg = load(c.method, [*c.used, c.change])
    assert is_changed(cfg, c.key)  # kept as given


@pytest.mark.parametrize("c", CASES, ids=ids)
def test_the_default_written_out_is_not_an_error(c: Case) -> None:
    default = setting(load(c.method, list(c.unused)), c.key)
    cfg = load(c.method, [*c.unused, f"{c.key}={shown(default)}"])
    assert setting(cfg, c.key) == default


def test_rm_ensemble_implies_its_early_stopping_metric() -> None:
    # Each member stops early on held-out accuracy unless told otherwise, so patience counts.
    cfg = load("rm-ensemble", [EVAL, "eval.early_stopping.patience=5"])
    rule = cfg.eval.early_stopping
    assert (rule.metric, rule.direction, rule.patience) == ("eval/accuracy", "max", 5)
    named = load("rm-ensemble", [EVAL, "eval.early_stopping.metric=eval/loss"])
    assert named.eval.early_stopping.metric == "eval/loss"


@pytest.mark.parametrize(
    "stage, message",
    [
        ("{name: a, method: sft, config: examples/sft.yaml, args: {x: 1}}", "'args' is set"),
        (
            "{name: a, tool: data-synthetic, args: {out: d}, config: examples/sft.yaml}",
            "'config' is set",
        ),
        (
            "{name: a, tool: data-synthetic, args: {out: d}, overrides: [epochs=2]}",
            "'overrides' is set",
        ),
    ],
)
def test_a_pipeline_stage_key_its_kind_ignores_is_an_error(
    stage: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    path = tmp_path / "p.yaml"
    path.write_text(f"stages:\n  - {stage}\n")
    with pytest.raises(PipelineError, match=message):
        load_pipeline(path)


@pytest.mark.parametrize("name", ["classic", "hybrid"])
def test_every_training_stage_of_the_example_pipelines_loads(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    spec = load_pipeline(f"examples/pipelines/{name}.yaml")
    artifacts = {
        s.name: {"run_dir": f"runs/{s.name}", "model": f"runs/{s.name}/model"} for s in spec.stages
    }
    stages = [s for s in spec.stages if s.method is not None]
    assert stages
    for stage in stages:
        overrides = resolve(list(stage.overrides), artifacts, stage.name)
        chosen = get_method(stage.method)
        config_class, _ = chosen.load()
        cfg = load_config(config_class, stage.config, [*chosen.defaults, *overrides])
        assert cfg.run_name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_quickstart_stage_config_loads(preset: str) -> None:
    # The overrides run_quickstart gives each stage (its data files replaced by names).
    settings = PRESETS[preset]
    common = ["overwrite=true", f"data.max_length={settings.max_length}"]
    held_out = ["data.train_file=train.jsonl", EVAL]
    load("sft", [*common, *held_out, *settings.sft])
    load("dpo", [*common, *held_out, *settings.dpo])
    load("safe-dpo", [*common, *held_out, *settings.safe_dpo])
    load("sft", ["overwrite=true", "data.train_file=sort.jsonl", *settings.sort_warmup])
    load("grpo", ["overwrite=true", *held_out, "rewards=[{function: sort_match}]", *settings.grpo])
