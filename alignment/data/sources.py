"""Read the raw rows of one `DataSource`: a hub dataset id, or a local file / directory of files.

Local formats: .jsonl (one JSON object per line), .json (a JSON array of objects, or JSON Lines),
.parquet and .csv. JSON files are read here line by line rather than by `datasets`' json builder,
so that a broken line is reported with its file and line number (the builder fails with a
traceback wall) and so that a row whose types differ from the others reaches row validation
instead of failing Arrow's type inference. Parquet and CSV go through `datasets`' builders.

Row numbers are 1-based: the line number in a .jsonl file (blank lines count, so the number
matches an editor's), the element index in a JSON array, the data row (header excluded) of a
CSV, and the row index of a parquet file or hub split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from alignment.config.schema import DATA_SUFFIXES, is_hub_id
from alignment.config.sections import DataSource
from alignment.errors import DataError

LOCAL_SUFFIXES = DATA_SUFFIXES


@dataclass
class RawRow:
    where: str      # "data/sft.jsonl row 17"
    value: object   # the parsed row (a dict when well-formed)


class MalformedRow(Exception):
    """A row that cannot be used; the message names the file and row."""


@dataclass
class RawSource:
    label: str                   # how the recipe names it (path or hub id)
    rows: list[RawRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unparsable lines (kept apart from rows)


def read_source(source: DataSource, on_malformed: str) -> RawSource:
    """All rows of `source` (at most `max_rows`, counting unparsable lines); raises DataError on failure."""
    raw = RawSource(label=source.path)
    limit = source.max_rows
    for where, value in _iter_rows(source, on_malformed):
        if limit is not None and len(raw.rows) + len(raw.problems) >= limit:
            break
        if isinstance(value, MalformedRow):
            raw.problems.append(str(value))
        else:
            raw.rows.append(RawRow(where, value))
    return raw


def _iter_rows(source: DataSource, on_malformed: str) -> Iterator[tuple[str, object]]:
    path = source.path
    if os.path.exists(path):
        for file in _local_files(Path(path)):
            yield from _read_file(file, on_malformed)
        return
    if is_hub_id(path, "data"):
        yield from _read_hub(source)
        return
    raise DataError(f"data source '{path}' does not exist (not a local file or directory, nor a hub id like org/name)")


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported data file type '{path.suffix}' (use {', '.join(LOCAL_SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"{path}: directory holds no data files ({', '.join(LOCAL_SUFFIXES)})")
    return files


def _read_file(file: Path, on_malformed: str) -> Iterator[tuple[str, object]]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_json_lines(file, on_malformed)
    elif suffix == ".json":
        yield from _read_json(file, on_malformed)
    else:
        yield from _read_with_datasets(file, "parquet" if suffix == ".parquet" else "csv")


def _read_json_lines(file: Path, on_malformed: str) -> Iterator[tuple[str, object]]:
    try:
        fh = open(file, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    with fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as exc:
                raise DataError(f"{file} row {lineno + 1}: not valid UTF-8 ({exc.reason})") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            where = f"{file} row {lineno}"
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                problem = f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                if on_malformed == "error":
                    raise DataError(problem) from None
                yield where, MalformedRow(problem)
                continue
            yield where, value


def _read_json(file: Path, on_malformed: str) -> Iterator[tuple[str, object]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: cannot read ({exc})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines in a .json file
            yield from _read_json_lines(file, on_malformed)
            return
        raise DataError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(value, dict):  # a single object is one row (JSON Lines with one line)
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{file}: expected a JSON array of objects or JSON Lines, got {type(value).__name__}")
    for i, row in enumerate(value, 1):
        yield f"{file} row {i}", row


def _read_with_datasets(file: Path, builder: str) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as exc:  # noqa: BLE001 - parse errors of many kinds; one line for the user
        raise DataError(f"{file}: cannot read as {builder} ({_first_line(exc)})") from None
    for i, row in enumerate(ds, 1):
        yield f"{file} row {i}", row


def _read_hub(source: DataSource) -> Iterator[tuple[str, object]]:
    import datasets

    split = source.split
    if source.max_rows is not None and "[" not in split:
        split = f"{split}[:{source.max_rows}]"  # let the hub loader slice instead of reading everything
    try:
        ds = datasets.load_dataset(source.path, name=source.name, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing split/config: one line for the user
        raise DataError(f"data source '{source.path}' (split {source.split}): cannot load from the hub ({_first_line(exc)})") from None
    label = f"{source.path}[{source.split}]"
    for i, row in enumerate(ds, 1):
        yield f"{label} row {i}", row


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
