"""`alignkit eval rm|policy`: evaluate reward/cost models, ensembles and policies."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alignkit.cli.progress import progress_bar


def _print_table(title: str, report: dict, console: Console) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def add(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}/{key}" if prefix else str(key), inner)
        elif isinstance(value, float):
            table.add_row(prefix, f"{value:.4f}")
        elif not isinstance(value, list):
            table.add_row(prefix, str(value))

    add("", report)
    console.print(table)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Evaluate reward models, ensembles and policies.", no_args_is_help=True
    )
    app.add_typer(group, name="eval")

    @group.command("rm")
    def rm(
        model: Path = typer.Argument(..., help="A reward/cost model, its run, or an ensemble run."),
        data: Path = typer.Argument(..., help="Preference, safety or ratings data."),
        format: str | None = typer.Option(
            None, "--format", "-f", help="preference, safety or ratings (auto-detected)."
        ),
        out_dir: Path = typer.Option(Path("eval/rm"), help="Where report.json and PNGs go."),
        combination: str = typer.Option(
            "mean", help="Ensemble: mean, weighted, median, trimmed_mean or stacking."
        ),
        penalty: float = typer.Option(0.0, help="Ensemble: score = combined - penalty * std."),
        bins: int = typer.Option(10, min=2, help="Calibration bins."),
        device: str | None = typer.Option(None, help="Where the model runs (default cpu)."),
    ) -> None:
        """Accuracy, margin buckets, Kendall's tau, calibration, robustness, length bias."""
        from alignkit.config import atomic_write_text
        from alignkit.data.validate import load_validated
        from alignkit.errors import ConfigError
        from alignkit.eval.reward_model import evaluate_reward_model, pairs_from_records
        from alignkit.models.ensemble import load_reward_source

        report_in = load_validated(data, format)
        if report_in.format not in ("preference", "safety", "ratings"):
            raise ConfigError(f"{data}: eval rm reads preference, safety or ratings data")
        source = load_reward_source(model, combination=combination, penalty=penalty, device=device)
        records = [r.record for r in report_in.rows]
        pairs = pairs_from_records(records, report_in.format, source.kind, str(data))
        console = Console(soft_wrap=True)
        with progress_bar("scoring", console) as update:
            source.on_progress = update
            report = evaluate_reward_model(source, pairs, out_dir, bins)
        report["data"] = str(data)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
        _print_table(f"{source.name} on {data}", report, console)
        console.print(f"report: {out_dir / 'report.json'}", highlight=False)

    @group.command("policy")
    def policy(
        model: str = typer.Argument(
            ..., help="Policy: tiny, a model name, a directory, or a run (its best or final)."
        ),
        prompts: Path = typer.Argument(..., help="Prompt file (prompt format)."),
        reward: list[str] = typer.Option(
            ["synthetic"],
            help="Reward source(s), repeat for several: synthetic (the bundled judges), a "
            "reward/cost model or ensemble directory (or run), or a reward function as the "
            "trainers take it (my_reward.py:fn, module:fn, sort_match, reasoning_gym:<task>, "
            "'{function: math_accuracy, options: {format: boxed}}'), given the prompt rows' "
            "other columns. The first judges the win rate.",
        ),
        reference: str | None = typer.Option(None, help="Reference model for KL(pi || ref)."),
        versus: str | None = typer.Option(
            None,
            help="A second policy (e.g. the one trained from) for the win rate; every source "
            "scores both, and a trained reward preferring the policy while a judge rates it "
            "worse is reported (reward hacking).",
        ),
        max_new_tokens: int = typer.Option(48, min=1, help="Tokens generated per prompt."),
        temperature: float = typer.Option(
            1.0, min=0.0, help="Sampling temperature (1: the KL estimate is unbiased; 0: greedy)."
        ),
        max_prompts: int | None = typer.Option(None, help="Evaluate the first N prompts only."),
        batch_size: int = typer.Option(32, min=1, help="Prompts per generation batch."),
        seed: int = typer.Option(0, help="Sampling seed."),
        out_dir: Path = typer.Option(Path("eval/policy"), help="Where report.json goes."),
        device: str | None = typer.Option(None, help="Where the models run (default cpu)."),
    ) -> None:
        """Generate, then reward/cost/length statistics, KL to a reference, win rate."""
        from alignkit.config import atomic_write_text
        from alignkit.data import load_records
        from alignkit.eval.policy import evaluate_policy, reward_source
        from alignkit.models.loading import ensure_pad_token, load_policy, resolve_run_model

        console = Console(soft_wrap=True)

        said: set[str] = set()

        def resolved(name: str) -> str:
            path, note = resolve_run_model(name)
            if note and note not in said:
                said.add(note)
                console.print(note, markup=False, highlight=False)
            return path

        def load(name: str) -> tuple:
            loaded, tokenizer = load_policy(name)
            return loaded.to(device or "cpu"), ensure_pad_token(tokenizer, loaded)

        names = {"model": resolved(model)}
        names |= {k: resolved(v) for k, v in (("reference", reference), ("versus", versus)) if v}
        records = load_records(prompts, "prompt", keep_fields="all")
        records = records[:max_prompts] if max_prompts else records
        rows = [r["prompt"] for r in records]
        fields = [{k: v for k, v in r.items() if k != "prompt"} for r in records]
        sources = [reward_source(spec, device) for spec in reward]
        policy_model, tokenizer = load(names["model"])
        with progress_bar("generating", console) as update:
            report = evaluate_policy(
                policy_model,
                tokenizer,
                rows,
                sources,
                reference=load(names["reference"])[0] if reference else None,
                versus=load(names["versus"]) if versus else None,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                batch_size=batch_size,
                seed=seed,
                on_progress=update,
                fields=fields,
            )
        report |= {"model": names["model"], "reference": reference, "versus": versus}
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
        _print_table(f"{model} on {prompts}", report, console)
        for text in report.get("disagreements", []):
            console.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False)
        console.print(f"report: {out_dir / 'report.json'}", highlight=False)
