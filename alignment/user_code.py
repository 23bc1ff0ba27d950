"""Loading the user's code a recipe names: reward functions, tools, environments, converters."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from alignment.errors import UserError


def load_callable(spec: str, what: str) -> Callable:
    """The function or class `spec` names: 'package.module:name' or 'path/to/file.py:name'; UserError otherwise."""
    if ":" not in spec:
        raise UserError(f"{what} '{spec}' must look like 'module:name' or 'file.py:name'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"{what} file '{where}' does not exist")
        module_spec = importlib.util.spec_from_file_location(f"user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: report its error in one line
            raise UserError(f"{what} file '{where}' failed to import: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UserError(f"cannot import module '{where}' for {what} '{spec}': {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"'{name}' is not a function or class in '{where}' ({what})")
    return fn
