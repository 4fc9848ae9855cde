"""How a recommendation is shown: a readable report, and JSON that validates against a schema."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alignkit.recommend.rules import METHODS
from alignkit.recommend.scoring import Recommendation

__all__ = ["RECOMMENDATION_SCHEMA", "print_recommendation", "rules_markdown"]

_METHOD = {"enum": list(METHODS)}
_NULLABLE_STR = {"type": ["string", "null"]}

#: JSON Schema (draft 2020-12) of `alignkit recommend --json`.
RECOMMENDATION_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "recommendation",
        "runner_up",
        "scores",
        "hyperparameters",
        "command",
        "config_path",
        "features",
        "assumptions",
        "notes",
        "budget",
    ],
    "properties": {
        "recommendation": {"anyOf": [_METHOD, {"type": "null"}]},
        "runner_up": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["method", "when_to_prefer"],
                    "properties": {"method": _METHOD, "when_to_prefer": {"type": "string"}},
                },
            ]
        },
        "scores": {
            "type": "array",
            "minItems": len(METHODS),
            "items": {
                "type": "object",
                "required": ["method", "score", "feasible", "reasons", "blockers", "lora"],
                "properties": {
                    "method": _METHOD,
                    "score": {"type": "number"},
                    "feasible": {"type": "boolean"},
                    "lora": {"type": "boolean"},
                    "blockers": {"type": "array", "items": {"type": "string"}},
                    "reasons": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["rule", "delta", "text"],
                            "properties": {
                                "rule": {"type": "string"},
                                "delta": {"type": "number"},
                                "text": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
        "hyperparameters": {"type": "object"},
        "command": _NULLABLE_STR,
        "config_path": _NULLABLE_STR,
        "features": {"type": "object", "required": ["data", "model", "resources", "requirements"]},
        "assumptions": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": "array", "items": {"type": "string"}},
        "budget": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": [
                        "hours",
                        "budget_hours",
                        "iterations",
                        "seconds_per_iteration",
                        "generation_s",
                        "update_s",
                        "max_new_tokens",
                        "costs",
                    ],
                },
            ]
        },
    },
}


def print_recommendation(rec: Recommendation, console: Console | None = None) -> None:
    """The recommendation, every method's score with its reasons, settings and assumptions."""
    console = console or Console(soft_wrap=True)
    for assumption in rec.features.assumptions:
        console.print(f"[yellow]assumed[/] {escape(assumption)}")
    table = Table(title="alignment methods, best first", show_lines=True)
    for column in ("method", "score", "runs here", "why"):
        table.add_column(column, overflow="fold")
    for s in rec.scores:
        why = [f"{r['delta']:+.1f} {r['text']}" for r in s.reasons]
        why += [f"blocked: {b}" for b in s.blockers]
        table.add_row(
            s.method,
            f"{s.score:+.1f}",
            "yes" if s.feasible else "no",
            escape("\n".join(why) or "no rule applies"),
        )
    console.print(table)
    if rec.method is None:
        console.print("[red]no method can run on what was given[/]; see the blockers above")
        return
    console.print(f"[bold green]recommended:[/] {rec.method}")
    if rec.runner_up:
        console.print(
            f"runner-up: {rec.runner_up}, suited to {escape(METHODS[rec.runner_up].when_to_prefer)}"
        )
    console.print(
        "starting settings: "
        + escape(", ".join(f"{k}={v}" for k, v in rec.hyperparameters.items()))
    )
    if rec.budget is not None:
        b = rec.budget
        console.print(
            f"estimated time: {b['hours']:.2f} h of the {b['budget_hours']:g} h budget: "
            f"{b['iterations']} iterations x {b['seconds_per_iteration']:.1f} s (generation "
            f"{b['generation_s']:.1f} s, update {b['update_s']:.1f} s; prompts "
            f"~{b['prompt_tokens']:.0f} tokens, answers <= {b['max_new_tokens']}); "
            + escape(b["costs"])
        )
    for note in rec.notes:
        console.print(f"[yellow]note[/] {escape(note)}")
    if rec.command:
        console.print(f"run: {escape(rec.command)}")


def rules_markdown() -> str:
    """The rule table as Markdown (docs/recommender.md embeds it; a test keeps them equal)."""
    from alignkit.recommend.rules import RULES

    methods = list(METHODS)
    lines = [
        "| rule | " + " | ".join(methods) + " | why | evidence |",
        "|---|" + "---|" * len(methods) + "---|---|",
    ]
    for rule in RULES:
        cells = [f"{rule.effects[m]:+.1f}" if m in rule.effects else "" for m in methods]
        lines.append(
            f"| `{rule.id}` | " + " | ".join(cells) + f" | {rule.reason} | {rule.evidence} |"
        )
    return "\n".join(lines)
