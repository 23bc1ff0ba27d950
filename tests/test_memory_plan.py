"""The memory plan: hand-checked per-model arithmetic, the 7B recipe family planned from config.json alone (a hub
cache holding only Qwen2.5-7B's config, offline), and the plan a real stage prints against its measured peak."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alignment.memory_plan import GiB, Launch, ModelShape, activation_bytes, trained_model
from conftest import REPO, stage_env

SHAPE = ModelShape(params=1_000_000_000, hidden=2048, layers=16, intermediate=8192, vocab=32000, largest_module=65_536_000)


def _launch(stage: int, world: int = 8, on_gpu: bool = True, offload: bool = False) -> Launch:
    return Launch(world, world, stage, offload, False, on_gpu, 80 * GiB, "test GPU")


def _bytes(lines) -> dict[str, tuple[int, int]]:
    return {line.what.split(": ")[1].split(" (")[0]: (line.device, line.host) for line in lines}


def test_trained_model_memory_follows_the_zero_stage():
    n = SHAPE.params
    # bf16 on GPUs: fp32 gradient accumulation under ZeRO >= 1; AdamW keeps 2 fp32 moments + an fp32 master copy
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(3))) == {
        "weights": (2 * n // 8, 0), "gradients": (4 * n // 8, 0), "AdamW states": (12 * n // 8, 0)}
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(2))) == {
        "weights": (2 * n, 0), "gradients": (4 * n // 8, 0), "AdamW states": (12 * n // 8, 0)}
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(1))) == {
        "weights": (2 * n, 0), "gradients": (4 * n, 0), "AdamW states": (12 * n // 8, 0)}
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(0))) == {  # stage 0 accumulates in bf16
        "weights": (2 * n, 0), "gradients": (2 * n, 0), "AdamW states": (12 * n, 0)}
    # float32 on one CPU process: weights, gradients, two moments
    assert _bytes(trained_model("policy", SHAPE, "float32", _launch(0, world=1, on_gpu=False))) == {
        "weights": (4 * n, 0), "gradients": (4 * n, 0), "AdamW states": (8 * n, 0)}
    # an offloaded optimizer keeps gradients and states in host memory
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(3, offload=True))) == {
        "weights": (2 * n // 8, 0), "gradients": (0, 4 * n // 8), "AdamW states": (0, 12 * n // 8)}


def test_activations_shrink_to_layer_inputs_with_gradient_checkpointing():
    tokens, h, i, L = 1000, SHAPE.hidden, SHAPE.intermediate, SHAPE.layers
    full = activation_bytes(SHAPE, tokens, "bfloat16", checkpointing=False, logits=False)
    assert full == 2 * L * tokens * (6 * h + 4 * i)
    checkpointed = activation_bytes(SHAPE, tokens, "bfloat16", checkpointing=True, logits=True)
    assert checkpointed == 2 * (L * tokens * h + tokens * (6 * h + 4 * i) + 2 * tokens * SHAPE.vocab)


def _offline_hub_with_qwen_7b_config(root) -> dict:
    """An HF cache holding only Qwen/Qwen2.5-7B's config.json, read offline (what the real hub would serve)."""
    snapshot = root / "hub" / "models--Qwen--Qwen2.5-7B" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((REPO / "tests/data/qwen2.5-7b/config.json").read_text())
    (root / "hub" / "models--Qwen--Qwen2.5-7B" / "refs").mkdir()
    (root / "hub" / "models--Qwen--Qwen2.5-7B" / "refs" / "main").write_text("0")
    return stage_env(HF_HOME=str(root), HF_HUB_OFFLINE="1")


@pytest.mark.parametrize("layout, per_rank_gib", [("gpu6_zero3", 61.51), ("multinode_ppo_zero3", 36.35)])
def test_the_7b_family_fits_80gb_gpus_by_its_plan(tmp_path, layout, per_rank_gib):
    """SFT -> RM -> PPO as shipped: the chained paths (outputs/qwen2.5-7b/{sft,rm}/final, not trained here) are
    planned from the recipe that writes them, back to the hub id; the PPO recipe's comment quotes this plan."""
    recipes = [str(REPO / "recipes/qwen2.5-7b" / f"{name}.yaml") for name in ("sft", "rm", "ppo")]
    proc = subprocess.run([sys.executable, "-m", "alignment", "validate", *recipes, "--no-path-check", "--memory",
                           "--accelerate-config", str(REPO / "recipes/accelerate" / f"{layout}.yaml"), "--gpu-gib", "80"],
                          cwd=REPO, env=_offline_hub_with_qwen_7b_config(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("  fits: ") == 3 and "DOES NOT FIT" not in out and "not planned" not in out, out
    assert "policy: weights (bfloat16)" in out and "7.62B params" in out
    assert "reward model 0: weights (bfloat16)" in out and "7.07B params, frozen" in out  # 1-output head, no LM head
    ppo = out[out.index("memory plan: PPO"):]
    assert f"total per rank                                  {per_rank_gib:.2f} GiB" in ppo, ppo
    if layout == "gpu6_zero3":
        assert f"{per_rank_gib:.1f} GiB of 80" in (REPO / "recipes/qwen2.5-7b/ppo.yaml").read_text()


def test_the_plan_is_printed_at_stage_start_and_close_to_the_measured_peak(tiny_sft):
    assert "memory plan: SFT" in tiny_sft.log and "fits: " in tiny_sft.log
    memory = tiny_sft.summary["memory_gib"]
    assert 0.6 < memory["planned_per_rank"] / memory["peak_rank0"] < 1.4, memory


def test_a_missing_model_config_is_named_not_fatal(tmp_path, tiny_paths):
    proc = subprocess.run([sys.executable, "-m", "alignment", "validate", str(REPO / "recipes/qwen2.5-1.5b/sft.yaml"),
                           "--no-path-check", "--memory"], cwd=REPO, env=stage_env(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not planned: model 'Qwen/Qwen2.5-1.5B'" in proc.stdout
    assert os.linesep + "Traceback" not in proc.stdout + proc.stderr
