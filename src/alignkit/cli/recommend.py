"""`alignkit recommend`: the alignment method for this data, model, machine and need."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from alignkit.recommend import Features, Recommendation

#: Scoring assumes this size when --model is not given (a typical small chat model).
ASSUMED_PARAMETERS = 1_000_000_000
ASSUMED_HOURS = 24.0
ASSUMED_GPU_MEMORY_GB = 80.0


def register(app: typer.Typer) -> None:
    @app.command("recommend")
    def recommend_command(
        data: Path | None = typer.Option(None, "--data", help="Training data file (any format)."),
        model: str | None = typer.Option(None, "--model", help="Model name or directory."),
        gpus: int | None = typer.Option(None, "--gpus", help="GPUs available (0: CPU)."),
        gpu_memory: float | None = typer.Option(None, "--gpu-memory", help="GB per GPU."),
        hours: float | None = typer.Option(None, "--hours", help="Training time budget."),
        need: list[str] | None = typer.Option(None, "--need", help="Requirement: safety."),
        online_reward: str | None = typer.Option(
            None, "--online-reward", help="A reward function you have (module:function)."
        ),
        reward_model: str | None = typer.Option(None, "--reward-model", help="Reward model dir."),
        cost_model: str | None = typer.Option(None, "--cost-model", help="Cost model dir."),
        stability: bool = typer.Option(False, "--stability", help="Prefer stable training."),
        simplicity: bool = typer.Option(False, "--simplicity", help="Prefer fewer moving parts."),
        out: Path = typer.Option(
            Path("recommended.yaml"), "--out", help="Where to write the winner's config."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON (schema in the docs)."),
    ) -> None:
        """Score PPO, GRPO, RLOO, DPO, IPO, Safe-DPO and Safe-PPO with documented rules, print
        the winner with every score's reasons, starting settings and a config to run."""
        from rich.console import Console

        from alignkit.errors import ConfigError
        from alignkit.recommend import (
            Features,
            Requirements,
            Resources,
            measure_data,
            measure_model,
            measure_resources,
            print_recommendation,
            recommend,
            write_config,
        )
        from alignkit.recommend.budget import MEASURE_MAX_PARAMETERS, measure_machine
        from alignkit.recommend.features import ModelFeatures
        from alignkit.recommend.rules import METHODS

        unknown = sorted(set(need or ()) - {"safety"})
        if unknown:
            raise ConfigError(f"--need {unknown[0]!r}: the only requirement is 'safety'")
        assumptions = []
        tokenizer = None
        if model is not None:
            from alignkit.models import load_tokenizer

            tokenizer = load_tokenizer(model)  # lengths in the model's own tokens
        data_features = measure_data(data, tokenizer) if data is not None else None
        if data_features is None:
            assumptions.append(
                "no --data: methods that need a data format are judged by the other inputs only"
            )
        if model is not None:
            model_features = measure_model(model)
        else:
            model_features = ModelFeatures("<your model>", ASSUMED_PARAMETERS, "unknown", False)
            assumptions.append(
                f"no --model: a {ASSUMED_PARAMETERS / 1e9:.0f}B-parameter causal "
                "LM; no config is written without one"
            )
        if gpus is None and gpu_memory is None:
            resources = measure_resources()
            where = (
                f"{resources.gpus} GPU(s) of {resources.gpu_memory_gb:.0f} GB"
                if resources.gpus
                else f"CPU only, {resources.gpu_memory_gb:.0f} GB RAM"
            )
            assumptions.append(f"resources measured on this machine: {where}")
        else:
            if gpu_memory is None:
                assumptions.append(f"{ASSUMED_GPU_MEMORY_GB:.0f} GB per GPU (no --gpu-memory)")
            if gpus is None:
                assumptions.append("1 GPU (no --gpus)")
            resources = Resources(
                1 if gpus is None else gpus,
                gpu_memory or ASSUMED_GPU_MEMORY_GB,
                ASSUMED_HOURS,
                False,
            )
            if resources.gpus == 0:  # a CPU budget: this CPU's rate is the one we can measure
                flops, bandwidth = measure_machine()
                resources = replace(resources, flops_per_s=flops, bandwidth=bandwidth)
                assumptions.append("the CPU's speed measured on this machine")
        if hours is None:
            assumptions.append(f"a {ASSUMED_HOURS:.0f}-hour budget (no --hours)")
        else:
            resources = replace(resources, hours=hours)
        features = Features(
            data_features,
            model_features,
            resources,
            Requirements(
                "safety" in (need or ()),
                online_reward,
                reward_model,
                cost_model,
                stability,
                simplicity,
            ),
            tuple(assumptions),
        )
        rec = recommend(features)
        measurable = (
            rec.method is not None
            and METHODS[rec.method].online
            and model is not None
            and model_features.parameters <= MEASURE_MAX_PARAMETERS
            and (resources.measured or resources.gpus == 0)
        )
        if measurable and data_features is not None and data_features.format == "prompt":
            rec = _measured(rec, features, model, data)
        if rec.method is not None and model is not None:
            rec.config_path = str(write_config(rec, out))
            rec.command = f"alignkit train {METHODS[rec.method].cli} -c {rec.config_path}"
            if data is None:
                rec.notes.append(f"set data.train_file in {rec.config_path} before running")
        if as_json:
            typer.echo(json.dumps(rec.as_dict(), indent=2))
        else:
            print_recommendation(rec, Console(soft_wrap=True))


def _measured(rec: Recommendation, features: Features, model: str, data: Path) -> Recommendation:
    """The recommendation again, its online settings sized from this machine's timings: the
    model's sampled answer lengths, then 2 short iterations of the recommended config."""
    import contextlib
    import io

    from alignkit.recommend import recommend
    from alignkit.recommend.budget import (
        max_new_tokens_for,
        measure_cap,
        prompts_of,
        sample_answer_lengths,
        time_iterations,
    )
    from alignkit.recommend.scoring import ASSUMED_PROMPT_TOKENS, run_settings

    prompts = prompts_of(data)
    if not prompts:
        return rec
    lora = next(s for s in rec.scores if s.method == rec.method).lora
    answers = features.data.answer_tokens_p95
    cap = measure_cap(answers)
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's start-up tables
        lengths = sample_answer_lengths(model, prompts, lora, cap)
        new_tokens, _ = max_new_tokens_for(answers, lengths, cap)
        config_class, entry_point, overrides = run_settings(rec)
        costs = time_iterations(
            config_class,
            entry_point,
            overrides,
            rec.hyperparameters["rollout.samples_per_prompt"],
            features.data.prompt_tokens_mean or ASSUMED_PROMPT_TOKENS,
            new_tokens,
            lengths,
            cap,
        )
    return recommend(features, costs)
