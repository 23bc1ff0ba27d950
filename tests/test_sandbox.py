"""The code sandbox and the unit-test reward: no network, no writes outside scratch, none of the run's files, no
process outliving its timeout, and a misbehaving program is a 0.0 reward, never an exception."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO

from alignment.errors import DataError
from reward import sandbox
from reward.code import extract_code, unit_test_reward
from reward.sandbox import SandboxUnavailable, run_many, run_many_async, run_sandboxed


def _report(result) -> dict:
    """The JSON line a probe program printed last."""
    assert result.ok, (result.reason, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def outside_tmp():
    """A directory outside /tmp (which the sandbox replaces by its scratch), open to all, so that hiding is what
    keeps its files unseen."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="sandbox-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_no_network_not_even_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_sandboxed(f"""
import fcntl, json, socket, struct
errors = {{}}
for host in ("127.0.0.1", "1.1.1.1"):
    try:
        socket.create_connection((host, {port} if host == "127.0.0.1" else 53), timeout=2).close()
        errors[host] = None
    except OSError as exc:
        errors[host] = type(exc).__name__
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
lo_flags = struct.unpack("H", fcntl.ioctl(s, 0x8913, struct.pack("256s", b"lo"))[16:18])[0]  # SIOCGIFFLAGS
print(json.dumps({{"errors": errors, "interfaces": [n for _, n in socket.if_nameindex()], "lo_up": lo_flags & 1}}))
""", timeout_s=10)
        server.settimeout(0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    report = _report(result)
    assert report["errors"]["127.0.0.1"] and report["errors"]["1.1.1.1"]
    assert report["interfaces"] == ["lo"] and report["lo_up"] == 0


def test_writes_only_in_scratch(tmp_path, outside_tmp):
    name = f"sandbox-probe-{uuid.uuid4().hex}"
    targets = {"tmp": f"/tmp/{name}", "tmp_path": str(tmp_path / name), "repo": str(REPO / name),
               "outside_tmp": str(outside_tmp / name), "usr": f"/usr/{name}"}
    result = run_sandboxed(f"""
import json, os
outcome = {{}}
for key, path in {targets!r}.items():
    try:
        with open(path, "w") as f:
            f.write("x")
        outcome[key] = "written"
    except OSError as exc:
        outcome[key] = type(exc).__name__
with open("scratch.txt", "w") as f:
    f.write("kept")
outcome["scratch"] = open("/tmp/scratch.txt").read()
outcome["where"] = [os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"]]
print(json.dumps(outcome))
""", timeout_s=10, hide=[outside_tmp])
    report = _report(result)
    for path in targets.values():
        assert not os.path.exists(path)  # nothing the program wrote reached the machine
    assert report["tmp"] == "written"  # into its own scratch /tmp, gone with the sandbox
    assert all(report[key] != "written" for key in ("tmp_path", "repo", "outside_tmp", "usr"))
    assert report["usr"] == "OSError"  # EROFS: the whole filesystem is read-only
    assert report["scratch"] == "kept" and report["where"] == ["/tmp", "/tmp", "/tmp"]


def test_the_runs_files_environment_and_processes_are_hidden(monkeypatch, outside_tmp):
    workdir, other = outside_tmp / "run", outside_tmp / "outputs"
    workdir.mkdir(), other.mkdir()
    (workdir / "secret.txt").write_text("token")
    (other / "checkpoint.bin").write_text("weights")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "leaked")
    result = run_sandboxed(f"""
import json, os
seen = {{}}
for path in ({str(workdir / "secret.txt")!r}, {str(other / "checkpoint.bin")!r}):
    try:
        seen[path] = open(path).read()
    except OSError as exc:
        seen[path] = type(exc).__name__
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
print(json.dumps({{"seen": seen, "listing": os.listdir({str(workdir)!r}) + os.listdir({str(other)!r}),
                  "env": sorted(os.environ), "pids": pids, "me": [os.getpid(), os.getuid()]}}))
""", timeout_s=10, hide=[other])
    report = _report(result)
    assert set(report["seen"].values()) == {"FileNotFoundError"} and report["listing"] == []
    assert report["env"] == ["HOME", "LANG", "PATH", "TMPDIR"]  # none of the caller's variables (conftest's secret)
    assert report["me"][0] == 2 and max(report["pids"]) <= 2  # its own pid namespace: init and itself
    assert report["me"][1] != 0


def test_an_infinite_loop_ends_at_its_timeout():
    result = run_sandboxed("while True:\n    pass\n", timeout_s=1.5)
    assert result.timed_out and not result.ok and result.exit_code is None
    assert 1.0 < result.elapsed_s < 1.5 + 3.0


def _marked_processes(marker: str) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        try:
            count += entry.name.isdigit() and marker.encode() in Path(entry.path, "cmdline").read_bytes()
        except OSError:
            pass  # ended meanwhile
    return count


