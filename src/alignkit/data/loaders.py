"""Load records from JSONL, JSON, Parquet, CSV/TSV files or a saved `datasets` directory.

Every row is validated against a named format (``alignkit.data.formats``). All bad rows are
collected, and if there is any, one ``DataError`` lists them (file, 1-based row, field, what is
wrong) up to ``max_problems`` with the total count. Nothing is silently dropped.

Row numbers are what a user finds in the file: the 1-based *line* for JSONL (blank lines count
as lines but are not records) and CSV/TSV (the header is line 1, so the first record is line
2; a record with quoted line breaks is numbered by its first line), the 1-based *record number*
for JSON, Parquet and `datasets` directories. Problems with the file as a whole use row 0.

CSV/TSV cells are text: numbers and booleans (``true``/``false``/``1``/``0``) are parsed from
it, and conversational (message list) rows need JSONL, JSON, Parquet or `datasets`.

A format keeps only its own fields; ``keep_fields`` also keeps other columns of each row as
they were read (a prompt file's ``answer`` for the reward functions, a preference file's
per-response helpfulness targets), so nothing has to read the file a second time.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from alignkit.data.formats import FORMATS, normalize_row
from alignkit.errors import FILE_ROW, DataError, RowProblem

__all__ = [
    "DEFAULT_MAX_PROBLEMS",
    "KeepFields",
    "RecordSet",
    "file_kind",
    "load_records",
    "read_rows",
    "validate_records",
]

DEFAULT_MAX_PROBLEMS = 20
#: ``keep_fields``: column names, or ``"all"`` for every column the format does not define.
KeepFields = Sequence[str] | Literal["all"]
_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class RawRow:
    """One record as read from a file, before validation (``error`` when it could not be read)."""

    row: int
    value: Any = None
    error: str | None = None


class RecordSet(Sequence[dict[str, Any]]):
    """Validated, normalised records with where each came from.

    A sequence of dicts; ``rows[i]`` is the 1-based line or record number of ``self[i]`` in
    ``source``, so later stages (tokenisation length limits) can name the rows they touch.
    """

    def __init__(
        self, records: list[dict[str, Any]], rows: list[int], source: str, fmt: str
    ) -> None:
        if len(records) != len(rows):
            raise ValueError("records and rows must have the same length")
        self.records, self.rows, self.source, self.format = records, rows, source, fmt

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> RecordSet: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | RecordSet:
        if isinstance(index, slice):
            return RecordSet(self.records[index], self.rows[index], self.source, self.format)
        return self.records[index]

    def __repr__(self) -> str:
        return f"RecordSet({len(self)} {self.format} records from {self.source})"

    def sample(self, count: int, seed: int) -> RecordSet:
        """``count`` records drawn without replacement by ``seed``, kept in file order (all of
        them when ``count >= len(self)``)."""
        if count >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), count))
        return RecordSet(
            [self.records[i] for i in keep], [self.rows[i] for i in keep], self.source, self.format
        )


def mix_record_sets(sets: Sequence[RecordSet], weights: Sequence[float], seed: int) -> RecordSet:
    """Several files' records as one set, file i contributing ``weights[i] * len(file i)`` rows:
    its whole rows ``floor(w)`` times, plus a seeded sample for the fraction (weight 2: every
    row twice; 0.5: a random half). Row numbers stay those of each row's own file."""
    if len(sets) != len(weights):
        raise ValueError(f"{len(sets)} data files but {len(weights)} weights")
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    for i, (part, weight) in enumerate(zip(sets, weights, strict=True)):
        if weight < 0:
            raise ValueError(f"data weights must be >= 0, got {weight}")
        whole = int(weight)
        chunks = [part] * whole
        fraction = round((weight - whole) * len(part))
        if fraction:
            chunks.append(part.sample(fraction, seed + i))
        for chunk in chunks:
            records.extend(chunk.records)
            rows.extend(chunk.rows)
    source = " + ".join(part.source for part in sets)
    return RecordSet(records, rows, source, sets[0].format if sets else "")


