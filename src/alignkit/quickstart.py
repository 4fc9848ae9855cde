"""The quickstart: SFT, then DPO and Safe-DPO from the SFT model, on the bundled synthetic task;
then online RL: GRPO on a verifiable task (digit sorting) from a short SFT warm-up.

It shows the whole pipeline on a laptop CPU in a few minutes and answers two questions with
numbers: does Safe-DPO make the policy safer without making it useless, and does GRPO raise a
verifiable reward? It is a pipeline of `alignkit.pipeline` (`quickstart_pipeline`: the data,
the training stages, and after each an ``eval-task`` stage that judges its model's greedy
answers to held-out prompts), run from scratch each time; the tables are read from the stages'
records. Each training stage is an ordinary run directory (config, metrics, checkpoints, plots)
that `alignkit train` would write.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from alignkit.config import atomic_write_text
from alignkit.pipeline import PipelineSpec, Stage, StageRecord, run_pipeline
from alignkit.tracking import RunDir, read_metrics


@dataclass(frozen=True)
class StageSettings:
    """Overrides of each stage for one model size, and how many held-out prompts are judged."""

    sft: tuple[str, ...]
    dpo: tuple[str, ...]
    safe_dpo: tuple[str, ...]
    max_length: int
    judged_prompts: int | None = None  # None: all 96
    # Prompts as one user message, rendered with the model's chat template. An instruct model
    # then reads a request the way it was trained to, and the answer follows the template's
    # assistant header instead of being glued to the question's last character.
    chat_prompts: bool = False
    # Online stage (tiny preset only): the sorting task's SFT warm-up, then GRPO from it.
    sort_warmup: tuple[str, ...] = (
        "epochs=10",
        "examples_per_device=16",
        "optim.lr=5e-3",
        "optim.schedule=cosine",
        "optim.warmup_ratio=0.05",
    )
    grpo: tuple[str, ...] = (
        "train.iterations=100",
        "rollout.prompts_per_iteration=16",
        "rollout.samples_per_prompt=8",
        "rollout.max_new_tokens=8",
        "train.sequences_per_device=64",
        "optim.lr=5e-4",
        "optim.schedule=constant",
        "kl.coef=0.02",
        "kl.placement=loss",
        "data.max_eval_prompts=100",
    )


# The tiny preset learns the task in seconds with a high learning rate. A real 135M model is
# about 100x slower per token on a CPU: it gets one SFT epoch and 24 preference steps on a
# random subset of the pairs, so the whole run stays near ten minutes. Its prompts go through
# the chat template (`chat_prompts`): as raw text glued to the answer, SFT drives
# P("Sure" | harmful prompt) to ~0.99, and no preference stage of this length moves the first
# greedy token (measured at lr 5e-6 and 5e-5, and over a full epoch at 2e-5). With the template
# it is ~0.8 after SFT, and lr 3e-5 lets Safe-DPO move it (lr 5e-6 only took 6 points off the
# unsafe rate). Safe-DPO starts at lambda 4: at lambda 1 the normalised loss weighs helpfulness
# (comply) and safety (refuse) nearly equally on the conflicting pairs, and 24 steps took only
# 25 points off (1.00 -> 0.75); J_C < 0 from the first step, so lambda only falls from there.
_PREFERENCE_PRETRAINED = (
    "epochs=1",
    "examples_per_device=8",
    "data.max_train_examples=192",
    "data.max_eval_examples=48",
    "optim.lr=3e-5",
    "dpo.beta=0.1",
)
PRESETS: dict[str, StageSettings] = {
    "tiny": StageSettings(
        sft=(
            "epochs=12",
            "examples_per_device=16",
            "optim.lr=5e-3",
            "optim.schedule=cosine",
            "optim.warmup_ratio=0.05",
        ),
        dpo=("epochs=1", "examples_per_device=8", "optim.lr=1e-3", "dpo.beta=0.1"),
        safe_dpo=("epochs=1", "examples_per_device=8", "optim.lr=1e-3", "dpo.beta=0.1"),
        max_length=128,
    ),
    "pretrained": StageSettings(
        sft=(
            "epochs=1",
            "examples_per_device=8",
            "data.max_eval_examples=16",
            "optim.lr=3e-5",
            "optim.schedule=cosine",
            "optim.warmup_ratio=0.05",
        ),
        dpo=_PREFERENCE_PRETRAINED,
        safe_dpo=(*_PREFERENCE_PRETRAINED, "lambda.init=4.0"),
        max_length=160,
        judged_prompts=48,
        chat_prompts=True,
    ),
}


@dataclass
class StageResult:
    name: str
    run_dir: Path | None
    metrics: dict[str, float]
    preference_accuracy: float | None = None
    lambda_trajectory: tuple[float, float, float, float] | None = None  # start, max, min, end
    seconds: float = 0.0
    examples: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class OnlineResult:
    """One row of the online table: greedy reward and accuracy on held-out sorting prompts."""

    stage: str
    run_dir: str
    reward: float
    accuracy: float
    seconds: float


#: The judged models in table order: the row's name and the stage that trained the model.
JUDGED = (("untrained", None), ("SFT", "sft"), ("DPO", "dpo"), ("Safe-DPO", "safe-dpo"))


def quickstart_pipeline(
    out_dir: str | Path = "runs/quickstart", model: str = "tiny", seed: int = 0
) -> PipelineSpec:
    """The quickstart's stages (pipeline directory ``out_dir``): the bundled data; SFT from
    ``model``, then DPO and Safe-DPO from the SFT model, with a judge (``judge_<stage>``) of the
    untrained model and after each training stage; then, for the tiny preset, the sorting
    task's SFT warm-up and GRPO from it (which evaluates its own model before and after)."""
    out = Path(out_dir)
    preset = PRESETS["tiny" if model == "tiny" else "pretrained"]
    data = out / "data"
    chat = "chat_" if preset.chat_prompts else ""
    judge = {"seed": seed, "max_prompts": preset.judged_prompts, "chat": preset.chat_prompts}
    # logging every 4 steps: dense enough for the plots and the lambda summary
    common = (f"seed={seed}", "logging.every=4", f"data.max_length={preset.max_length}")

    def trained(name: str, start: str, kind: str, overrides: tuple[str, ...]) -> list[Stage]:
        files = (
            f"data.train_file={data / f'{chat}{kind}_train.jsonl'}",
            f"data.eval_file={data / f'{chat}{kind}_heldout.jsonl'}",
        )
        return [
            Stage(
                name, method=name, overrides=(*common, f"model.name={start}", *files, *overrides)
            ),
            Stage(f"judge_{name}", tool="eval-task", args={**judge, "model": _model(name)}),
        ]

    written = {"out": str(data), "seed": seed, "chat": preset.chat_prompts}
    stages = [
        Stage("data", tool="data-synthetic", args=written),
        Stage("judge_untrained", tool="eval-task", args={**judge, "model": model}),
        *trained("sft", model, "sft", preset.sft),
        *trained("dpo", _model("sft"), "preference", preset.dpo),
        *trained("safe-dpo", _model("sft"), "safety", preset.safe_dpo),
    ]
    if model == "tiny":
        warmup = (
            f"seed={seed}",
            "model.name=tiny",
            f"data.train_file={data / 'sort_sft.jsonl'}",
            "data.max_length=32",
            "logging.every=19",
            *preset.sort_warmup,
        )
        grpo = (
            f"seed={seed}",
            f"model.name={_model('sft_sort')}",
            f"data.train_file={data / 'sort_prompts.jsonl'}",
            f"data.eval_file={data / 'sort_heldout.jsonl'}",
            "data.max_prompt_length=32",
            "rewards=[{function: sort_match}]",
            "logging.every=10",
            *preset.grpo,
        )
        stages += [
            Stage("sft_sort", method="sft", overrides=warmup),
            Stage("grpo", method="grpo", overrides=grpo),
        ]
    return PipelineSpec(out.name, out.parent, tuple(stages), source="alignkit quickstart")


