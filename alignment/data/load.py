"""`load_stage_data`: read, validate, clean, filter, split and mix the data of one stage.

Pipeline, in order (every dropped row is counted in the report under its reason):
  1. read each source (sources.py); an unreadable JSON line or malformed row is a DataError naming
     file and row, or with `on_malformed: skip` is skipped and counted as "malformed"
  2. validate and normalise each row to the kind's columns (formats.py); all sources, eval sources
     included, must end up with the same format
  3. clean text fields (clean.py); drop rows a cleaning step left empty
  4. drop exact duplicates (after cleaning; the first occurrence in recipe order wins) and train
     rows that also appear in `eval_sources`
  5. drop rows longer than `clean.max_tokens` (needs the tokenizer; see clean.sequences)
  6. hold out eval rows per source by `eval_fraction` unless `eval_sources` is given (then
     `eval_fraction` is not used), and mix the train rows by weight (mixture.py)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from alignment.config.sections import DataSection, DataSource
from alignment.data import mixture
from alignment.data.clean import Cleaner, empty_field, sequences, token_lengths
from alignment.data.formats import Format, Normaliser
from alignment.data.report import DataReport, SourceReport
from alignment.data.sources import MalformedRow, read_source
from alignment.errors import DataError

Kind = Literal["sft", "preference", "prompt"]
KINDS = ("sft", "preference", "prompt")
MAX_EXAMPLES = 3  # malformed-row messages kept in the report when skipping


@dataclass
class StageData:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    report: DataReport
    format: Format


@dataclass
class _Source:
    """Rows of one source moving through the pipeline, each with its location for messages."""

    spec: DataSource
    report: SourceReport
    format: Format | None = None
    rows: list[tuple[str, dict]] = field(default_factory=list)


def load_stage_data(data: DataSection, kind: Kind, tokenizer=None) -> StageData:
    """The train (and eval) datasets of a stage, with a report of what was read, dropped and kept."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if data.clean.max_tokens is not None and tokenizer is None:
        raise ValueError("data.clean.max_tokens is set: pass the stage's tokenizer to load_stage_data")
    report = DataReport(kind=kind)
    cleaner = Cleaner(data.clean)

    train = [_read(spec, "train", kind, data, cleaner, report) for spec in data.sources]
    evals = [_read(spec, "eval", kind, data, cleaner, report) for spec in data.eval_sources]
    fmt = _common_format(train + evals)
    report.format = fmt.describe()

    if data.clean.deduplicate:
        _deduplicate(train, report)
        _deduplicate(evals, report)
        _drop_eval_overlap(train, evals, report)
    if data.clean.max_tokens is not None:
        for source in train + evals:
            _filter_length(source, data.clean.max_tokens, tokenizer, data.on_malformed, report)
    for source in train + evals:
        source.report.kept = len(source.rows)
        if not source.rows:
            raise DataError(f"data source '{source.spec.path}': all {source.report.read} rows were dropped ({_reasons(report.dropped)})")

    pools, eval_rows = [], []
    for i, source in enumerate(train):
        rows = [row for _, row in source.rows]
        if source.spec.weight > 0 and not evals:
            rows, held = mixture.split_rows(rows, data.eval_fraction, data.seed, i)
            source.report.held_out = len(held)
            eval_rows.extend(held)
        pools.append(rows)
    for source in evals:
        eval_rows.extend(row for _, row in source.rows)
    weights = [s.weight for s in data.sources]
    if not any(w > 0 for w in weights):
        raise DataError("data.sources: every source has weight 0; give at least one a positive weight")
    for source in train:
        if source.spec.weight == 0:
            report.notes.append(f"{source.spec.path}: weight 0, not used")
    train_rows, taken = mixture.mix(pools, weights, data.seed)
    for source, count in zip(train, taken):
        source.report.taken = count
    report.train_rows, report.eval_rows = len(train_rows), len(eval_rows)
    return StageData(
        train=_to_dataset(train_rows, "train"),
        eval=_to_dataset(eval_rows, "eval") if eval_rows else None,
        report=report,
        format=fmt,
    )


def _read(spec: DataSource, role: str, kind: str, data: DataSection, cleaner: Cleaner, report: DataReport) -> _Source:
    raw = read_source(spec, data.on_malformed)
    source = _Source(spec, SourceReport(label=spec.path, role=role, weight=spec.weight, read=len(raw.rows) + len(raw.problems)))
    report.sources.append(source.report)
    if source.report.read == 0:
        raise DataError(f"data source '{spec.path}': no rows (empty dataset)")
    for problem in raw.problems:
        _skip(problem, source, report)
    normalise = Normaliser(kind)
    rename = _column_mapping(spec)
    for item in raw.rows:
        try:
            row = normalise(rename(item.value))
        except MalformedRow as exc:
            if data.on_malformed == "error":
                raise DataError(f"{item.where}: {exc}") from None
            _skip(f"{item.where}: {exc}", source, report)
            continue
        row, changed = cleaner(row)
        report.cleaned.update(changed)
        if changed:
            emptied = empty_field(row)
            if emptied:
                report.dropped[f"'{emptied}' empty after cleaning"] += 1
                continue
            if kind == "preference" and row["chosen"] == row["rejected"]:
                report.dropped["chosen equals rejected after cleaning"] += 1
                continue
        source.rows.append((item.where, row))
    source.format = normalise.format
    if normalise.ignored_columns:
        report.notes.append(f"{spec.path}: columns not used: {', '.join(sorted(map(str, normalise.ignored_columns)))}")
    if spec.columns:
        report.notes.append(f"{spec.path}: columns renamed: {', '.join(f'{a} -> {b}' for a, b in spec.columns.items())}")
    if normalise.hh_transcripts:
        report.notes.append(f"{spec.path}: {normalise.hh_transcripts} rows held HH-style transcripts "
                            "('\\n\\nHuman: ... \\n\\nAssistant: ...'); they were turned into conversations")
    if normalise.prompts_extracted:
        report.notes.append(f"{spec.path}: prompt extracted from chosen/rejected in {normalise.prompts_extracted} rows")
    if normalise.prompt_column_ignored:
        report.notes.append(
            f"{spec.path}: chosen/rejected hold whole conversations; their shared turns were used as the prompt "
            f"and the 'prompt' column was ignored in {normalise.prompt_column_ignored} rows"
        )
    return source


