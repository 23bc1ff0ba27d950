"""SFT stage through the real CLI: learning, export, resume after SIGKILL, LoRA round trip, ZeRO 2-process runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, even_eval_split, run_stage, stage_env, tiny_sft_overrides

RECIPE = REPO / "recipes/tiny/sft.yaml"


def _no_gold(overrides: list[str]) -> list[str]:
    """Skip the gold evaluation (tests that do not look at it save ~10 s)."""
    return [o for o in overrides if not o.startswith("gold_eval")] + ["gold_eval=null"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _probe_examples(out: Path) -> tuple[list[dict], list[float]]:
    probe = json.loads((out / "probe.json").read_text())
    labels = probe["labels"] or [None] * len(probe["input_ids"])
    return [{"input_ids": i, "labels": lab} for i, lab in zip(probe["input_ids"], labels)], probe["nll"]


def _reloaded_nll(model_dir: Path, examples: list[dict]) -> list[float]:
    from transformers import AutoModelForCausalLM

    from alignment.stages.sft import completion_nll

    return completion_nll(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), examples)


def test_sft_lowers_eval_loss_and_raises_gold(tiny_sft):
    s = tiny_sft.summary
    print(f"\neval loss {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}; gold {s['gold_before']:.4f} -> {s['gold_after']:.4f}")
    assert s["eval_loss_after"] < s["eval_loss_before"] - 2.0  # ~4.58 -> ~1.18
    assert s["gold_after"] > s["gold_before"] + 0.1  # ~0.08 -> ~0.29 (the demonstrations' level, 0.28)
    assert s["resumed_from"] is None and s["steps"] > 0
    # the same figures are in metrics.jsonl, with the train curve
    rows = _metrics(tiny_sft.dir)
    assert any("train/loss" in r for r in rows) and any("eval/loss" in r for r in rows)
    assert [r["gold/mean"] for r in rows if "gold/mean" in r] == pytest.approx([s["gold_before"], s["gold_after"]])
    assert any(p.name.startswith("events.out.tfevents") for p in (tiny_sft.dir / "tensorboard").iterdir())
    resolved = yaml.safe_load((tiny_sft.dir / "recipe.yaml").read_text())
    assert resolved["stage"] == "sft" and resolved["train"]["learning_rate"] == 3e-3


def test_sft_export_is_plain_hf_safetensors(tiny_sft):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_sft.final.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_sft.final))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_sft.final))
    examples, nll = _probe_examples(tiny_sft.dir)
    assert _reloaded_nll(tiny_sft.final, examples) == pytest.approx(nll, abs=1e-5)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "review my lamp"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).startswith("the ")


def test_sft_checkpoints_are_complete_and_pruned(tiny_sft):
    checkpoints = sorted((tiny_sft.dir / "checkpoints").iterdir())
    assert 1 <= len(checkpoints) <= 2  # save_total_limit: 2
    for ckpt in checkpoints:
        assert {"model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"} <= {p.name for p in ckpt.iterdir()}
    assert not (tiny_sft.dir / ".staging").exists() or not any((tiny_sft.dir / ".staging").iterdir())


def test_sft_resumes_after_sigkill(tiny_paths, tmp_path):
    """Kill -9 mid-run, run the same command again: it resumes from the last complete checkpoint."""
    out = tmp_path / "run"
    overrides = _no_gold(tiny_sft_overrides(tiny_paths, out)) + [
        "train.max_steps=120", "train.per_device_batch_size=16", "output.save_steps=20", "output.logging_steps=5"]
    cmd = [sys.executable, "-m", "alignment", "sft", str(RECIPE), *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "checkpoint-40").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint-40 after 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    logged_before = max(r["step"] for r in _metrics(out))
    # a checkpoint a crash left half-written in the staging area must never be picked
    (out / ".staging" / "checkpoint-999").mkdir(parents=True, exist_ok=True)
    (out / ".staging" / "checkpoint-999" / "model.safetensors").write_bytes(b"garbage")

    second = run_stage("sft", RECIPE, overrides)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{killed_at}"), summary["resumed_from"]
    assert summary["steps"] == 120
    assert not (out / ".staging" / "checkpoint-999").exists()
    rows = [r for r in _metrics(out) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "metrics.jsonl steps must continue without repeats"
    assert steps[0] == 1 and steps[-1] == 120 and killed_at < 120
    resumed = [r for r in rows if r["step"] > killed_at]
    assert resumed and resumed[0]["train/loss"] < rows[0]["train/loss"] - 1.0, "loss restarted from scratch"
    print(f"\nkilled after step {logged_before} (last checkpoint {killed_at}); resumed and finished at 120", second.returncode)


def test_sft_lora_roundtrip(tiny_paths, tmp_path):
    """LoRA SFT: adapter saved, reloaded on the base, merged into final/; all give the trained model's losses."""
    from transformers import AutoModelForCausalLM

    from alignment.stages.common import merge_adapter
    from alignment.stages.sft import completion_nll

    out = tmp_path / "lora"
    overrides = _no_gold(tiny_sft_overrides(tiny_paths, out)) + ["train.max_steps=20", "model.lora={r: 8, alpha: 16, dropout: 0.0}"]
    run_stage("sft", RECIPE, overrides)
    examples, nll = _probe_examples(out)
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "final" / "adapter_config.json").exists()
    from_adapter = completion_nll(merge_adapter(out / "adapter", AutoModelForCausalLM), examples)
    from_merged = _reloaded_nll(out / "final", examples)
    assert from_adapter == pytest.approx(nll, abs=1e-5)
    assert from_merged == pytest.approx(nll, abs=1e-5)
    base = completion_nll(AutoModelForCausalLM.from_pretrained(str(tiny_paths.base)), examples)
    assert sum(base) > sum(nll) + 0.1 * len(nll)  # the adapter changed the model


