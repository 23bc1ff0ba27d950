"""Run untrusted Python (a policy's completion) in a sandbox of its own; a misbehaving program is a result, never a crash.

`run_sandboxed(source)` runs `python -I main.py` in fresh Linux namespaces and returns a `SandboxResult`; `run_many`
(threads) and `run_many_async` (asyncio) run many programs at once, a bounded number at a time.

What the program gets, and how:
- no network: a new network namespace, whose only interface, loopback, is down (not even 127.0.0.1 answers);
- a read-only machine: a new mount namespace where every mount is made read-only (and nosuid) recursively;
- a private scratch directory: fresh size-capped tmpfs mounts at /tmp (its cwd, HOME and TMPDIR) and /dev/shm;
- none of the run's files: empty tmpfs mounts over the caller's working directory, home, /run (the machine's service
  sockets) and any `hide` paths, so checkpoints and secrets there cannot even be read; the base interpreter's own
  directories are bound back when they lie under one of them (pyenv and uv install Python in the home);
- none of the caller's environment variables (API keys): the program's environment is PATH, HOME, TMPDIR and LANG;
- no way to outlive its time: a new pid namespace whose init (pid 1) is the program's parent; SIGKILL to that init at
  the wall-clock timeout makes the kernel kill every process in the namespace, whatever it forked or daemonized;
- bounded resources: rlimits on address space, processes, CPU seconds, file size, open files, no core dumps;
- no privilege: as root, the program runs as an unused uid of its own (0x70000000 + the helper's pid), so the
  per-user process limit counts this program's processes only and really holds (root bypasses RLIMIT_NPROC; a shared
  uid like 'nobody' would let one fork bomb starve every other sandbox); it cannot read root-only files and its
  capabilities are gone. Not root, the namespaces are created inside a new user namespace mapping only the caller's
  uid (not uid 0), so the program runs as the caller without any capability, and no-new-privs holds in both cases.

Process tree: caller -> helper (a fresh `python -I -S` running `_helper_main`) -> init (pid 1) -> the program. A
fresh interpreter does the isolation because the caller is multi-threaded (reward pools, vLLM), where running Python
between fork and exec (`preexec_fn`) can deadlock, and unshare(CLONE_NEWUSER) refuses multi-threaded callers.
The helper enforces the timeout itself (so a sandbox ends even if its caller dies) and the caller enforces it again,
a grace later, by killing the helper's process group, which holds init.

Requirements: Linux >= 5.12 (mount_setattr) and permission to create the namespaces: root without a seccomp profile
that forbids them (a VM or bare metal, not an unprivileged container), or unprivileged user namespaces allowed
(sysctl kernel.unprivileged_userns_clone=1; Ubuntu: kernel.apparmor_restrict_unprivileged_userns=0). Where that
fails, `SandboxUnavailable` says why: no program ever runs unsandboxed.

Limits of this sandbox: the machine's files outside the hidden paths stay readable (read-only), and memory is capped
per process (RLIMIT_AS), so a program may hold max_processes * memory_mb at most (no cgroup: cgroups are not
reliably writable). Not root, the program runs as the caller's uid, so whatever that uid may read stays readable.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from alignment.errors import UserError

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 512
DEFAULT_MAX_PROCESSES = 32
DEFAULT_SCRATCH_MB = 64
DEFAULT_OUTPUT_BYTES = 64 * 1024
DEFAULT_CONCURRENCY = 8

SCRATCH = "/tmp"
PROGRAM = "main.py"
HELPER_GRACE_S = 10.0  # the caller's deadline past the timeout: the helper's start-up and teardown on a loaded machine
KILL_GRACE_S = 5.0  # how long the caller waits for a killed helper to go
SANDBOX_UID_BASE = 0x70000000  # above the uid ranges distributions and systemd hand out; + a pid < 2**22 stays unique
OPEN_FILES = 256
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
_HELPER = "import sys; sys.path.insert(0, sys.argv[1]); from reward.sandbox import _helper_main; _helper_main(*map(int, sys.argv[2:]))"
_FIX = ("code rewards need Linux >= 5.12 and permission to create namespaces: run as root outside a restricted "
        "container, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)")

# Linux constants (linux/sched.h, linux/mount.h, linux/fcntl.h, linux/prctl.h)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscalls share one table)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


class SandboxUnavailable(UserError):
    """This machine cannot isolate a program (no namespaces, an old kernel): nothing is run unsandboxed."""


@dataclass
class SandboxResult:
    """How a program ended. stdout/stderr keep their last `output_bytes` bytes (tracebacks and final lines)."""

    exit_code: int | None  # None when a signal ended it or the sandbox killed it
    signal: int | None  # the signal that ended it (SIGSEGV on a crash, SIGKILL past its CPU seconds); None on a timeout
    stdout: str
    stderr: str
    timed_out: bool
    elapsed_s: float  # wall-clock time of the whole call, sandbox set-up included
    reason: str  # one line for logs: "exited with status 0", "timed out after 2.0 s", "killed by SIGSEGV"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


# ---------------------------------------------------------------- caller side


def run_sandboxed(source: str, *, stdin: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
                  memory_mb: int = DEFAULT_MEMORY_MB, max_processes: int = DEFAULT_MAX_PROCESSES,
                  cpu_s: int | None = None, scratch_mb: int = DEFAULT_SCRATCH_MB,
                  output_bytes: int = DEFAULT_OUTPUT_BYTES, hide: Sequence[str | os.PathLike] = ()) -> SandboxResult:
    """Run the Python program `source` with `stdin` in a sandbox (module docstring) and report how it ended.

    timeout_s: wall clock, then the whole process tree is killed; memory_mb: address space per process;
    max_processes: processes and threads at once; cpu_s: CPU seconds per process (default: the timeout, rounded
    up); scratch_mb: size of /tmp and of /dev/shm; hide: directories to hide besides the working directory and home.
    Raises SandboxUnavailable when the machine cannot sandbox; anything the program does is in the result."""
    python, keep = _interpreter()
    config = {"source": source, "stdin": stdin, "timeout_s": timeout_s, "memory_mb": memory_mb,
              "max_processes": max_processes, "cpu_s": cpu_s or max(1, math.ceil(timeout_s)),
              "scratch_mb": scratch_mb, "python": python, "keep": keep, "hide": _hidden_paths(hide)}
    start = time.monotonic()
    helper, status_r = _start_helper(config)
    out, err, status, killed = _collect(helper, status_r, start + timeout_s + HELPER_GRACE_S, output_bytes)
    report = _parse_report(status)
    if "setup_error" in report:
        raise SandboxUnavailable(f"cannot sandbox code here ({report['setup_error']}); {_FIX}")
    if "done" not in report and not killed:
        raise SandboxUnavailable(f"the sandbox helper failed (status {helper.returncode}): "
                                 f"{err.decode(errors='replace').strip()[-300:]}")
    return _result(report, out, err, killed, timeout_s, time.monotonic() - start)


async def run_sandboxed_async(source: str, **options) -> SandboxResult:
    """`run_sandboxed` in a worker thread, so the event loop (e.g. generation) keeps running meanwhile."""
    return await asyncio.to_thread(run_sandboxed, source, **options)


async def run_many_async(sources: Sequence[str], *, stdins: Sequence[str] | None = None,
                         max_concurrent: int = DEFAULT_CONCURRENCY, **options) -> list[SandboxResult]:
    """Run every program, at most `max_concurrent` at a time; results in the order of `sources`."""
    gate = asyncio.Semaphore(max_concurrent)

    async def one(source: str, stdin: str) -> SandboxResult:
        async with gate:
            return await run_sandboxed_async(source, stdin=stdin, **options)

    return list(await asyncio.gather(*(one(s, i) for s, i in zip(sources, stdins or [""] * len(sources)))))


def run_many(sources: Sequence[str], *, stdins: Sequence[str] | None = None,
             max_concurrent: int = DEFAULT_CONCURRENCY, **options) -> list[SandboxResult]:
    """Run every program from a pool of `max_concurrent` threads (each waits on its own sandbox); results in order."""
    with ThreadPoolExecutor(max_workers=max_concurrent) as pool:
        return list(pool.map(lambda s, i: run_sandboxed(s, stdin=i, **options), sources,
                             stdins or [""] * len(sources)))


def check_sandbox() -> None:
    """Raise SandboxUnavailable unless a trivial program runs in the sandbox and prints its answer (call it once
    before a run: a broken sandbox would otherwise show only as every program scoring zero)."""
    result = run_sandboxed("print(6 * 7)", timeout_s=30)
    if result.stdout.strip() != "42":
        raise SandboxUnavailable(f"a trivial program failed in the sandbox ({result.reason}): "
                                 f"{result.stderr.strip()[-300:]}")


def _interpreter() -> tuple[str, list[str]]:
    """The base interpreter, not the venv's link to it (the venv lies in the hidden working tree), and the
    directories it needs, to bind back where a hidden path covers them."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return python, _outermost({os.path.realpath(sys.base_prefix), os.path.dirname(python)})