def run_quickstart(
    out_dir: str | Path = "runs/quickstart",
    model: str = "tiny",
    seed: int = 0,
    console: Console | None = None,
) -> list[StageResult]:
    """Run the quickstart's pipeline and return what the table shows."""
    console = console or Console()
    out = Path(out_dir)
    spec = quickstart_pipeline(out, model, seed)
    about = "SFT; DPO (helpfulness preferences) and Safe-DPO (helpfulness + safety, Lagrange "
    about += "multiplier) from the SFT model; each model judged on held-out prompts"
    if model == "tiny":
        about += "; then GRPO on a verifiable task (digit sorting) from an SFT warm-up"
    console.print(about, markup=False)
    # From the first stage: every stage runs afresh, as a quickstart should (by default the
    # runner skips what an earlier run of the same stages completed).
    ran = run_pipeline(spec, from_stage=spec.stages[0].name, console=console)
    records = {r.name: r for r in ran}
    results = [_judged(name, stage, records) for name, stage in JUDGED]
    online = _online(records) if "grpo" in records else []
    _print_report(console, results, out)
    if online:
        _print_online_report(console, online)
    report = [_as_json(r) for r in results] + [dataclasses.asdict(r) for r in online]
    atomic_write_text(out / "quickstart.json", json.dumps(report, indent=2, default=str))
    return results


def _model(stage: str) -> str:
    return f"${{stages.{stage}.model}}"


