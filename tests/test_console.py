"""What a user sees: our lines on the console, the libraries' output (this process, C code, child processes) in the
stage's log file in its output directory; `--verbose` shows everything; errors keep their one-line form."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, run_stage, stage_env

CAPTURE_DEMO = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from alignment import console

    console.capture("demo")
    print("library print")
    logging.getLogger("some.library").info("library info")
    warnings.warn("library warning")
    os.write(2, b"c-level write\\n")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    console.say("our line")
    temporary = console.log_path()
    console.keep_log_in(sys.argv[1])
    assert not os.path.exists(temporary)  # moved, not copied
    print("after the move", flush=True)
    console.say(console.closing_line())
""")


def test_capture_sends_library_output_to_the_log_and_our_lines_to_the_console(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", CAPTURE_DEMO, str(out)], cwd=REPO, env=stage_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = out / "demo.log"
    assert proc.stdout.splitlines() == ["our line", f"library output: {log} (1 warning lines)"]
    assert proc.stderr == ""
    text = log.read_text()
    expected = ["library print", "UserWarning: library warning", "c-level write", "child process", "after the move"]
    assert [line for line in expected if line in text] == expected, text


def _eval_args(tiny, out: Path, *extra: str) -> list[str]:
    return [f"policies=[{{path: {tiny.base}, name: base}}]", f"prompts.path={tiny.eval_prompts}", "prompts.num_prompts=4",
            "scorers=[]", "reference=base", "perplexity=null", "rollout.engine=hf", "sampling.max_new_tokens=8", f"output_dir={out}", *extra]


def test_a_stage_prints_only_its_own_lines_and_logs_the_rest(tiny_paths, tmp_path):
    out = tmp_path / "quiet"
    proc = run_stage("eval", REPO / "recipes/tiny/eval.yaml", _eval_args(tiny_paths, out))
    assert proc.stdout.splitlines()[0].startswith("eval: 1 policies x 4 prompts") and "eval done in" in proc.stdout
    assert "Loading weights" not in proc.stdout + proc.stderr and "INFO" not in proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"library output: {out / 'eval.log'}"
    assert "Loading weights" in (out / "eval.log").read_text()  # transformers' bar, from this process

    loud = tmp_path / "verbose"
    proc = run_stage("eval", REPO / "recipes/tiny/eval.yaml", [*_eval_args(tiny_paths, loud), "--verbose"])
    assert "Loading weights" in proc.stdout + proc.stderr and not (loud / "eval.log").exists()


def test_errors_keep_their_one_line_form_and_a_crash_names_its_log(tiny_paths, tmp_path):
    out = tmp_path / "bad"
    proc = run_stage("eval", REPO / "recipes/tiny/eval.yaml", [*_eval_args(tiny_paths, out), "prompts.path=nowhere.jsonl"],
                     check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: {REPO / 'recipes/tiny/eval.yaml'}: prompts.path: path "
                                                                 "'nowhere.jsonl' does not exist"]

    broken = tmp_path / "broken_reward.py"
    broken.write_text("def gold(prompts, completions, **columns):\n    raise RuntimeError('the reward server is down')\n")
    out = tmp_path / "crash"
    proc = run_stage("eval", REPO / "recipes/tiny/eval.yaml", [*_eval_args(tiny_paths, out), f"gold_metric={broken}:gold"],
                     check=False)
    log = out / "eval.log"
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: RuntimeError: the reward server is down (traceback in {log})"]
    assert "Traceback (most recent call last)" in log.read_text() and "Traceback" not in proc.stdout


@pytest.mark.e2e
def test_the_tiny_pipeline_stages_print_a_few_lines_of_their_own(tiny_sft, tiny_rm, tiny_dpo):
    """The tiny SFT, RM and DPO runs of this session (the real CLI): a couple of dozen lines each on the console,
    nothing at the libraries' INFO level there, the libraries' output in each run's log."""
    for run, stage in ((tiny_sft, "sft"), (tiny_rm, "rm"), (tiny_dpo, "dpo")):
        lines = run.log.splitlines()
        assert len(lines) <= 25, (stage, run.log)
        assert not [line for line in lines if "INFO" in line or "Warning:" in line or "Loading weights" in line], run.log
        assert lines[-1].startswith(f"library output: {run.dir / f'{stage}.log'}")
        assert "Loading weights" in (run.dir / f"{stage}.log").read_text()