def _outermost(paths: set[str]) -> list[str]:
    return sorted(p for p in paths if not any(p != q and _is_under(p, q) for q in paths))


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _hidden_paths(extra: Sequence[str | os.PathLike]) -> list[str]:
    """Real paths of the directories to hide, parents first: the caller's working directory and home, /run and
    `extra`. "/" is skipped (as a working directory it would hide the interpreter; the run's files are then in the
    other paths)."""
    paths = set()
    for path in [os.getcwd(), os.path.expanduser("~"), "/run", *map(str, extra)]:
        real = os.path.realpath(path)
        if os.path.isdir(real):
            paths.add(real)
        elif os.path.exists(real):
            raise UserError(f"the sandbox hides directories, and '{path}' is not one: name its directory")
    return sorted(paths - {"/"})  # sorted: a parent before what lies under it


def _start_helper(config: dict) -> tuple[subprocess.Popen, int]:
    """Start the helper in its own session (its process group is what the caller kills), with the configuration in
    an in-memory file (no pipe to fill) and a pipe for its status lines; no environment, cwd /."""
    config_fd = os.memfd_create("sandbox-config")
    status_r, status_w = os.pipe()
    try:
        os.write(config_fd, json.dumps(config).encode())
        os.lseek(config_fd, 0, os.SEEK_SET)
        helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HELPER, _REPO_ROOT, str(config_fd), str(status_w)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  pass_fds=(config_fd, status_w), cwd="/", env={}, start_new_session=True)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(config_fd)
        os.close(status_w)
    return helper, status_r


