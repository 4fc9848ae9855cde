"""`alignkit recommend`: the alignment method for this data, model, machine and need."""

from __future__ import annotations

import json
from pathlib import Path

import typer

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
        from alignkit.recommend.features import ModelFeatures
        from alignkit.recommend.rules import METHODS

        unknown = sorted(set(need or ()) - {"safety"})
        if unknown:
            raise ConfigError(f"--need {unknown[0]!r}: the only requirement is 'safety'")
        assumptions = []
        data_features = measure_data(data) if data is not None else None
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
        if hours is None:
            assumptions.append(f"a {ASSUMED_HOURS:.0f}-hour budget (no --hours)")
        else:
            resources = Resources(
                resources.gpus, resources.gpu_memory_gb, hours, resources.measured
            )
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
        if rec.method is not None and model is not None:
            rec.config_path = str(write_config(rec, out))
            rec.command = f"alignkit train {METHODS[rec.method].cli} -c {rec.config_path}"
            if data is None:
                rec.notes.append(f"set data.train_file in {rec.config_path} before running")
        if as_json:
            typer.echo(json.dumps(rec.as_dict(), indent=2))
        else:
            print_recommendation(rec, Console(soft_wrap=True))
