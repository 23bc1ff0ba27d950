"""What a user sees: our own lines on the console, everything the libraries print in a log file.

vLLM, DeepSpeed, torch, transformers and TRL print hundreds of lines per stage (engine start-up, NUMA binding,
deprecation warnings, weight-loading bars, raw metric dicts), from Python loggers bound to `sys.stdout` or
`sys.stderr` when they were imported, from C++ and from the processes they start (vLLM's engine core). Only moving
file descriptors 1 and 2 catches all of it, so `capture()` points both at a log file and keeps a duplicate of the
terminal for `say()`, the one way our code speaks to the user (stage lines, warnings, results, progress bars).

The log starts in a temporary file (the output directory must not exist before the stage has checked its inputs)
and moves into the output directory with `keep_log_in()`, called where the stage takes its directory: from then on
`tail -f <output.dir>/<stage>.log` follows the run. `--verbose` or ALIGNMENT_VERBOSE=1 leaves everything on the
console, as does a caller that redirected `sys.stdout` itself. Without `capture()` `say()` prints to `sys.stdout`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

VERBOSE_ENV = "ALIGNMENT_VERBOSE"


class _Capture:
    def __init__(self, stage: str):
        self.stage = stage
        self.rank = int(os.environ.get("RANK", "0"))
        fd, self.path = tempfile.mkstemp(prefix=f"alignment-{stage}-", suffix=".log")
        sys.stdout.flush()
        sys.stderr.flush()
        # Line-buffered text streams over duplicates of the terminal's descriptors, for our lines and errors.
        self.out = open(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        self._point_at(fd)
        self.in_output_dir = False
        self.run_start = 0

    def _point_at(self, fd: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def move_to(self, directory: Path) -> None:
        """Append what was logged so far to `<directory>/<stage>.log` (`<stage>.rank<r>.log` on other ranks) and log
        there from now on (a resumed run appends to its predecessor's log)."""
        name = f"{self.stage}.log" if self.rank == 0 else f"{self.stage}.rank{self.rank}.log"
        target = Path(directory) / name
        with open(target, "ab") as dst, open(self.path, "rb") as src:
            self.run_start = dst.tell()  # this run's part of a log that a resumed run appends to
            dst.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n".encode())
            shutil.copyfileobj(src, dst)
        self._point_at(os.open(target, os.O_WRONLY | os.O_APPEND))
        os.unlink(self.path)
        self.path, self.in_output_dir = str(target), True


_capture: _Capture | None = None


def should_capture(verbose_flag: bool) -> bool:
    """Capture unless asked not to (`--verbose`, ALIGNMENT_VERBOSE=1) or someone else already redirected the output
    (a test harness, a notebook: `main()` called in their process)."""
    verbose = verbose_flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    return not verbose and sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__


def capture(stage: str) -> None:
    """Send everything written to descriptors 1 and 2 (this process and those it starts) to the stage's log."""
    global _capture
    if _capture is None:
        _capture = _Capture(stage)


def release(keep_log: bool) -> None:
    """Give descriptors 1 and 2 back to the terminal (the end of `alignment.cli.main`). A log that never reached an
    output directory (the stage stopped on bad input) is removed unless `keep_log` (a crash: the error names it)."""
    global _capture
    if _capture is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(_capture.out.fileno(), 1)
    os.dup2(_capture.err.fileno(), 2)
    _capture.out.close()
    _capture.err.close()
    if not _capture.in_output_dir and not keep_log:
        os.unlink(_capture.path)
    _capture = None


def keep_log_in(directory: str | Path) -> None:
    """The stage has taken `directory`: the log moves there (once; a no-op without `capture()`)."""
    if _capture is not None and not _capture.in_output_dir:
        _capture.move_to(Path(directory))


def log_path() -> str | None:
    return _capture.path if _capture is not None else None


def stream():
    """The console: where `say()` writes and where our progress bars draw."""
    return _capture.out if _capture is not None else sys.stdout


def error_stream():
    return _capture.err if _capture is not None else sys.stderr


def say(*lines: str) -> None:
    """Our lines, to the user: the console when the libraries' output is captured, else standard output. On a
    terminal tqdm writes them above a progress bar and redraws it below; elsewhere the bar only draws now and then."""
    text = "\n".join(str(line) for line in lines)
    if is_terminal():
        from tqdm import tqdm

        tqdm.write(text, file=stream())
    else:
        print(text, file=stream())
    stream().flush()


def is_terminal() -> bool:
    try:
        return stream().isatty()
    except (AttributeError, ValueError):
        return False


def progress(total: int, desc: str, initial: int = 0, disable: bool = False, unit: str = "step"):
    """A tqdm bar on the console; on a pipe or a file (CI, `| tee`) it redraws rarely, so the output stays short."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=disable, unit=unit, file=stream(), dynamic_ncols=True,
                mininterval=0.5 if is_terminal() else 30.0)


# Lines of the libraries' output that a user should hear of (Python warnings, logging at WARNING and above).
_WARNING_LINE = re.compile(r"\bWARN(ING)?\b|\w+Warning:|\bERROR\b")


def closing_line() -> str | None:
    """Where the library log is and how many warning lines it holds (None without `capture()`)."""
    if _capture is None:
        return None
    try:
        with open(_capture.path, "rb") as fh:
            fh.seek(_capture.run_start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    warnings = sum(1 for line in text.splitlines() if _WARNING_LINE.search(line))
    return f"library output: {_capture.path}" + (f" ({warnings} warning lines)" if warnings else "")
