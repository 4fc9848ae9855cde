"""PNG curves from `metrics.jsonl`, one figure per group of related metrics.

Groups: losses (`loss`, `loss_H`, `loss_S` with their `eval/` twins) on one axis, implicit
rewards on one axis, accuracies, log-probs, KL, the Lagrange multiplier with its constraint
(`lambda`, `J_C` with its per-batch `J_C_batch`, `delta_S_mean`, stacked), learning rate,
gradient norm, throughput; any other metric is grouped by its prefix (`actor/...`). In a stacked
figure a metric's `eval/` twin shares its axis. Noisy curves are drawn faint with an
exponential moving average on top; controller state (lambda, the J_C EMA it reads) is drawn
as it is. Figures are drawn with matplotlib's object API and the
Agg canvas, so plotting never changes the caller's matplotlib backend.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import ConfigError
from alignkit.tracking.run_dir import read_metrics

_NOT_METRICS = {"step", "epoch"}


@dataclass(frozen=True)
class _Group:
    file: str
    title: str
    pattern: str  # matched against the name without its `eval/` prefix
    overlay: bool  # True: one shared axis; False: one stacked axis per metric
    order: tuple[str, ...] = ()  # stacked axes top to bottom; others follow as they appear


_GROUPS = (
    _Group("loss", "Loss", r"^loss(_|$)", overlay=True),
    _Group("rewards", "Implicit rewards", r"^rewards/(?!accurac)", overlay=True),
    _Group("accuracy", "Accuracy", r"accurac", overlay=True),
    _Group("logps", "Log-probabilities", r"^logps/", overlay=True),
    _Group("kl", "KL divergence", r"^(kl|KL)(/|_|$)", overlay=False),
    _Group(
        "lambda",
        "Lagrange multiplier and safety constraint",
        r"^(lambda|J_C|J_C_batch|delta_S_mean)$",
        overlay=False,
        order=("lambda", "J_C", "delta_S_mean"),
    ),
    _Group("lr", "Learning rate", r"^lr$", overlay=True),
    _Group("grad_norm", "Gradient norm (before clipping)", r"^grad_norm$", overlay=True),
    _Group("throughput", "Throughput", r"_per_s$", overlay=False),
)

# Values a controller or schedule sets (not per-batch estimates): drawn as they are.
_STATE_METRICS = {"lambda", "J_C", "lr", "kl/coef"}
# A per-batch value drawn faintly on the axis of the smoothed value a controller keeps of it.
_DRAWN_WITH = {"J_C_batch": "J_C"}
# Metrics whose sign is what matters get a line at 0 (J_C > 0: constraint violated).
_ZERO_LINES = {"J_C": "constraint boundary (J_C = 0)", "delta_S_mean": None}

_LABELS = {
    "lr": "learning rate",
    "grad_norm": "global L2 norm",
    "tokens_per_s": "tokens / s",
    "lambda": "lambda",
    "J_C": "J_C (cost estimate)",
}


def plot_metrics(
    metrics_jsonl: str | Path, out_dir: str | Path, names: Sequence[str] | None = None
) -> list[Path]:
    """Write `<out_dir>/<group>.png` for the metrics in the file (or only `names`).

    Returns the written paths. A name that is not in the file raises ConfigError with the
    nearest logged name.
    """
    series = _read_series(Path(metrics_jsonl))
    if names is not None:
        for name in names:
            if name not in series:
                guess = difflib.get_close_matches(name, list(series), n=1)
                hint = f" (did you mean '{guess[0]}'?)" if guess else ""
                raise ConfigError(f"no metric '{name}' in {metrics_jsonl}{hint}")
        series = {name: series[name] for name in names}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, members in _group(series):
        path = out_dir / f"{group.file}.png"
        _draw(group, {name: series[name] for name in members}, path)
        written.append(path)
    return written


def _read_series(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (steps, values)} over the records that have a finite value for it."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for record in read_metrics(path):
        step = record.get("step")
        for name, value in record.items():
            if name in _NOT_METRICS or not _plottable(value):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def _plottable(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _group(series: dict) -> list[tuple[_Group, list[str]]]:
    grouped: dict[str, tuple[_Group, list[str]]] = {}
    for name in series:
        base = name.removeprefix("eval/")
        group = next((g for g in _GROUPS if re.search(g.pattern, base)), None)
        if group is None:
            prefix = base.split("/", 1)[0]
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix)
            group = _Group(slug, prefix.replace("_", " "), "", overlay=False)
        grouped.setdefault(group.file, (group, []))[1].append(name)
    return list(grouped.values())


def _draw(group: _Group, series: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [list(series)] if group.overlay else stacked_panels(list(series), group.order)
    height = 3.8 if len(panels) == 1 else 1.2 + 2.2 * len(panels)
    fig = Figure(figsize=(7.0, height), dpi=110)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        for name in panel:
            steps, values = series[name]
            _draw_curve(ax, name, steps, values, smooth=name not in _STATE_METRICS)
            if name in _ZERO_LINES:
                ax.axhline(0.0, color="grey", linestyle="--", linewidth=1, label=_ZERO_LINES[name])
        ax.grid(True, alpha=0.3)
        if group.overlay and len(panel) > 1:
            ax.set_ylabel("value")
        else:
            ax.set_ylabel(_LABELS.get(panel[0], panel[0].removeprefix("eval/")))
        ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(group.title)
    fig.tight_layout()
    fig.savefig(path, format="png")


def stacked_panels(names: Sequence[str], order: Sequence[str] = ()) -> list[list[str]]:
    """One axis per metric of a stacked figure, shared by its `eval/` twin and by the
    per-batch values drawn with it (``J_C_batch`` on ``J_C``'s axis); axes of the metrics in
    `order` first, in that order, then the others as they appear in `names`.

    A twin or companion whose metric is not plotted gets an axis of its own.
    """
    present = set(names)
    panels: dict[str, list[str]] = {}
    for name in names:
        base = name.removeprefix("eval/")
        host = _DRAWN_WITH.get(base, base)
        key = host if host in present or f"eval/{host}" in present else base
        panels.setdefault(key, []).append(name)
    for members in panels.values():  # the host's own curve first: it names the axis
        members.sort(key=lambda n: (n.startswith("eval/"), n.removeprefix("eval/") in _DRAWN_WITH))
    rank = {name: i for i, name in enumerate(order)}
    keys = sorted(panels, key=lambda key: rank.get(key, len(rank)))  # stable: others keep order
    return [panels[key] for key in keys]


def _draw_curve(ax, name: str, steps: list[float], values: list[float], smooth: bool) -> None:
    if name in _DRAWN_WITH:
        ax.plot(steps, values, alpha=0.35, linewidth=1, label=name)
        return
    sparse = name.startswith("eval/") or len(values) < 3
    if sparse:
        ax.plot(steps, values, marker="o", label=name)
        return
    if smooth and len(values) >= 10:
        (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=1)
        ax.plot(steps, ema(values), color=raw.get_color(), linewidth=1.8, label=f"{name} (EMA)")
    else:
        ax.plot(steps, values, linewidth=1.5, label=name)


def ema(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing).

    The default weight grows with the number of points: longer curves are noisier per pixel.
    """
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 8.0 / len(values)))
    smoothed, running = [], 0.0
    for i, value in enumerate(values, start=1):
        running = weight * running + (1 - weight) * value
        smoothed.append(running / (1 - weight**i) if weight > 0 else running)
    return smoothed