def _judged(name: str, stage: str | None, records: dict[str, StageRecord]) -> StageResult:
    """A table row: the judge's metrics and first answers, and what its model's stage did."""
    judge = records[f"judge_{stage or 'untrained'}"]
    answers = Path(judge.artifacts["run_dir"]) / "generations.jsonl"
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()[:4]]
    examples = [
        (r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"], r["response"])
        for r in rows
    ]
    result = StageResult(name, None, judge.artifacts["metrics"], examples=examples)
    if stage is None:
        return result
    trained = records[stage]
    result.run_dir = Path(trained.artifacts["run_dir"])
    result.seconds = trained.seconds + judge.seconds
    if stage == "sft":  # the SFT model is the reference: every margin is 0
        result.preference_accuracy = 0.5
        result.seconds += records["judge_untrained"].seconds
    else:
        result.preference_accuracy = trained.artifacts["eval"].get("eval/rewards/accuracies")
    if stage == "safe-dpo":
        result.lambda_trajectory = _lambda_trajectory(RunDir(result.run_dir))
    return result


def _lambda_trajectory(run: RunDir) -> tuple[float, float, float, float]:
    init = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))["lambda"]["init"]
    values = [float(init), *(r["lambda"] for r in read_metrics(run.metrics_path) if "lambda" in r)]
    return values[0], max(values), min(values), values[-1]


def _online(records: dict[str, StageRecord]) -> list[OnlineResult]:
    """The sorting task's rows: GRPO's evaluation of its starting model (the warm-up's) and of
    its final one."""
    warmup, grpo = records["sft_sort"], records["grpo"]
    run = RunDir(grpo.artifacts["run_dir"])
    before = json.loads(run.summary_path.read_text(encoding="utf-8"))["initial_eval"]
    after = grpo.artifacts["eval"]
    return [
        OnlineResult(
            "SFT warm-up", warmup.artifacts["run_dir"], before["eval/reward"],
            before["eval/accuracy"], warmup.seconds,
        ),
        OnlineResult(
            "GRPO", str(run.root), after["eval/reward"], after["eval/accuracy"], grpo.seconds
        ),
    ]  # fmt: skip


def _print_online_report(console: Console, results: list[OnlineResult]) -> None:
    table = Table(title="digit sorting, held-out prompts, greedy decoding")
    for column in ("model", "reward", "accuracy", "time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        table.add_row(r.stage, f"{r.reward:.3f}", f"{r.accuracy:.0%}", f"{r.seconds:.0f}s")
    console.print(table)
    console.print(
        "reward: share of digit positions right (sort_match, 1 = sorted); accuracy: share of "
        f"prompts answered exactly. GRPO run: {results[-1].run_dir}"
    )


def _print_report(console: Console, results: list[StageResult], out: Path) -> None:
    table = Table(title="held-out prompts, greedy decoding, programmatic judges")
    for column in (
        "model",
        "helpful benign",
        "helpful harmful",
        "unsafe",
        "cost",
        "pref acc",
        "time",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        m = r.metrics
        table.add_row(
            r.name,
            f"{m['helpfulness_benign']:.2f}",
            f"{m['helpfulness_harmful']:.2f}",
            f"{m['unsafe_rate']:.0%}",
            f"{m['cost']:+.2f}",
            "-" if r.preference_accuracy is None else f"{r.preference_accuracy:.2f}",
            f"{r.seconds:.0f}s" if r.seconds else "-",
        )
    console.print(table)
    console.print(
        "helpful: judged helpfulness in [0, 1]; unsafe: share of harmful prompts answered "
        "unsafely; cost: mean safety cost in [-1, 1] (> 0 unsafe); pref acc: held-out "
        "implicit-reward accuracy on the stage's own preference pairs (0.5 = chance)."
    )
    for r in results:
        if r.lambda_trajectory is not None:
            start, high, low, end = r.lambda_trajectory
            console.print(
                f"{r.name} lambda: start {start:.3f}, max {high:.3f}, min {low:.3f}, end {end:.3f}",
                markup=False,
            )
    for r in results:
        if r.run_dir is not None:
            plots = sorted((r.run_dir / "plots").glob("*.png"))
            names = ", ".join(p.name for p in plots)
            console.print(f"{r.name}: {r.run_dir}  plots: {names}", markup=False)
    console.print(f"summary: {out / 'quickstart.json'}", markup=False)


def _as_json(r: StageResult) -> dict[str, Any]:
    return {
        "stage": r.name,
        "run_dir": str(r.run_dir) if r.run_dir else None,
        "metrics": r.metrics,
        "preference_accuracy": r.preference_accuracy,
        "lambda_start_max_min_end": r.lambda_trajectory,
        "seconds": round(r.seconds, 2),
        "examples": r.examples,
    }
