"""`alignkit data validate|convert|check|augment|split|select`: preference-data tools (seed 002
§4.2.3); `alignkit data reasoning-gym`: prompt files of reasoning-gym tasks."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

_FORMAT_HELP = "prompt, sft, preference, safety, ratings or pairwise (auto-detected when omitted)."


def register(data: typer.Typer) -> None:
    """Add the preference-data commands to the ``data`` command group."""

    @data.command("validate")
    def validate(
        file: Path = typer.Argument(..., help="The data file (JSONL, JSON, CSV/TSV, Parquet)."),
        format: str | None = typer.Option(None, "--format", "-f", help=_FORMAT_HELP),
    ) -> None:
        """List every problem of FILE (row, field, what is wrong); exit 2 when there is any."""
        from alignkit.data.validate import FORMAT_ALIASES, validate_file
        from alignkit.errors import ConfigError

        if format is not None and format not in FORMAT_ALIASES:
            raise ConfigError(
                f"--format must be one of {', '.join(FORMAT_ALIASES)}, got {format!r}"
            )
        report = validate_file(file, format)
        console = Console(soft_wrap=True, highlight=False)
        for problem in report.problems:
            console.print(str(problem), markup=False)
        console.print(report.summary(), markup=False)
        if not report.ok:
            raise typer.Exit(2)

    @data.command("convert")
    def convert(
        source_file: Path = typer.Argument(..., metavar="IN", help="Input data file."),
        out: Path = typer.Argument(..., metavar="OUT", help="Output .jsonl or .json file."),
        source: str = typer.Option(
            ..., "--from", help="ratings, pairwise, preference, pku or safety (flattened)."
        ),
        target: str = typer.Option(..., "--to", help="preference, pairwise, safety or pku."),
        min_gap: float = typer.Option(0.5, help="ratings: the smallest rating gap kept as a pair."),
        max_pairs_per_prompt: int | None = typer.Option(
            None, help="ratings: keep at most this many pairs per prompt (largest gaps first)."
        ),
        keep_ties: bool = typer.Option(
            False, help="pairwise: keep ties (preference 0.5) with margin 0 instead of dropping."
        ),
    ) -> None:
        """Convert IN from one preference format to another; other columns are kept."""
        from alignkit.data.convert import CONVERSIONS, convert_rows
        from alignkit.data.output import write_rows
        from alignkit.data.validate import load_validated
        from alignkit.errors import ConfigError

        if (source, target) not in CONVERSIONS:
            known = ", ".join(f"{a}->{b}" for a, b in CONVERSIONS)
            raise ConfigError(f"no conversion --from {source} --to {target}; known: {known}")
        report = load_validated(source_file, CONVERSIONS[(source, target)][0])
        result = convert_rows(
            report.rows,
            source,
            target,
            min_gap=min_gap,
            max_pairs_per_prompt=max_pairs_per_prompt,
            keep_ties=keep_ties,
        )
        written = write_rows(out, result.rows)
        note = f" ({result.note})" if result.note else ""
        Console(soft_wrap=True, highlight=False).print(
            f"{out}: {written} {target} rows from {len(report.rows)} {source} rows{note}",
            markup=False,
        )

    @data.command("check")
    def check(
        source_file: Path = typer.Argument(..., metavar="IN", help="Preference or safety pairs."),
        kept: Path = typer.Option(..., help="Where the rows that pass go (.jsonl/.json)."),
        rejected: Path = typer.Option(..., help="Where the other rows go, with their reasons."),
        format: str | None = typer.Option(
            None, "--format", "-f", help="preference or safety (auto-detected when omitted)."
        ),
        min_margin: float = typer.Option(0.0, help="Reject pairs whose margin is below this."),
        ngram: int = typer.Option(3, help="Word n-gram size of the repetition check."),
        max_repeat: float = typer.Option(
            0.5, help="Reject a response whose share of repeated n-grams exceeds this."
        ),
        echo_share: float = typer.Option(
            0.8, help="A response containing the prompt that makes up this share of it echoes it."
        ),
        min_agreement: float = typer.Option(
            0.6, help="Reject every vote on a pair whose annotators' majority share is below this."
        ),
    ) -> None:
        """Quality control: agreement, margins, degenerate responses, duplicates, length bias."""
        from alignkit.data.loaders import read_rows
        from alignkit.data.output import write_rows
        from alignkit.data.quality import QualityConfig, check_pairs
        from alignkit.data.validate import detect_format
        from alignkit.errors import ConfigError

        raw_rows = read_rows(source_file)
        fmt = format or detect_format([r.value for r in raw_rows if r.error is None])
        if fmt not in ("preference", "safety"):
            raise ConfigError(f"check works on preference or safety pairs, got format {fmt!r}")
        config = QualityConfig(min_margin, ngram, max_repeat, echo_share, min_agreement)
        report = check_pairs(raw_rows, config, fmt)
        write_rows(kept, report.kept)
        write_rows(rejected, report.rejected)
        Console(soft_wrap=True, highlight=False).print(f"{source_file}: {report.summary()}")

    @data.command("augment")
    def augment(
        source_file: Path = typer.Argument(..., metavar="IN", help="Preference pairs."),
        out: Path = typer.Argument(..., metavar="OUT", help="Output .jsonl or .json file."),
        transitivity: bool = typer.Option(
            False, "--transitivity", help="Add a > c from a > b and b > c (cycles reported)."
        ),
        decay: float = typer.Option(0.5, help="Margin factor per extra judgement on the path."),
        max_hops: int = typer.Option(2, help="Longest chain of judgements a pair is derived from."),
    ) -> None:
        """Augment preference pairs; the input rows are kept, derived ones are appended."""
        from alignkit.data.augment import transitive_pairs
        from alignkit.data.output import write_rows
        from alignkit.data.validate import load_validated
        from alignkit.errors import ConfigError

        if not transitivity:
            raise ConfigError("choose an augmentation: --transitivity")
        report = load_validated(source_file, "preference")
        result = transitive_pairs(report.rows, decay=decay, max_hops=max_hops)
        write_rows(out, result.rows)
        console = Console(soft_wrap=True, highlight=False)
        for cycle in result.cycles:
            console.print(
                f"cycle (not propagated), rows {cycle['rows']}: "
                + " > ".join(json.dumps(r)[:40] for r in cycle["responses"]),
                markup=False,
            )
        console.print(
            f"{out}: {len(result.rows)} rows ({len(report.rows)} input, {result.added} derived); "
            f"{len(result.cycles)} cycle(s)",
            markup=False,
        )

    @data.command("split")
    def split(
        source_file: Path = typer.Argument(..., metavar="IN", help="Any data file with a prompt."),
        out_dir: Path = typer.Option(..., help="Writes train/validation/test.jsonl here."),
        validation: float = typer.Option(0.1, help="Share of prompts in validation."),
        test: float = typer.Option(0.1, help="Share of prompts in test."),
        seed: int = typer.Option(0, help="Seed of the prompt shuffle."),
        category_field: str = typer.Option(
            "category", help="Stratify by this column when it exists ('' to turn off)."
        ),
    ) -> None:
        """Split IN by prompt (no prompt in two splits), seeded, stratified by category."""
        from alignkit.data.output import write_rows
        from alignkit.data.split import split_by_prompt
        from alignkit.data.validate import load_validated
        from alignkit.errors import ConfigError

        if validation < 0 or test < 0 or validation + test >= 1:
            raise ConfigError("--validation and --test must be >= 0 with a sum below 1")
        report = load_validated(source_file)
        parts = split_by_prompt(
            [r.raw for r in report.rows],
            validation=validation,
            test=test,
            seed=seed,
            category_field=category_field or None,
        )
        console = Console(soft_wrap=True, highlight=False)
        for name, rows in parts.items():
            path = out_dir / f"{name}.jsonl"
            write_rows(path, rows)
            console.print(f"{path}: {len(rows)} rows", markup=False)

    @data.command("select")
    def select(
        source_file: Path = typer.Argument(..., metavar="IN", help="Candidate pairs."),
        out: Path = typer.Argument(..., metavar="OUT", help="Output .jsonl or .json file."),
        by: str = typer.Option("uncertainty", "--by", help="Selection rule: uncertainty."),
        ensemble: Path = typer.Option(..., help="An rm-ensemble run directory."),
        budget: int = typer.Option(..., min=1, help="How many pairs to select."),
        measure: str = typer.Option(
            "std", help="std (members' margin spread), variance_ratio (vote split) or entropy."
        ),
        device: str | None = typer.Option(None, help="Where the members run (default cpu)."),
    ) -> None:
        """Select the BUDGET candidate pairs the ensemble is least sure of, to label first."""
        from alignkit.cli.progress import progress_bar
        from alignkit.data.loaders import read_rows
        from alignkit.data.output import write_rows
        from alignkit.data.select import candidate_pairs, select_uncertain
        from alignkit.errors import ConfigError
        from alignkit.models.ensemble import load_reward_source
        from alignkit.ops.evaluation import UNCERTAINTIES

        if by != "uncertainty":
            raise ConfigError(f"--by must be uncertainty, got {by!r}")
        if measure not in UNCERTAINTIES:
            raise ConfigError(f"--measure must be one of {', '.join(UNCERTAINTIES)}")
        candidates = candidate_pairs(read_rows(source_file), str(source_file))
        scorer = load_reward_source(ensemble, device=device)
        if len(scorer) < 2:
            raise ConfigError(f"{ensemble}: uncertainty needs an ensemble of >= 2 members")
        console = Console(soft_wrap=True, highlight=False)
        with progress_bar("scoring", console) as update:
            scorer.on_progress = update
            chosen = select_uncertain(scorer, candidates, budget, measure)
        write_rows(out, chosen)
        console.print(
            f"{out}: {len(chosen)} of {len(candidates)} pairs, {measure} from "
            f"{chosen[-1]['uncertainty']:.4g} to {chosen[0]['uncertainty']:.4g}",
            markup=False,
        )

    @data.command("reasoning-gym")
    def reasoning_gym(
        task: str | None = typer.Argument(None, help="A reasoning-gym task (see --list)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="The .jsonl or .json to write."),
        size: int = typer.Option(256, min=1, help="How many prompts."),
        seed: int = typer.Option(0, help="The task's seed (same seed, same prompts)."),
        setting: list[str] = typer.Option(
            [], "--set", "-s", help="A task setting KEY=VALUE (its difficulty), e.g. max_terms=2."
        ),
        system: str | None = typer.Option(
            None,
            help="A system message: a reasoning-gym prompt name (default, simple, ...) or text.",
        ),
        instruction: str | None = typer.Option(None, help="Text appended to each question."),
        text: bool = typer.Option(False, "--text", help="Plain-text prompts, not chat messages."),
        list_tasks: bool = typer.Option(False, "--list", help="Print the task names and exit."),
    ) -> None:
        """Write SIZE prompts of a reasoning-gym TASK with their answers; train on them with
        rewards: [{function: "reasoning_gym:TASK"}]."""
        import yaml

        from alignkit.data.output import write_rows
        from alignkit.errors import ConfigError
        from alignkit.rollout.verifiers.reasoning_tasks import (
            reasoning_gym_rows,
            reasoning_gym_tasks,
        )

        if list_tasks:
            typer.echo("\n".join(reasoning_gym_tasks()))
            return
        if task is None or out is None:
            raise ConfigError("give a TASK and --out FILE (or --list)")
        config = {}
        for item in setting:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
            config[key.strip()] = yaml.safe_load(value)
        rows = reasoning_gym_rows(
            task, size, seed, system=system, instruction=instruction, chat=not text, **config
        )
        write_rows(out, rows)
        Console(soft_wrap=True, highlight=False).print(
            f"{out}: {len(rows)} {task} prompts (seed {seed})", markup=False
        )
