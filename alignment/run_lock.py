"""One run per output directory, seen alike by every rank.

Rank 0 of a stage holds an exclusive lock on `<output.dir>/.lock` while it runs.

A second run pointed at the same directory (a repeated command, or `accelerate launch --num_machines 2` without a
multi-node launcher, which starts independent runs) would race on its checkpoints and metrics; it stops at once
with a UserError naming the holder. The lock is an OS file lock (`flock`), so it dies with its process: a run
that was killed leaves a stale `.lock` file that the next run simply takes over. (flock may not be enforced
across hosts on some network filesystems.)

Every rank then checks that it sees the directory rank 0 locked (the lock file's token): a multi-node run needs
output.dir on a filesystem all nodes share, since each rank writes its checkpoint shards there and rank 0
publishes them. With a directory per node, node 1's shards would never reach a published checkpoint and resume
would be impossible; the run stops before training instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from alignment import distributed
from alignment.errors import UserError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # directory -> open descriptor holding its lock (this process)


def lock_output_dir(directory: str | Path) -> Path:
    """Take the lock of `directory` (created if needed) for this process; a no-op when this process holds it."""
    directory = Path(directory).resolve()
    if directory in _held:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"output.dir '{directory}' is in use by another run ({holder}); wait for it to end, stop it, "
                        "or choose another output.dir") from None
    holder = {"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held[directory] = fd
    return directory


def _token_in(directory: Path) -> str | None:
    """The token in `directory`'s lock file, as this rank reads it (None: no lock file, or not ours)."""
    try:
        return json.loads((directory / LOCK_FILE).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


def unlock_output_dir(directory: str | Path) -> None:
    """Release this process's lock of `directory` (if held); the `.lock` file stays, stale and free."""
    fd = _held.pop(Path(directory).resolve(), None)
    if fd is not None:
        os.close(fd)


def lock_output_dir_on_main(directory: str | Path) -> None:
    """`lock_output_dir` on rank 0; every rank raises the same UserError when it fails (no rank left waiting)."""
    error = None
    if distributed.is_main():
        try:
            lock_output_dir(directory)
        except UserError as exc:
            error = str(exc)
    error = distributed.broadcast_from_main(error)
    if error is not None:
        raise UserError(error)


def claim_output_dir(directory: str | Path) -> None:
    """Before a run writes into `directory`, on every rank: rank 0 takes its lock, then each rank checks that it
    reads rank 0's lock token there. Every rank raises the same UserError when either fails."""
    directory = Path(directory).resolve()
    lock_output_dir_on_main(directory)
    token = distributed.broadcast_from_main(_token_in(directory) if distributed.is_main() else None)
    views = distributed.gather_objects((_token_in(directory) == token, socket.gethostname()))
    blind = [f"rank {r} on {host}" for r, (sees, host) in enumerate(views) if not sees]
    if blind:
        if distributed.is_main():
            unlock_output_dir(directory)
        raise UserError(f"output.dir '{directory}' is not the same directory on every rank: {', '.join(blind)} "
                        f"cannot see the lock file rank 0 (on {views[0][1]}) wrote there. Multi-node runs need output.dir "
                        "on a filesystem shared by all nodes (NFS, Lustre, a cloud file share): each rank writes its "
                        "checkpoint shards there and rank 0 publishes them")