def _collect(helper: subprocess.Popen, status_r: int, deadline: float, cap: int) -> tuple[bytes, bytes, bytes, bool]:
    """Read the program's stdout and stderr (keeping the last `cap` bytes of each, draining the rest so it never
    blocks on a full pipe) and the status lines until all close; past `deadline` kill the helper's process group.
    Returns (stdout, stderr, status, killed). Every wait is bounded."""
    buffers = {helper.stdout.fileno(): bytearray(), helper.stderr.fileno(): bytearray(), status_r: bytearray()}
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    open_fds, killed = set(buffers), False
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                if killed:
                    break  # still open a grace after the kill: give up on the rest of the output
                _kill_group(helper)
                killed, deadline = True, time.monotonic() + KILL_GRACE_S
                continue
            for fd, _ in poller.poll(left * 1000):
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    buffers[fd] += chunk
                    del buffers[fd][:-cap]
                else:
                    poller.unregister(fd)
                    open_fds.discard(fd)
        try:
            helper.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(helper)
            killed = True
            helper.wait(timeout=KILL_GRACE_S)
    finally:
        helper.stdout.close()
        helper.stderr.close()
        os.close(status_r)
    out, err, status = buffers.values()
    return bytes(out), bytes(err), bytes(status), killed


def _kill_group(helper: subprocess.Popen) -> None:
    """SIGKILL the helper and the sandbox's init (same process group); init's death ends the whole pid namespace.
    Called before the helper is reaped, so its pid (the group id) cannot have been reused."""
    try:
        os.killpg(helper.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _parse_report(status: bytes) -> dict:
    report = {}
    for line in status.decode(errors="replace").splitlines():
        report.update(json.loads(line))
    return report


def _result(report: dict, out: bytes, err: bytes, killed: bool, timeout_s: float, elapsed_s: float) -> SandboxResult:
    timed_out = killed or report.get("timed_out", False)
    wait_status = report.get("wait_status")
    code = os.waitstatus_to_exitcode(wait_status) if wait_status is not None else None
    exit_code, sig = (code, None) if code is not None and code >= 0 else (None, -code if code is not None else None)
    if timed_out:
        reason = f"timed out after {timeout_s} s"
    elif sig is not None:
        reason = f"killed by {signal.Signals(sig).name}"
    elif exit_code is not None:
        reason = f"exited with status {exit_code}"
    else:
        reason = "the sandbox's init ended before the program"
    return SandboxResult(exit_code, sig, out.decode(errors="replace"), err.decode(errors="replace"), timed_out,
                         elapsed_s, reason)


# ---------------------------------------------------------------- helper side (a fresh interpreter, single-threaded)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _helper_main(config_fd: int, status_fd: int) -> None:
    """Isolate, start init, wait for it up to the timeout (then SIGKILL it), report; every failure to isolate is
    reported as a setup_error, never ignored."""
    os.set_inheritable(status_fd, False)  # init and the program's pre-exec code share it by fork; exec closes it
    try:
        with os.fdopen(config_fd, "rb") as f:
            config = json.loads(f.read())
        stdin_fd = _isolate(config)
        helper_pid = os.getpid()  # read before the fork: inside the new pid namespace our pid is not visible
        init = os.fork()
    except Exception as exc:
        _report(status_fd, setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(1)
    if init == 0:
        _init_main(config, stdin_fd, status_fd, SANDBOX_UID_BASE + helper_pid)
    _report(status_fd, done=True, timed_out=_wait_for(init, config["timeout_s"]))


def _report(fd: int, **fields) -> None:
    os.write(fd, (json.dumps(fields) + "\n").encode())  # one write below PIPE_BUF: lines never interleave


def _isolate(config: dict) -> int:
    """New namespaces and the program's view of the filesystem, in this order; returns an fd holding its stdin."""
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    # mount, network, pid (for our next child), SysV IPC and hostname namespaces of our own; not root, inside a new
    # user namespace, which is what lets an unprivileged process create the others
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root else CLONE_NEWUSER)
    _check(_libc.unshare(flags), "unshare (new namespaces)")
    if not root:
        _map_own_ids(uid, gid)
    # nothing mounted from here on propagates back to the machine's mount namespace
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep = {path: os.open(path, os.O_PATH) for path in config["keep"]}  # opened before anything hides them
    for path in config["hide"]:
        _hide(path, keep)
    # every mount read-only and nosuid, recursively (mount_setattr does it atomically; remounting one by one races)
    _mount_setattr_recursive("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    # the only writable places: fresh, size-capped tmpfs mounts of this sandbox alone
    for path in (SCRATCH, "/dev/shm"):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['scratch_mb']}m,mode=1777")
    Path(SCRATCH, PROGRAM).write_text(config["source"], encoding="utf-8")
    stdin_fd = os.memfd_create("stdin")  # the program's fd 0 (dup2 clears close-on-exec), read from the start
    os.write(stdin_fd, config["stdin"].encode())
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    return stdin_fd


def _map_own_ids(uid: int, gid: int) -> None:
    """Map only our own uid and gid into the new user namespace (all an unprivileged process may map). We hold every
    capability in it until exec: enough to mount; the program, whose uid there is not 0, loses them at its exec."""
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")


def _hide(path: str, keep: dict[str, int]) -> None:
    """An empty tmpfs over `path` hides what it holds (it becomes read-only with everything else); the kept
    directories under it (the interpreter) are bound back at their own paths."""
    if not os.path.isdir(path):
        return  # under a directory hidden before it, and not bound back: already hidden
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for kept, fd in keep.items():
        if _is_under(kept, path):
            os.makedirs(kept, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", kept, None, MS_BIND | MS_REC)


def _init_main(config: dict, stdin_fd: int, status_fd: int, sandbox_uid: int) -> None:
    """Pid 1 of the sandbox's pid namespace: the program's parent, the reaper of its orphans, and the process whose
    death makes the kernel kill everything left in the namespace."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the helper killed alone takes the sandbox with it
        # a /proc of this namespace: the machine's processes (and their environments) are not even visible
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        program = os.fork()
    except Exception as exc:
        _report(status_fd, setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(1)
    if program == 0:
        _exec_program(config, stdin_fd, status_fd, sandbox_uid)
    while True:  # reap every orphan re-parented to us until the program itself ends
        pid, wait_status = os.wait()
        if pid == program:
            _report(status_fd, wait_status=wait_status)
            os._exit(0)


def _exec_program(config: dict, stdin_fd: int, status_fd: int, sandbox_uid: int) -> None:
    """Limits, an unprivileged identity, then exec the program; a failure before exec is a setup_error."""
    try:
        os.setsid()  # its own session and process group
        os.dup2(stdin_fd, 0)
        limits = {resource.RLIMIT_AS: config["memory_mb"] << 20, resource.RLIMIT_NPROC: config["max_processes"],
                  resource.RLIMIT_CPU: config["cpu_s"], resource.RLIMIT_FSIZE: config["scratch_mb"] << 20,
                  resource.RLIMIT_NOFILE: OPEN_FILES, resource.RLIMIT_CORE: 0}
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))  # soft = hard: without privilege it cannot raise them
        if os.geteuid() == 0:
            # root: a uid of its own, so RLIMIT_NPROC (which root bypasses) counts this sandbox's processes only
            os.setgroups([])
            os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
            os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability can give privilege back
        os.chdir(SCRATCH)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": SCRATCH, "TMPDIR": SCRATCH, "LANG": "C.UTF-8"}
        os.execve(config["python"], [config["python"], "-I", PROGRAM], env)
    except Exception as exc:
        _report(status_fd, setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(127)


def _wait_for(init: int, timeout_s: float) -> bool:
    """Wait for init up to `timeout_s`, then SIGKILL it; True if it timed out. Init exits only once the kernel has
    killed every other process of its namespace, so the whole tree is gone when this returns."""
    pidfd = os.pidfd_open(init)
    timed_out = not select.select([pidfd], [], [], timeout_s)[0]
    if timed_out:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.waitpid(init, 0)
    return timed_out


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: s.encode() if s is not None else None
    _check(_libc.mount(encode(source), target.encode(), encode(fstype), flags, encode(data)), f"mount {target}")


def _mount_setattr_recursive(path: str, attr_set: int) -> None:
    attr = _MountAttr(attr_set=attr_set)
    result = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(path.encode()),
                           ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(result, f"mount_setattr {path} read-only")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl {option}")
