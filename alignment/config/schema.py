"""Strict typed recipes: YAML + dotted overrides -> validated dataclasses, all errors reported at once.

A recipe schema is a dataclass whose fields carry their constraints in `field(metadata=...)`:
  help  -- one line describing the key (shown by `alignment <stage> --help-recipe`)
  min / max -- inclusive numeric bounds
  path  -- "model" | "data" | "file" | "dir": the value must exist locally ("model" and "data" also
           accept a hub id such as `Qwen/Qwen2.5-0.5B`, loaded later by name)
A schema may define `check(self) -> list[str]` for cross-field rules; return "key: problem" strings.
Nothing here imports torch or transformers, so validation is instant and happens before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from alignment.errors import RecipeError

T = TypeVar("T")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def option(default: Any = dataclasses.MISSING, *, help: str = "", **constraints: Any) -> Any:
    """A recipe field: `option(1e-4, help="peak learning rate", min=0.0)`. Lists/dicts/dataclasses as defaults are copied."""
    metadata = {"help": help, **constraints}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: _copy(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


def required(*, help: str = "", **constraints: Any) -> Any:
    return dataclasses.field(metadata={"help": help, "required": True, **constraints})


def load_recipe(path: str | Path, schema: type[T], overrides: list[str] = (), check_paths: bool = True) -> T:
    """Read a YAML recipe, apply `key.sub=value` overrides, and build `schema`; raise RecipeError listing every problem."""
    path = Path(path)
    raw = read_recipe_yaml(path)
    for item in overrides:
        _apply_override(raw, item, path)
    errors: list[str] = []
    recipe = build(schema, raw, "", errors, check_paths)
    if not errors and hasattr(recipe, "check"):
        errors.extend(recipe.check())
    if errors:
        raise RecipeError("\n".join(f"{path}: {e}" for e in errors))
    return recipe


def read_recipe_yaml(path: str | Path) -> dict:
    """The raw mapping of a recipe file; RecipeError (one line) if missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values, got {type(raw).__name__}")
    return raw


def is_hub_id(value: str, kind: str) -> bool:
    """Whether a path-like value that does not exist locally is read as a hub id (`org/name`).

    A value ending in a local data-file suffix (`data/sft.jsonl`) is a local path even though it has
    the `a/b` shape, so a mistyped file name is reported as missing instead of passing as a hub id.
    """
    if kind not in ("model", "data") or not HUB_ID.match(value) or value.startswith((".", "/")):
        return False
    return not (kind == "data" and value.lower().endswith(DATA_SUFFIXES))


def build(schema: type[T], raw: dict, prefix: str, errors: list[str], check_paths: bool = True) -> T:
    """Build dataclass `schema` from a mapping, appending "key: problem" strings to `errors`."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            errors.append(f"unknown key '{prefix}{key}'{hint}")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.metadata.get("required"):
                errors.append(f"{key}: missing required key ({f.metadata.get('help') or 'no default'})")
            continue
        values[name] = _convert(raw[name], hints[name], key, f.metadata, errors, check_paths)
    try:
        return schema(**values)
    except TypeError:  # a required field failed to convert; errors already say why
        return None  # type: ignore[return-value]


def _convert(value: Any, tp: Any, key: str, meta: dict, errors: list[str], check_paths: bool) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], key, meta, errors, check_paths)
        for candidate in non_none:  # e.g. `str | list[str]`: first type that accepts the value wins
            trial: list[str] = []
            out = _convert(value, candidate, key, meta, trial, check_paths)
            if not trial:
                return out
        errors.append(f"{key}: expected {_describe(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_convert(v, args[0], f"{key}.{i}", meta, errors, check_paths) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping of keys under '{key}', got {value!r}")
            return None
        return build(tp, value, key + ".", errors, check_paths)
    if tp is Any:
        return value
    converted = _scalar(value, tp)
    if converted is None:
        errors.append(f"{key}: expected {_describe(tp)}, got {value!r}")
        return value
    _check_bounds(converted, key, meta, errors)
    if check_paths and meta.get("path"):
        _check_path(str(converted), key, meta["path"], errors)
    return converted


def _scalar(value: Any, tp: Any) -> Any:
    if tp is bool:
        return value if isinstance(value, bool) else None
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string; accept it as users mean it
            try:
                return float(value)
            except ValueError:
                return None
        return None
    if tp is str:
        return value if isinstance(value, str) else None
    return value


def _check_bounds(value: Any, key: str, meta: dict, errors: list[str]) -> None:
    if "min" in meta and value < meta["min"]:
        errors.append(f"{key}: must be >= {meta['min']}, got {value}")
    if "max" in meta and value > meta["max"]:
        errors.append(f"{key}: must be <= {meta['max']}, got {value}")


def _check_path(value: str, key: str, kind: str, errors: list[str]) -> None:
    if os.path.exists(value):
        if kind == "file" and not os.path.isfile(value):
            errors.append(f"{key}: '{value}' is not a file")
        elif kind == "dir" and not os.path.isdir(value):
            errors.append(f"{key}: '{value}' is not a directory")
        return
    spec = value.split(":", 1)[0] if kind == "file" else value  # `file.py:function` names a function in a file
    if kind == "file" and os.path.isfile(spec):
        return
    if is_hub_id(value, kind):
        return  # a hub id; loaded by name at run time
    errors.append(f"{key}: path '{value}' does not exist")


def _describe(tp: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _apply_override(raw: dict, item: str, path: Path) -> None:
    if "=" not in item:
        raise RecipeError(f"override '{item}' must look like key.sub=value (for recipe {path})")
    dotted, text = item.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise RecipeError(f"override '{item}' must look like key.sub=value (for recipe {path})")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # e.g. `data.sources.0.path=a: b`; the schema check says if a string does not fit
    node: Any = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override '{item}': '{part}' is not an index of the list at that key ({path})")
            node = node[int(part)]
        else:
            if node.get(part) is None:  # absent, or an empty section (`lora:` / `lora: null`)
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override '{item}': '{part}' holds a value, not a section ({path})")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"override '{item}': '{last}' is not an index of the list at that key ({path})")
        node[int(last)] = value
    else:
        node[last] = value


def to_dict(recipe: Any) -> dict:
    return dataclasses.asdict(recipe)


def save_resolved(recipe: Any, output_dir: str | Path, stage: str) -> Path:
    """Write the fully resolved recipe (defaults filled in) next to the outputs: `<output_dir>/recipe.yaml`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "recipe.yaml"
    tmp = out / ".recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump({"stage": stage, **to_dict(recipe)}, sort_keys=False))
    os.replace(tmp, target)
    return target


def describe_schema(schema: type, prefix: str = "") -> list[str]:
    """One line per key: `train.learning_rate (a number, default 0.0001): peak learning rate`."""
    lines = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            lines.extend(describe_schema(tp if dataclasses.is_dataclass(tp) else inner[0], f"{prefix}{f.name}."))
            continue
        if f.metadata.get("required"):
            default = "required"
        elif f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        else:
            default = "default " + repr(f.default_factory())  # type: ignore[misc]
        lines.append(f"{prefix}{f.name} ({default}): {f.metadata.get('help', '')}")
    return lines