def _column_mapping(spec: DataSource):
    """A function renaming a row's columns as `spec.columns` says (source name -> stage name)."""
    mapping = spec.columns
    bad = [f"{k!r}: {v!r}" for k, v in mapping.items() if not (isinstance(k, str) and isinstance(v, str) and k and v)]
    if bad:
        raise DataError(f"data source '{spec.path}': columns must map column names to column names, got {', '.join(bad)}")
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        raise DataError(f"data source '{spec.path}': columns maps two columns onto one ({mapping})")
    if not mapping:
        return lambda row: row

    def rename(row):
        if not isinstance(row, dict):
            return row
        clashes = [mapping[k] for k in mapping if k in row and mapping[k] in row and mapping[k] not in mapping]
        if clashes:
            raise MalformedRow(f"has both '{clashes[0]}' and a column renamed to it")
        return {mapping.get(k, k): v for k, v in row.items()}

    return rename


def _skip(message: str, source: _Source, report: DataReport) -> None:
    source.report.malformed += 1
    report.dropped["malformed"] += 1
    if len(report.malformed_examples) < MAX_EXAMPLES:
        report.malformed_examples.append(message)


def _common_format(sources: list[_Source]) -> Format:
    first = next((s for s in sources if s.format is not None), None)
    if first is None:
        raise DataError(f"data source '{sources[0].spec.path}': no usable rows (all malformed)")
    for other in sources:
        if other.format is not None and other.format != first.format:
            a, b = first.spec.path, other.spec.path
            raise DataError(
                f"data sources '{a}' and '{b}' have different formats ('{a}': {first.format.describe()}; "
                f"'{b}': {other.format.describe()}); all sources of a stage must have the same columns"
            )
    return first.format


def _row_key(row: dict) -> str:
    import json

    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def _deduplicate(sources: list[_Source], report: DataReport) -> None:
    seen: set[str] = set()
    for source in sources:
        kept = []
        for where, row in source.rows:
            key = _row_key(row)
            if key in seen:
                report.dropped["duplicate"] += 1
                continue
            seen.add(key)
            kept.append((where, row))
        source.rows = kept


def _drop_eval_overlap(train: list[_Source], evals: list[_Source], report: DataReport) -> None:
    held = {_row_key(row) for source in evals for _, row in source.rows}
    if not held:
        return
    for source in train:
        before = len(source.rows)
        source.rows = [(w, r) for w, r in source.rows if _row_key(r) not in held]
        if before - len(source.rows):
            report.dropped["train row also in eval_sources"] += before - len(source.rows)


def _filter_length(source: _Source, max_tokens: int, tokenizer, on_malformed: str, report: DataReport) -> None:
    texts, owner, rows = [], [], []
    for where, row in source.rows:
        try:
            seqs = sequences(row, tokenizer)
        except Exception as exc:  # noqa: BLE001 - a chat template raising on this row's roles/content
            message = f"{where}: the tokenizer's chat template cannot render this row ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            if on_malformed == "error":
                raise DataError(message) from None
            _skip(message, source, report)
            continue
        rows.append((where, row))
        texts.extend(seqs)
        owner.extend([len(rows) - 1] * len(seqs))
    templated = bool(getattr(tokenizer, "chat_template", None)) and source.format is not None and source.format.conversational
    longest = [0] * len(rows)
    for i, n in zip(owner, token_lengths(texts, tokenizer, templated)):
        longest[i] = max(longest[i], n)
    kept = [item for item, n in zip(rows, longest) if n <= max_tokens]
    if len(rows) - len(kept):
        report.dropped[f"longer than {max_tokens} tokens"] += len(rows) - len(kept)
    source.rows = kept


def _reasons(dropped: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items())) or "no reason recorded"


def _to_dataset(rows: list[dict], split: str):
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        column = _mixed_type_column(rows)
        if column:
            raise DataError(f"{split} data: column '{column[0]}' holds both {column[1]} and {column[2]} values across rows; use one type") from None
        raise DataError(f"{split} data cannot be stored as a table ({str(exc).splitlines()[0]})") from None


def _mixed_type_column(rows: list[dict]) -> tuple[str, str, str] | None:
    first: dict[str, str] = {}
    for row in rows:
        for key, value in row.items():
            if value is None:
                continue
            name = type(value).__name__
            if first.setdefault(key, name) != name and {first[key], name} != {"int", "float"}:
                return key, first[key], name
    return None
