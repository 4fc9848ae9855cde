"""A pipeline file: stages in order, each a training method or a tool, wired by references.

```yaml
name: rlhf
output_dir: runs/pipelines          # the pipeline's directory is <output_dir>/<name>
stages:
  - name: sft
    method: sft                     # any `alignkit train` method
    config: examples/sft.yaml       # a file (relative to the working directory) or a mapping
    overrides: [epochs=4]
  - name: rm
    method: rm
    config: examples/rm.yaml
    overrides: ["model.name=${stages.sft.model}"]
  - name: rm_eval
    tool: eval-task                 # a tool stage: see alignkit.pipeline.tools.TOOLS
    args: {model: "${stages.sft.model}"}
```

References ``${stages.<stage>.<artifact>}`` name an artifact of an EARLIER stage: ``run_dir``,
``model`` (the model directory of its final checkpoint, or of the best one under early
stopping), ``checkpoint``, ``metrics.<name>`` or ``eval.<name>`` (the stage's final values).
Every reference is checked when the file is read, before any stage runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import AlignkitError

__all__ = ["REFERENCE", "PipelineError", "PipelineSpec", "Stage", "load_pipeline", "resolve"]

REFERENCE = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_./+-]+)\}")
ARTIFACTS = ("run_dir", "model", "checkpoint")
VALUE_ARTIFACTS = ("metrics.", "eval.")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class PipelineError(AlignkitError):
    """A pipeline file is wrong, or one of its stages failed (exit code 2)."""


@dataclass(frozen=True)
class Stage:
    name: str
    method: str | None = None  # a training method ...
    tool: str | None = None  # ... or a tool
    config: str | dict[str, Any] | None = None
    overrides: tuple[str, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.method or self.tool or ""


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    output_dir: Path
    stages: tuple[Stage, ...]
    source: str

    @property
    def root(self) -> Path:
        return self.output_dir / self.name

    def index(self, name: str) -> int:
        for i, stage in enumerate(self.stages):
            if stage.name == name:
                return i
        raise PipelineError(
            f"{self.source}: no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}"
        )


def _references(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, list | tuple):
        return [r for v in value for r in _references(v)]
    return []


def _stage(raw: Any, position: int, source: str) -> Stage:
    where = f"{source}: stage {position + 1}"
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: expected a mapping with name and method or tool")
    unknown = set(raw) - {"name", "method", "tool", "config", "overrides", "args"}
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PipelineError(f"{where}: 'name' must be letters, digits, '-' or '_'")
    if ("method" in raw) == ("tool" in raw):
        raise PipelineError(f"{where} ({name}): give exactly one of 'method' or 'tool'")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise PipelineError(f"{where} ({name}): 'overrides' must be a list of key=value strings")
    config = raw.get("config")
    if config is not None and not isinstance(config, str | dict):
        raise PipelineError(f"{where} ({name}): 'config' must be a file path or a mapping")
    args = raw.get("args") or {}
    if not isinstance(args, dict):
        raise PipelineError(f"{where} ({name}): 'args' must be a mapping")
    # A method stage reads config and overrides, a tool stage args: the others would be ignored.
    kind = "method" if "method" in raw else "tool"
    reads = ("config", "overrides") if kind == "method" else ("args",)
    for key in ("config", "overrides", "args"):
        if key not in reads and raw.get(key):
            raise PipelineError(
                f"{where} ({name}): '{key}' is set but has no effect on a {kind} stage, which "
                f"reads {' and '.join(reads)} only"
            )
    return Stage(name, raw.get("method"), raw.get("tool"), config, tuple(overrides), args)


def _check(spec: PipelineSpec) -> None:
    from alignkit.pipeline.tools import TOOLS
    from alignkit.trainers.registry import METHODS

    seen: set[str] = set()
    for stage in spec.stages:
        where = f"{spec.source}: stage {stage.name!r}"
        if stage.name in seen:
            raise PipelineError(f"{where}: the name is used twice")
        if stage.method is not None and stage.method not in METHODS:
            raise PipelineError(
                f"{where}: unknown method {stage.method!r}; methods: {', '.join(METHODS)}"
            )
        if stage.tool is not None and stage.tool not in TOOLS:
            raise PipelineError(f"{where}: unknown tool {stage.tool!r}; tools: {', '.join(TOOLS)}")
        if isinstance(stage.config, str) and not Path(stage.config).is_file():
            raise PipelineError(f"{where}: config file {stage.config} not found")
        for ref_stage, artifact in _references([stage.config, stage.overrides, stage.args]):
            ref = f"${{stages.{ref_stage}.{artifact}}}"
            if ref_stage not in seen:
                later = any(s.name == ref_stage for s in spec.stages)
                raise PipelineError(
                    f"{where}: {ref} refers to "
                    + ("a later stage" if later else f"no stage named {ref_stage!r}")
                    + "; a stage can use artifacts of the stages before it"
                )
            if artifact not in ARTIFACTS and not artifact.startswith(VALUE_ARTIFACTS):
                raise PipelineError(
                    f"{where}: {ref}: unknown artifact {artifact!r}; artifacts: "
                    f"{', '.join(ARTIFACTS)}, metrics.<name>, eval.<name>"
                )
        seen.add(stage.name)


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and check a pipeline file (names, methods, tools, config files, references)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such pipeline file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise PipelineError(f"{path}: expected a mapping with a non-empty 'stages' list")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PipelineError(f"{path}: 'name' must be letters, digits, '-' or '_'")
    stages = tuple(_stage(s, i, str(path)) for i, s in enumerate(raw["stages"]))
    spec = PipelineSpec(name, Path(raw.get("output_dir", "runs")), stages, str(path))
    _check(spec)
    return spec


def resolve(value: Any, artifacts: dict[str, dict[str, Any]], where: str) -> Any:
    """``value`` with every reference replaced by the artifact it names."""
    if isinstance(value, dict):
        return {k: resolve(v, artifacts, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(resolve(v, artifacts, where) for v in value)
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> str:
        stage, artifact = match.groups()
        found: Any = artifacts.get(stage, {})
        for part in artifact.split(".", 1) if artifact.startswith(VALUE_ARTIFACTS) else [artifact]:
            found = found.get(part) if isinstance(found, dict) else None
        if found is None:
            raise PipelineError(f"{where}: {match.group(0)}: stage {stage!r} has no such artifact")
        return str(found)

    return REFERENCE.sub(lookup, value)
