"""The memory plan: hand-checked per-model arithmetic, the 7B recipe family planned from config.json alone (a hub
cache holding only Qwen2.5-7B's config, offline), and the plan a real stage prints against its measured peak."""

from __future__ import annotations

import os
import re
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
    # ZeRO-3: a gradient reduce bucket of hidden^2 elements in the communication dtype on every rank
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(3))) == {
        "weights": (2 * n // 8, 0), "gradients": (4 * n // 8, 0), "AdamW states": (12 * n // 8, 0),
        "ZeRO-3 gradient reduce bucket": (2 * 4 * 2**20, 0)}  # hidden^2 = 2048^2, also the 4M floor
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(2))) == {
        "weights": (2 * n, 0), "gradients": (4 * n // 8, 0), "AdamW states": (12 * n // 8, 0)}
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(1))) == {
        "weights": (2 * n, 0), "gradients": (4 * n, 0), "AdamW states": (12 * n // 8, 0)}
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(0))) == {  # stage 0 accumulates in bf16
        "weights": (2 * n, 0), "gradients": (2 * n, 0), "AdamW states": (12 * n, 0)}
    # float32 on one CPU process: weights, gradients, two moments
    assert _bytes(trained_model("policy", SHAPE, "float32", _launch(0, world=1, on_gpu=False))) == {
        "weights": (4 * n, 0), "gradients": (4 * n, 0), "AdamW states": (8 * n, 0)}
    # ZeRO-3 keeps an fp32 master partition of fp32 weights too (a clone, not a view: measured)
    assert _bytes(trained_model("policy", SHAPE, "float32", _launch(3, world=2, on_gpu=False)))["AdamW states"] == (6 * n, 0)
    # an offloaded optimizer keeps gradients and states in host memory
    assert _bytes(trained_model("policy", SHAPE, "bfloat16", _launch(3, offload=True))) == {
        "weights": (2 * n // 8, 0), "gradients": (0, 4 * n // 8), "AdamW states": (0, 12 * n // 8),
        "ZeRO-3 gradient reduce bucket": (2 * 2048 * 2048, 0)}


def test_activations_shrink_to_layer_inputs_with_gradient_checkpointing():
    tokens, h, i, L = 1000, SHAPE.hidden, SHAPE.intermediate, SHAPE.layers
    full = activation_bytes(SHAPE, tokens, "bfloat16", checkpointing=False)
    assert full == 2 * L * tokens * (6 * h + 4 * i)
    # logits (and their gradient) of the answer's 300 positions only, as PPO's forward computes them
    checkpointed = activation_bytes(SHAPE, tokens, "bfloat16", checkpointing=True, logit_tokens=300)
    assert checkpointed == 2 * (L * tokens * h + tokens * (6 * h + 4 * i) + 2 * 300 * SHAPE.vocab)


def test_the_total_is_the_resident_lines_and_the_largest_phase():
    from alignment.memory_plan import MemoryPlan, PlanLine, optimizer_step_temporaries

    plan = MemoryPlan("t", _launch(3), [PlanLine("weights", 10 * GiB), PlanLine("activations", 6 * GiB, phase="train"),
                                        PlanLine("gathered", 1 * GiB, phase="train"), PlanLine("temporaries", 5 * GiB,
                                                                                             phase="optimizer step")])
    assert plan.per_rank == 17 * GiB and plan.peak_phase == "train"
    assert "<- peak" in plan.render().splitlines()[4]
    # ZeRO-3 steps sub-groups of at most 1e9 elements: a flattened fp32 gradient + foreach AdamW's sqrt (GPU)
    big = ModelShape(params=12_000_000_000, hidden=4096, layers=32, intermediate=11008, vocab=32000, largest_module=1)
    assert optimizer_step_temporaries(big, _launch(3, world=8)).device == 8 * 1_000_000_000
    assert optimizer_step_temporaries(SHAPE, _launch(3, world=8)).device == 8 * SHAPE.params // 8


def _offline_hub_with_qwen_7b_config(root) -> dict:
    """An HF cache holding only Qwen/Qwen2.5-7B's config.json, read offline (what the real hub would serve)."""
    snapshot = root / "hub" / "models--Qwen--Qwen2.5-7B" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((REPO / "tests/data/qwen2.5-7b/config.json").read_text())
    (root / "hub" / "models--Qwen--Qwen2.5-7B" / "refs").mkdir()
    (root / "hub" / "models--Qwen--Qwen2.5-7B" / "refs" / "main").write_text("0")
    return stage_env(HF_HOME=str(root), HF_HUB_OFFLINE="1")


@pytest.mark.parametrize("layout, per_rank_gib", [("gpu6_zero3", 55.63), ("multinode_ppo_zero3", 32.83)])
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
    assert re.search(rf"total per rank +{per_rank_gib:.2f} GiB", ppo), ppo
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


def test_zero3_lines_are_what_a_real_zero3_engine_allocates(tiny_paths, monkeypatch):
    """The plan's ZeRO-3 lines against the buffers of a real DeepSpeed ZeRO-3 engine built as PPO builds its policy
    (CPU, a world of 1, fp32): the reduce bucket (hidden^2 elements, set by our engine config), the gradient
    partition, the AdamW states (fp32 master copy + two moments: 12 bytes per parameter even for fp32 weights), and the
    optimizer's sub-groups, which size the step temporaries (a small sub_group_size here to see them split)."""
    import torch

    import alignment.memory_plan as memory_plan
    import alignment.training as training
    from alignment.config.sections import ModelSection
    from alignment.memory_plan import model_shape, optimizer_step_temporaries
    from alignment.models import load_causal_lm

    monkeypatch.setattr(memory_plan, "ZERO3_SUB_GROUP_ELEMENTS", 100_000)
    monkeypatch.setattr(training, "ZERO3_SUB_GROUP_ELEMENTS", 100_000)
    training.init_distributed()
    engine = training.make_train_engine(load_causal_lm(ModelSection(name_or_path=str(tiny_paths.base))),
                                        training.ZeroSettings(stage=3), lr=1e-3, weight_decay=0.0, warmup_steps=0,
                                        micro_batch_size=2, grad_accum_steps=1, max_grad_norm=1.0)
    ids = torch.randint(0, 50, (2, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss, scale_wrt_gas=False)
    engine.step()
    optimizer = engine.optimizer

    shape = model_shape(str(tiny_paths.base))
    launch = Launch(1, 1, 3, False, False, False, 24 * GiB, "host memory")
    planned = {line.what.split(": ")[1]: line.device for line in trained_model("policy", shape, "float32", launch)}
    buckets = sum(b.buffer.numel() * b.buffer.element_size() for b in optimizer.ipg_buckets.values())
    assert planned["ZeRO-3 gradient reduce bucket"] == buckets == 4 * 2**20 * 4  # hidden^2 is below the 4M floor
    assert planned["gradients"] == optimizer.grad_partitions_flat_buffer.numel() * 4
    states = sum(t.numel() * t.element_size() for t in optimizer.fp32_partitioned_groups_flat)
    states += sum(v.numel() * v.element_size() for s in optimizer.optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    assert planned["AdamW states"] == states == 12 * shape.params
    groups = [t.numel() for t in optimizer.fp32_partitioned_groups_flat]
    assert len(groups) > 1 and max(groups) - 100_000 <= shape.largest_module  # greedy: a group closes past the size
    temporaries = optimizer_step_temporaries(shape, launch)
    assert temporaries.device == 12 * min(shape.params, 100_000) and temporaries.phase == "optimizer step"
