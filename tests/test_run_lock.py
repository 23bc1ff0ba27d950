"""One run per output directory: a second run there stops with the holder's name; a killed run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from alignment.cli import main
from alignment.errors import UserError
from alignment.run_lock import lock_output_dir, unlock_output_dir
from conftest import REPO, stage_env, tiny_sft_overrides

HOLD = "import sys, time; from alignment.run_lock import lock_output_dir; lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)"


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run, as a running stage would."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_second_run_stops_naming_the_holder_and_a_dead_holders_lock_is_taken_over(holder):
    out, proc = holder
    with pytest.raises(UserError, match=rf"output.dir '.*run' is in use by another run \(.*\"pid\": {proc.pid}"):
        lock_output_dir(out)
    os.kill(proc.pid, signal.SIGKILL)  # a killed run leaves its .lock file behind, but no lock
    proc.wait()
    lock_output_dir(out)
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    lock_output_dir(out)  # this process already holds it: no-op
    unlock_output_dir(out)


def test_stage_on_a_directory_in_use_stops_before_touching_it(holder, tiny_paths, capsys):
    out, proc = holder
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(["sft", str(REPO / "recipes/tiny/sft.yaml"), *tiny_sft_overrides(tiny_paths, out), "gold_eval=null"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(err) == 1 and f'"pid": {proc.pid}' in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
