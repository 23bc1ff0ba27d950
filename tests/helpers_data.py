"""Small builders shared by the config, data and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alignment.config.schema import build
from alignment.config.sections import DataSection


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def data_section(sources: list, **kw) -> DataSection:
    """A validated DataSection; sources are paths or dicts of DataSource keys."""
    raw = {"sources": [s if isinstance(s, dict) else {"path": str(s)} for s in sources], "eval_fraction": 0.0, **kw}
    errors: list[str] = []
    section = build(DataSection, raw, "data.", errors)
    assert not errors, errors
    return section


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_recipe(data_path, out_dir, **data_kw) -> dict:
    return {
        "stage": "sft",
        "model": {"name_or_path": "org/tiny-model"},
        "data": {"sources": [{"path": str(data_path)}], **data_kw},
        "output": {"dir": str(out_dir)},
    }
