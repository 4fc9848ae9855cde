"""The quickstart: SFT, then DPO and Safe-DPO from the SFT model, on the bundled synthetic task;
then online RL: GRPO on a verifiable task (digit sorting) from a short SFT warm-up.

It shows the whole pipeline on a laptop CPU in a few minutes and answers two questions with
numbers: does Safe-DPO make the policy safer without making it useless, and does GRPO raise a
verifiable reward? Each stage is an ordinary run directory (config, metrics, checkpoints,
plots) that `alignkit train` would write.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from alignkit.config import atomic_write_text, load_config
from alignkit.data.synthetic import SPLITS, SyntheticTask
from alignkit.eval import evaluate_synthetic_task
from alignkit.models import load_policy
from alignkit.rollout import SamplingConfig
from alignkit.rollout.generate import PromptText
from alignkit.tracking import read_metrics
from alignkit.trainers.dpo import DPOConfig, build_dpo_trainer
from alignkit.trainers.safe_dpo import SafeDPOConfig, build_safe_dpo_trainer
from alignkit.trainers.sft import SFTConfig, build_sft_trainer


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


def run_quickstart(
    out_dir: str | Path = "runs/quickstart",
    model: str = "tiny",
    seed: int = 0,
    console: Console | None = None,
) -> list[StageResult]:
    """Run the three stages and return what the table shows."""
    console = console or Console()
    out = Path(out_dir)
    preset = PRESETS["tiny" if model == "tiny" else "pretrained"]
    task = SyntheticTask(seed=seed)
    files = task.write(out / "data")
    prompts: list[PromptText] = list(task.prompts("heldout"))
    if preset.judged_prompts is not None and preset.judged_prompts < len(prompts):
        chosen = sorted(random.Random(seed).sample(range(len(prompts)), preset.judged_prompts))
        prompts = [prompts[i] for i in chosen]
    if preset.chat_prompts:
        files |= _with_chat_prompts(files)
        prompts = [_user_message(p) for p in prompts]
    common = [
        f"output_dir={out}",
        f"seed={seed}",
        "overwrite=true",
        "logging.every=4",  # dense enough for the plots and the lambda summary
        f"data.max_length={preset.max_length}",
    ]
    results: list[StageResult] = []

    console.rule("[bold]1/3 SFT")
    started = time.perf_counter()
    sft_cfg = load_config(
        SFTConfig,
        None,
        [
            *common,
            "run_name=sft",
            f"model.name={model}",
            f"data.train_file={files['sft_train']}",
            f"data.eval_file={files['sft_heldout']}",
            *preset.sft,
        ],
    )
    sft = build_sft_trainer(sft_cfg)
    base_policy, tokenizer = load_policy(model, seed=seed)
    base = _judge("untrained", None, base_policy, tokenizer, prompts)
    summary = sft.train()
    sft_model = Path(summary["last_checkpoint"]) / "model"
    result = _judge("SFT", sft_cfg.run_dir, sft.unwrapped_model, tokenizer, prompts)
    result.preference_accuracy = 0.5  # the SFT model is the reference: every margin is 0
    result.seconds = time.perf_counter() - started
    results += [base, result]

    for title, config_class, builder, stage_overrides, data in (
        (
            "2/3 DPO (helpfulness preferences)",
            DPOConfig,
            build_dpo_trainer,
            preset.dpo,
            "preference",
        ),
        (
            "3/3 Safe-DPO (helpfulness + safety, Lagrange multiplier)",
            SafeDPOConfig,
            build_safe_dpo_trainer,
            preset.safe_dpo,
            "safety",
        ),
    ):
        console.rule(f"[bold]{title}")
        started = time.perf_counter()
        name = "dpo" if config_class is DPOConfig else "safe-dpo"
        cfg = load_config(
            config_class,
            None,
            [
                *common,
                f"run_name={name}",
                f"model.name={sft_model}",
                f"data.train_file={files[data + '_train']}",
                f"data.eval_file={files[data + '_heldout']}",
                *stage_overrides,
            ],
        )
        trainer = builder(cfg)
        summary = trainer.train()
        label = "DPO" if name == "dpo" else "Safe-DPO"
        result = _judge(label, cfg.run_dir, trainer.unwrapped_model, tokenizer, prompts)
        result.preference_accuracy = summary["eval"].get("eval/rewards/accuracies")
        if name == "safe-dpo":
            result.lambda_trajectory = _lambda_trajectory(cfg.run_dir, cfg.lambda_.init)
        result.seconds = time.perf_counter() - started
        results.append(result)

    online: list[OnlineResult] = []
    if model == "tiny":
        online = _online_stage(console, out, seed, preset)
    _print_report(console, results, out)
    if online:
        _print_online_report(console, online)
    report = [_as_json(r) for r in results] + [dataclasses.asdict(r) for r in online]
    atomic_write_text(out / "quickstart.json", json.dumps(report, indent=2, default=str))
    return results


@dataclass
class OnlineResult:
    """One row of the online table: greedy reward and accuracy on held-out sorting prompts."""

    stage: str
    run_dir: str
    reward: float
    accuracy: float
    seconds: float


def _online_stage(
    console: Console, out: Path, seed: int, preset: StageSettings
) -> list[OnlineResult]:
    """SFT warm-up on the digit-sorting task, then GRPO from it (tiny preset only)."""
    from alignkit.data.synthetic import write_verifiable_tasks
    from alignkit.trainers.pg import build_pg_trainer
    from alignkit.trainers.registry import get_method
    from alignkit.trainers.rl_config import PGConfig

    console.rule("[bold]4/4 GRPO on a verifiable task (digit sorting) from an SFT warm-up")
    started = time.perf_counter()
    files = write_verifiable_tasks(out / "data", seed=seed)
    common = [f"output_dir={out}", f"seed={seed}", "overwrite=true"]
    warmup = load_config(
        SFTConfig,
        None,
        [
            *common,
            "run_name=sft_sort",
            "model.name=tiny",
            f"data.train_file={files['sort_sft']}",
            "data.max_length=32",
            "logging.every=19",
            *preset.sort_warmup,
        ],
    )
    warm_model = Path(build_sft_trainer(warmup).train()["last_checkpoint"]) / "model"
    warm_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cfg = load_config(
        PGConfig,
        None,
        [
            *get_method("grpo").defaults,
            *common,
            "run_name=grpo",
            f"model.name={warm_model}",
            f"data.train_file={files['sort_prompts']}",
            f"data.eval_file={files['sort_heldout']}",
            "data.max_prompt_length=32",
            "rewards=[{function: sort_match}]",
            "logging.every=10",
            *preset.grpo,
        ],
    )
    summary = build_pg_trainer(cfg).train()
    before, after = summary["initial_eval"], summary["eval"]
    return [
        OnlineResult(
            "SFT warm-up", str(warmup.run_dir), before["eval/reward"],
            before["eval/accuracy"], warm_seconds,
        ),
        OnlineResult(
            "GRPO", str(cfg.run_dir), after["eval/reward"], after["eval/accuracy"],
            time.perf_counter() - started,
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


def _user_message(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _with_chat_prompts(files: dict[str, Path]) -> dict[str, Path]:
    """Copies (``chat_<name>``) of the SFT and preference files whose prompt is a user message."""
    chat: dict[str, Path] = {}
    for kind in ("sft", "preference", "safety"):
        for split in SPLITS:
            path = files[f"{kind}_{split}"]
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            lines = [
                json.dumps({**row, "prompt": _user_message(row["prompt"])}, ensure_ascii=False)
                for row in rows
            ]
            target = path.with_name(f"chat_{path.name}")
            atomic_write_text(target, "".join(line + "\n" for line in lines))
            chat[f"{kind}_{split}"] = target
    return chat


def _judge(
    name: str, run_dir: Path | None, model: Any, tokenizer: Any, prompts: Sequence[PromptText]
) -> StageResult:
    evaluation = evaluate_synthetic_task(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=40, temperature=0.0)
    )
    texts = [p if isinstance(p, str) else p[-1]["content"] for p in evaluation.prompts]
    examples = list(zip(texts, evaluation.responses, strict=True))[:4]
    return StageResult(name, run_dir, evaluation.metrics, examples=examples)


def _lambda_trajectory(run_dir: Path, init: float) -> tuple[float, float, float, float]:
    values = [row["lambda"] for row in read_metrics(run_dir / "metrics.jsonl") if "lambda" in row]
    values = [init, *values]
    return values[0], max(values), min(values), values[-1]


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
