"""`alignkit annotate ...`: run a preference-labelling round (server, admin commands, export)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from alignkit.annotate.db import Database

DB_HELP = "Database: a SQLite file path or URL (default), or postgresql://user@host/db for teams."
F = TypeVar("F", bound=Callable[..., Any])


def _db(url: str) -> Database:
    from alignkit.annotate.db import open_database

    return open_database(url)


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database error met after opening (a page damaged since, a full disk, a lost server)
    becomes a one-line error, exit 2, instead of a traceback."""
    from sqlalchemy.exc import DatabaseError as SQLDatabaseError

    from alignkit.annotate.db import DatabaseError, classify

    try:
        yield
    except SQLDatabaseError as err:
        raise DatabaseError(classify(err).message) from None


def _guarded(command: F) -> F:
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _database_errors():
            return command(*args, **kwargs)

    return run  # type: ignore[return-value]


def _check(
    name: str, value: float, low: float | None = None, high: float | None = None, **kw: Any
) -> None:
    from alignkit.annotate.limits import check_number

    check_number(name, value, low, high, **kw)


def _read(path: Path) -> tuple[list, list[int]]:
    from alignkit.data.loaders import read_rows
    from alignkit.errors import DataError, RowProblem

    raw = read_rows(path)
    bad = [RowProblem(str(path), r.row, "<row>", r.error) for r in raw if r.error is not None]
    if bad:
        raise DataError(bad[:20], total=len(bad))
    return [r.value for r in raw], [r.row for r in raw]


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Preference labelling: serve a web page to annotators, export pairs.",
        no_args_is_help=True,
    )
    app.add_typer(group, name="annotate")
    out = Console(soft_wrap=True)

    @group.command("serve")
    def serve(
        db: str = typer.Option("annotate.db", "--db", help=DB_HELP),
        host: str = typer.Option(
            "127.0.0.1", help="Interface to bind; 0.0.0.0 exposes it to the network."
        ),
        port: int = typer.Option(8321, help="TCP port."),
        lease_minutes: float = typer.Option(
            30.0, help="A served task returns to the pool after this long (0 < m <= 10080)."
        ),
        min_agreement: float = typer.Option(
            0.7, help="Majority share under which a task gets one more annotator (0..1)."
        ),
        max_annotators: int = typer.Option(
            5, help="Cap of annotators per task (adaptive overlap)."
        ),
        rate: float = typer.Option(
            10.0, help="Requests per second allowed per annotator (burst: 6x)."
        ),
        model_root: list[str] = typer.Option(
            None,
            "--model-root",
            help="Directory the admin endpoints may load models and ensembles from (repeat; "
            "default: the current directory). Paths elsewhere are refused.",
        ),
        header_timeout: float = typer.Option(
            10.0, help="Seconds a client has to send a request's headers (slow clients are cut)."
        ),
        access_log: bool = typer.Option(
            True, "--access-log/--no-access-log", help="Log every request to stderr (no tokens)."
        ),
    ) -> None:
        """Serve the labelling page and API (uvicorn). Annotators sign in with their token."""
        import uvicorn

        from alignkit.annotate.assign import AssignConfig
        from alignkit.annotate.guard import LOG, header_timeout_protocol
        from alignkit.annotate.server import ServerConfig, create_app

        _check("--port", port, 1, 65535, integer=True)
        _check("--lease-minutes", lease_minutes, 0, 7 * 24 * 60, low_open=True)
        _check("--min-agreement", min_agreement, 0, 1)
        _check("--max-annotators", max_annotators, 1, 1000, integer=True)
        _check("--rate", rate, 0, 10_000, low_open=True)
        _check("--header-timeout", header_timeout, 0, 3600, low_open=True)
        roots = tuple(os.path.abspath(r) for r in (model_root or [os.getcwd()]))
        config = ServerConfig(
            assign=AssignConfig(lease_minutes * 60, min_agreement, max_annotators),
            rate_per_second=rate,
            rate_burst=6 * rate,
            model_roots=roots,
        )
        database = _db(db)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO if access_log else logging.WARNING)
        out.print(
            f"alignkit annotate: http://{host}:{port}/  (database {db}, schema ready; "
            f"admin model paths under {', '.join(roots)})",
            highlight=False,
        )
        uvicorn.run(
            create_app(database, config),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,  # ours (guard.AccessLog) names the annotator, never the token
            http=header_timeout_protocol(header_timeout),
        )

    @group.command("import-prompts")
    @_guarded
    def import_prompts(
        file: Path = typer.Argument(
            ...,
            help="Prompt-format file (JSONL/JSON/CSV/Parquet); category, adversarial, high_value kept.",
        ),
        db: str = typer.Option("annotate.db", "--db", help=DB_HELP),
    ) -> None:
        """Add prompts (duplicates skipped)."""
        from alignkit.annotate.ingest import import_prompts as run

        rows, numbers = _read(file)
        added, known = run(_db(db), rows, source=str(file), row_numbers=numbers)
        out.print(f"[green]added[/] {added} prompts ({known} already present)")

    @group.command("generate")
    @_guarded
    def generate(
        model: list[str] = typer.Option(
            ...,
            "--model",
            help="A checkpoint: run directory, LoRA adapter dir, local model or 'tiny'. Repeat.",
        ),
        temperature: list[float] = typer.Option(
            [0.7, 1.0], "--temperature", help="Sampling temperature (0 = greedy). Repeat."
        ),
        samples: int = typer.Option(2, help="Samples per prompt, model and temperature."),
        max_new_tokens: int = typer.Option(128, help="Longest response in tokens."),
        seed: int = typer.Option(0, help="Base seed (recorded per response)."),
        db: str = typer.Option("annotate.db", "--db", help=DB_HELP),
    ) -> None:
        """Generate responses to every prompt from your own checkpoints; duplicates dropped."""
        from alignkit.annotate.generate import generate as run
        from alignkit.cli.progress import progress_bar

        with progress_bar("generate", transient=False) as update:
            report = run(
                _db(db),
                model,
                temperature,
                samples,
                max_new_tokens,
                seed=seed,
                progress=update,
            )
        out.print(
            f"[green]added[/] {report.added} responses ({report.duplicates} duplicates dropped)"
        )

    @group.command("create-tasks")
    @_guarded
    def create_tasks(
        num_prompts: int = typer.Option(
            None, help="How many prompts to select (default: all without tasks)."
        ),
        annotators_per_task: int = typer.Option(3, help="Distinct annotators per pair."),
        max_pairs_per_prompt: int = typer.Option(
            6, help="Cap of pairs per prompt when it has > 3 responses."
        ),
        mix: str = typer.Option(
            "high_value=0.4,underrepresented=0.3,adversarial=0.2,random=0.1",
            help="Prompt-selection strategy shares.",
        ),
        ask_safety: bool = typer.Option(
            False, "--ask-safety", help="Also ask 'which is safer / is each safe'."
        ),
        seed: int = typer.Option(0, help="Seed of prompt and pair sampling."),
        by: str = typer.Option(
            "strategy",
            "--by",
            help="Serving order: strategy (as prompts were picked) or uncertainty (the pairs "
            "--ensemble is least sure of first).",
        ),
        ensemble: str = typer.Option(
            None, help="An rm-ensemble run directory (>= 2 members), for --by uncertainty."
        ),
        measure: str = typer.Option(
            "std", help="std (members' margin spread), variance_ratio (vote split) or entropy."
        ),
        device: str = typer.Option(None, help="Where the members run (default cpu)."),
        db: str = typer.Option("annotate.db", "--db", help=DB_HELP),
    ) -> None:
        """Make pair tasks: all pairs for <= 3 responses, else smart sampling."""
        from alignkit.annotate.pairs import create_tasks as run
        from alignkit.annotate.pairs import parse_mix, uncertainty_scorer
        from alignkit.cli.progress import progress_bar

        scorer = uncertainty_scorer(by, ensemble, measure, device)
        with progress_bar("scoring", enabled=scorer is not None) as update:
            if scorer is not None:  # each response is scored twice: as a and as b of its pairs
                scorer.on_progress = update
            report = run(
                _db(db),
                num_prompts=num_prompts,
                annotators_per_task=annotators_per_task,
                max_pairs_per_prompt=max_pairs_per_prompt,
                mix=parse_mix(mix),
                ask_safety=ask_safety,
                seed=seed,
                scorer=scorer,
                measure=measure,
            )
        out.print(
            f"[green]created[/] {report.tasks} tasks ({report.gold} gold) for {report.prompts} "
            f"prompts {report.by_strategy}",
            highlight=False,
        )

    @group.command("add-annotator")
    @_guarded
    def add_annotator(
        name: str = typer.Argument(..., help="Annotator name."),
        role: str = typer.Option("annotator", help="admin or annotator."),
        db: str = typer.Option("annotate.db", "--db", help=DB_HELP),
    ) -> None:
        """Create an annotator and print its token once (only a hash is stored)."""
        from alignkit.annotate.ingest import add_annotator as run

        token = run(_db(db), name, role)
        out.print(f"token for {name} ({role}), shown once:\n{token}", highlight=False)

    @group.command("revoke")
    @_guarded
    def revoke(
        name: str = typer.Argument(...), db: str = typer.Option("annotate.db", "--db", help=DB_HELP)
    ) -> None:
        """Revoke an annotator's token at once; their live lease goes back to the pool."""
        from alignkit.annotate.ingest import revoke_annotator

        released = revoke_annotator(_db(db), name)
        out.print(f"[green]revoked[/] {name} ({released} live lease released)", highlight=False)

    @group.command("rotate-token")
    @_guarded
    def rotate_token(
        name: str = typer.Argument(...), db: str = typer.Option("annotate.db", "--db", help=DB_HELP)
    ) -> None:
        """Give an annotator a new token (the old one stops working; a revoked one is reinstated).
        Their labels and gold record stay; their live lease goes back to the pool."""
        from alignkit.annotate.ingest import rotate_token as run

        token, was_revoked = run(_db(db), name)
        again = " (reinstated)" if was_revoked else ""
        out.print(f"new token for {name}{again}, shown once:\n{token}", highlight=False)

    @group.command("gold")
    @_guarded
    def gold(
        file: Path = typer.Option(
            None, "--import", help="Gold pairs with known answers (preference format)."
        ),
        auto: int = typer.Option(
            0,
            help="Lend this many prompts a real response to another prompt: create-tasks pairs "
            "it with the prompt's own responses as gold (the prompt's own is the better).",
        ),
        seed: int = typer.Option(0),
        db: str = typer.Option("annotate.db", "--db", help=DB_HELP),
    ) -> None:
        """Add gold pairs. Run it before create-tasks: gold tasks are made there, among the
        others, and are served like them (nothing tells an annotator which are gold)."""
        from alignkit.annotate.gold import import_gold, make_gold

        _check("--auto", auto, 0, integer=True)
        database = _db(db)
        if file is not None:
            rows, numbers = _read(file)
            made = import_gold(database, rows, source=str(file), row_numbers=numbers)
            out.print(f"[green]imported[/] {made} gold pairs (create-tasks makes their tasks)")
        if auto:
            lent = make_gold(database, auto, seed=seed)
            short = (
                "" if lent == auto else " (each needs two prompts without tasks; no more are free)"
            )
            out.print(
                f"[green]lent[/] {lent} donor responses{short}; create-tasks makes their gold pairs",
                highlight=False,
            )

    @group.command("stats")
    @_guarded
    def stats(db: str = typer.Option("annotate.db", "--db", help=DB_HELP)) -> None:
        """Throughput, agreement, gold accuracy, position and length bias, time per task (JSON)."""
        from alignkit.annotate.quality import stats as run
        from alignkit.annotate.server import _finite

        out.print_json(json.dumps(_finite(run(_db(db)))))

    @group.command("export")
    @_guarded
    def export(
        path: Path = typer.Argument(..., help="Output JSONL (written atomically)."),
        safety: bool = typer.Option(
            False, "--safety", help="Safety-preference format (tasks that asked both questions)."
        ),
        min_labels: int = typer.Option(1, help="Leave out tasks with fewer labels."),
        min_agreement: float = typer.Option(
            0.0, help="Leave out tasks under this quality-weighted agreement."
        ),
        tie_margin: float = typer.Option(
            0.0, help="Tie policy: drop tasks whose margin (2 P(chosen better) - 1) is <= this."
        ),
        db: str = typer.Option("annotate.db", "--db", help=DB_HELP),
    ) -> None:
        """Write the labelled pairs for `alignkit train dpo` (or Safe-DPO with --safety)."""
        from alignkit.annotate.export import write_export

        _check("--min-labels", min_labels, 1, integer=True)
        _check("--min-agreement", min_agreement, 0, 1)
        _check("--tie-margin", tie_margin, 0, 1)
        report = write_export(
            _db(db),
            path,
            safety=safety,
            min_labels=min_labels,
            min_agreement=min_agreement,
            tie_margin=tie_margin,
        )
        out.print(
            f"[green]wrote[/] {report.rows} rows to {path}; left out: {report.ties_dropped} ties, "
            f"{report.no_weight} with no label of weight, "
            f"{report.below_agreement} under agreement, {report.too_few_labels} with too few labels"
            + (f", {report.no_safety_answers} without safety answers" if safety else ""),
            highlight=False,
        )
        for warning in report.warnings:
            out.print(f"[yellow]warning:[/] {warning}", highlight=False)