def test_a_fork_bomb_is_contained_and_ended():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _marked_processes(marker))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # the marker rides in argv, which every forked copy inherits
        result = run_sandboxed(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {marker!r}])",
                               timeout_s=2, max_processes=16)
    finally:
        done.set()
        watcher.join()
    assert result.timed_out and result.elapsed_s < 2 + 3.0
    assert 1 < peak[0] <= 16  # it did fork, and no further than its process limit
    assert _marked_processes(marker) == 0  # and nothing of it survives


def test_memory_blowups_end_with_an_error():
    for program in ("x = bytearray(4 << 30)", "x = []\nwhile True:\n    x.append(bytearray(10 << 20))"):
        result = run_sandboxed(program, timeout_s=10, memory_mb=256)
        assert not result.timed_out and result.exit_code == 1 and "MemoryError" in result.stderr


def test_scratch_is_size_capped():
    result = run_sandboxed("""
try:
    with open("big", "wb") as f:
        f.write(bytes(16 << 20))
    print("written")
except OSError as exc:
    print(type(exc).__name__)
""", timeout_s=10, scratch_mb=4)
    assert result.ok and result.stdout.strip() == "OSError"


@pytest.mark.parametrize("program, exit_code, sig, stderr", [
    ("import sys\nsys.exit(3)", 3, None, ""),
    ("raise ValueError('boom')", 1, None, "ValueError: boom"),
    ("import ctypes\nctypes.string_at(0)", None, signal.SIGSEGV, ""),
    ("def f(:\n    pass", 1, None, "SyntaxError"),
])
def test_crashes_are_results(program, exit_code, sig, stderr):
    result = run_sandboxed(program, timeout_s=10)
    assert (result.exit_code, result.signal, result.timed_out) == (exit_code, sig, False)
    assert stderr in result.stderr and not result.ok
    assert unit_test_reward(["p"], [program], tests=["assert True"]) == [0.0]


def test_stdin_in_and_output_capped_to_its_tail():
    result = run_sandboxed("import sys\nprint('x' * 1_000_000)\nprint(sys.stdin.read().upper(), 'ü')",
                           stdin="héllo", timeout_s=10, output_bytes=1000)
    assert result.ok and len(result.stdout.encode()) == 1000 and result.stdout.endswith("HÉLLO ü\n")


def test_a_sandbox_that_cannot_be_set_up_raises_and_runs_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_interpreter", lambda: ("/nonexistent/python", []))
    with pytest.raises(SandboxUnavailable, match="cannot sandbox code here .*FileNotFoundError"):
        run_sandboxed("print('ran')", timeout_s=5)


def test_many_programs_run_at_once():
    program = "import sys, time\nstart = time.time()\ntime.sleep(0.3)\nprint(sys.stdin.read(), start, time.time())"
    stdins = [str(i) for i in range(10)]
    for results in (run_many([program] * 10, stdins=stdins, max_concurrent=5, timeout_s=10),
                    asyncio.run(run_many_async([program] * 10, stdins=stdins, max_concurrent=5, timeout_s=10))):
        spans = [r.stdout.split() for r in results]
        assert [s[0] for s in spans] == stdins  # each result belongs to its own program
        starts, ends = [float(s[1]) for s in spans], [float(s[2]) for s in spans]
        assert max(sum(a <= start < b for a, b in zip(starts, ends)) for start in starts) >= 2  # they overlapped


# ---------------------------------------------------------------- the reward

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


def test_unit_test_reward_scores_passing_programs_only(monkeypatch):
    monkeypatch.setenv("ALIGNMENT_CODE_TIMEOUT_S", "2")
    completions = [
        f"Here it is:\n```python\n{SOLUTION}```\nDone.",  # fenced
        SOLUTION,  # bare code
        [{"role": "assistant", "content": f"```py\n{SOLUTION}```"}],  # chat
        "```python\ndef add(a, b):\n    return a - b\n```",  # wrong
        "import sys\nsys.exit(0)",  # exits 0 before the asserts
        "import os\nos._exit(0)",
        "while True:\n    pass",  # times out
        "def add(a, b) return a + b",  # syntax error
    ]
    rewards = unit_test_reward(["p"] * len(completions), completions, tests=[TESTS] * len(completions))
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_unit_test_reward_tests_as_a_list_and_from_the_environment(monkeypatch):
    monkeypatch.setenv("ALIGNMENT_CODE_TIMEOUT_S", "1")
    slow = "import time\ntime.sleep(3)\n" + SOLUTION
    rewards = unit_test_reward(["p"] * 3, [SOLUTION, SOLUTION, slow],
                               tests=[TESTS.splitlines(), ["assert add(2, 2) == 5"], TESTS])
    assert rewards == [1.0, 0.0, 0.0]


def test_extract_code_takes_the_last_python_block():
    text = "First try:\n```python\nx = 1\n```\nBetter:\n```python\nx = 2\n```\n```bash\nls\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("x = 3") == "x = 3"


def test_unit_test_reward_needs_a_tests_column():
    with pytest.raises(DataError, match="'tests' column"):
        unit_test_reward(["p"], [SOLUTION])