def _file_error(path: Path | str, message: str) -> DataError:
    return DataError([RowProblem(str(path), FILE_ROW, "<file>", message)])


def file_kind(path: str | Path) -> str:
    """``jsonl``, ``json``, ``csv``, ``tsv``, ``parquet`` or ``datasets`` (a directory)."""
    path = Path(path)
    if not path.exists():
        raise _file_error(path, "no such file or directory")
    if path.is_dir():
        if not any((path / marker).exists() for marker in _DATASET_MARKERS):
            raise _file_error(
                path,
                "directory is not a dataset saved with `datasets.save_to_disk` "
                f"(none of {', '.join(_DATASET_MARKERS)} found)",
            )
        return "datasets"
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(_KINDS))
        raise _file_error(path, f"unknown file type {path.suffix!r}; expected one of {known}")
    return kind


def _read_jsonl_lines(lines: Iterable[str]) -> Iterator[RawRow]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield RawRow(number, json.loads(line))
        except json.JSONDecodeError as exc:
            yield RawRow(number, error=f"invalid JSON: {exc.msg} (column {exc.colno})")


def _read_json(path: Path) -> list[RawRow]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: a JSONL file named .json
            return list(_read_jsonl_lines(text.splitlines()))
        raise _file_error(
            path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise _file_error(path, 'expected a list of objects or {"data": [...]}')
    return [RawRow(i, value) for i, value in enumerate(data, start=1)]


def _read_csv(path: Path, delimiter: str) -> list[RawRow]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return []
        rows, last_line = [], reader.line_num
        for cells in reader:
            first_line, last_line = last_line + 1, reader.line_num
            if not cells:
                continue  # blank line
            if len(cells) > len(header):
                message = f"{len(cells)} cells but the header has {len(header)} columns"
                rows.append(RawRow(first_line, error=message))
                continue
            rows.append(RawRow(first_line, dict(zip(header, cells, strict=False))))
    return rows


def _read_parquet(path: Path) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise _file_error(path, f"cannot read Parquet file: {exc}") from None
    return [RawRow(i, value) for i, value in enumerate(records, start=1)]


def _read_datasets_dir(path: Path, split: str | None) -> list[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise _file_error(path, f"cannot load dataset directory: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            wanted = "has several splits" if split is None else f"has no split {split!r}"
            raise _file_error(
                path,
                f"{wanted}: set data.train_split to one of: {', '.join(names)} "
                "(data.eval_split for the eval file)",
            )
        loaded = loaded[split]
    return [RawRow(i, value) for i, value in enumerate(loaded.to_list(), start=1)]


def read_rows(path: str | Path, split: str | None = None) -> list[RawRow]:
    """Read raw records (no validation) with their 1-based row numbers."""
    return _read(Path(path), file_kind(path), split)


def _read(path: Path, kind: str, split: str | None) -> list[RawRow]:
    if kind == "jsonl":
        with path.open(encoding="utf-8-sig") as handle:
            return list(_read_jsonl_lines(handle))
    if kind == "json":
        return _read_json(path)
    if kind in ("csv", "tsv"):
        return _read_csv(path, "," if kind == "csv" else "\t")
    if kind == "parquet":
        return _read_parquet(path)
    return _read_datasets_dir(path, split)


def _kept(raw: Mapping[str, Any], record: dict[str, Any], keep: KeepFields) -> dict[str, Any]:
    """``record`` with the ``keep`` columns of ``raw`` it lacks, as read (a format's own
    fields keep their normalised value)."""
    names = raw if keep == "all" else [name for name in keep if name in raw]
    return {**{name: raw[name] for name in names if name not in record}, **record}


def _validate(
    raw_rows: Iterable[RawRow],
    fmt: str,
    source: str,
    text_cells: bool,
    max_problems: int,
    keep_fields: KeepFields = (),
) -> RecordSet:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(keep_fields, str) and keep_fields != "all":
        raise ValueError(f"keep_fields: a list of column names or 'all', got {keep_fields!r}")
    records, rows, problems = [], [], []
    seen = 0
    for raw in raw_rows:
        seen += 1
        if raw.error is not None:
            problems.append(RowProblem(source, raw.row, "<row>", raw.error))
            continue
        record, row_problems = normalize_row(raw.value, fmt, text_cells)
        problems.extend(RowProblem(source, raw.row, f, m) for f, m in row_problems)
        if record is not None:
            records.append(_kept(raw.value, record, keep_fields) if keep_fields else record)
            rows.append(raw.row)
    if seen == 0:
        raise _file_error(source, "no records")
    if fmt == "preference":
        problems.extend(_margin_consistency(records, rows, source))
    if problems:
        problems.sort(key=lambda p: p.row)
        raise DataError(
            problems[:max_problems],
            total=len(problems),
            note=f"format {fmt!r}",
            rows=len({p.row for p in problems}),
        )
    return RecordSet(records, rows, source, fmt)


def _margin_consistency(records: list[dict], rows: list[int], source: str) -> list[RowProblem]:
    # A batch cannot mix pairs with and without a margin; filling one in would be a silent guess.
    with_margin = sum("margin" in r for r in records)
    if with_margin in (0, len(records)):
        return []
    return [
        RowProblem(source, row, "margin", f"missing here but given in {with_margin} other rows")
        for record, row in zip(records, rows, strict=True)
        if "margin" not in record
    ]


def load_records(
    path: str | Path | Any,
    fmt: str,
    *,
    split: str | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    keep_fields: KeepFields = (),
) -> RecordSet:
    """Load and validate a data file (or `datasets` directory) in format ``fmt``.

    Args:
        path: ``.jsonl``/``.ndjson``, ``.json`` (a list of objects or ``{"data": [...]}``),
            ``.csv``/``.tsv`` (with a header), ``.parquet``, a `datasets` directory, or an
            in-memory `datasets.Dataset`/`DatasetDict` (from Python, as ``data.train_file``).
        fmt: one of ``prompt``, ``sft``, ``preference``, ``safety_preference``, ``rating``.
        split: the split of a saved ``DatasetDict`` (needed when it has several).
        max_problems: how many problems the error lists (all are counted).
        keep_fields: other columns to keep in each record as read (CSV cells stay text), when
            the row has them; ``"all"`` keeps every column. A format's own fields are always
            its normalised values.

    Raises:
        DataError: listing every bad row (up to ``max_problems``) and the total.
    """
    if type(path).__module__.startswith("datasets."):
        return _from_dataset(path, fmt, split, max_problems, keep_fields)
    path = Path(path)
    kind = file_kind(path)
    # CSV cells are text: numbers and booleans are parsed from it, prompts are plain strings.
    text_cells = kind in ("csv", "tsv")
    raw_rows = _read(path, kind, split)
    return _validate(raw_rows, fmt, str(path), text_cells, max_problems, keep_fields)


def _from_dataset(
    dataset: Any, fmt: str, split: str | None, max_problems: int, keep_fields: KeepFields
) -> RecordSet:
    """Validate an in-memory `datasets.Dataset` (or one split of a `DatasetDict`)."""
    import datasets

    source = f"<{type(dataset).__name__}>"
    if isinstance(dataset, datasets.DatasetDict):
        names = list(dataset)
        split = names[0] if split is None and len(names) == 1 else split
        if split not in dataset:
            raise _file_error(source, f"set data.train_split to one of: {', '.join(names)}")
        dataset, source = dataset[split], f"<DatasetDict[{split!r}]>"
    return validate_records(
        dataset.to_list(), fmt, source=source, max_problems=max_problems, keep_fields=keep_fields
    )


def validate_records(
    records: Iterable[Any],
    fmt: str,
    *,
    source: str = "<records>",
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    keep_fields: KeepFields = (),
) -> RecordSet:
    """Validate in-memory records (numbered 1, 2, ...) as ``load_records`` does for a file."""
    raw_rows = (RawRow(i, value) for i, value in enumerate(records, start=1))
    return _validate(raw_rows, fmt, source, False, max_problems, keep_fields)