def test_sft_recipe_errors_are_one_line(tiny_paths, tmp_path):
    proc = run_stage("sft", RECIPE, tiny_sft_overrides(tiny_paths, tmp_path / "x") + ["train.early_stopping_patience=2"], check=False)
    assert proc.returncode == 2
    assert "train.early_stopping_patience: needs train.eval_steps" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("zero", ["cpu_zero3", "cpu_zero2"])
def test_sft_deepspeed_two_processes(tiny_paths, tmp_path, zero):
    """2 CPU processes under DeepSpeed: ranks see different data; the export reloads in one process and
    reproduces the trained model's losses; the reported eval loss matches a single-process evaluation."""
    from alignment.cli import STAGES, load_stage_recipe
    from alignment.stages.sft import eval_loss

    out, record = tmp_path / "run", tmp_path / "batches"
    split = even_eval_split(tiny_paths.sft, tmp_path / "data", n_eval=128)  # 2 ranks x 2 full batches of 32
    overrides = _no_gold(tiny_sft_overrides(tiny_paths, out)) + split + ["train.max_steps=30", "output.save_steps=15"]
    run_stage("sft", RECIPE, overrides, accelerate_config=REPO / f"recipes/accelerate/{zero}.yaml",
              env=stage_env(ALIGNMENT_RECORD_BATCHES=str(record)))
    seen = [{json.loads(line)["hash"] for line in (record / f"rank{r}.jsonl").read_text().splitlines()} for r in (0, 1)]
    assert len(seen[0]) >= 30 * 32 * 0.9 and len(seen[1]) >= 30 * 32 * 0.9
    assert not seen[0] & seen[1], "both ranks were fed the same examples"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30
    examples, nll = _probe_examples(out)
    assert _reloaded_nll(out / "final", examples) == pytest.approx(nll, abs=1e-5)
    recipe = load_stage_recipe(STAGES["sft"], RECIPE, overrides)
    single = eval_loss(out / "final", recipe)
    # same weights and, with full eval batches on both ranks, the same batches averaged
    assert single == pytest.approx(summary["eval_loss_after"], abs=1e-5)
    assert {"model.safetensors", "config.json"} <= {p.name for p in (out / "final").iterdir()}
