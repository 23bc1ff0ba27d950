"""Memory settings of PPO's DeepSpeed models, in 2 real ZeRO-3 processes (gloo) where they can run on a CPU, and on
the config DeepSpeed is given where only a GPU would run them:

- with zero3_init_flag the models are built already partitioned (no rank holds a whole model), and what the
  trainer then syncs and exports is exactly the checkpoint (tied embeddings and biases included);
- the reward model is sharded like the reference and scores exactly as an unsharded copy;
- only small parameters (norms, biases: up to 10 x hidden size) stay whole on every rank;
- in bf16 / fp16 on GPUs, ZeRO accumulates gradients in fp32 and partitions in the model's dtype;
- accelerate settings that PPO does not use are named.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from alignment.training import ZeroSettings, engine_config, ignored_accelerate_settings
from helpers_models import save_family_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 2 + 3?", "Say hello.", "Count to three."]
ANSWERS = [" 5", " hello", " one two three"]


def _worker(rank: int, port: int, policy_dir: str, rm_dir: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    sys.path.insert(0, str(REPO))
    import deepspeed

    from alignment.config.sections import ModelSection
    from alignment.models import load_causal_lm
    from alignment.training import make_inference_model, make_train_engine, zero3_init
    from reward.scoring import RewardModelScorer
    from rollout.weight_sync import named_tensors

    deepspeed.init_distributed(dist_backend="gloo")
    zero = ZeroSettings(stage=3, init=True)
    with zero3_init(zero, torch.float32):
        model = load_causal_lm(ModelSection(name_or_path=policy_dir))
        scorer = RewardModelScorer(rm_dir, place=lambda m: make_inference_model(m, zero))
    # Built partitioned: every parameter's local data is empty, each rank holds about half of the elements.
    built_whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id") or p.data.numel() > 0]
    local_share = sum(p.ds_tensor.numel() for p in model.parameters()) / sum(p.ds_numel for p in model.parameters())
    rm_sharded = all(hasattr(p, "ds_id") for p in scorer.model.parameters())
    engine = make_train_engine(model, zero, lr=1e-3, weight_decay=0.0, warmup_steps=0, micro_batch_size=1,
                               grad_accum_steps=1, max_grad_norm=1.0)
    persistent = sorted(n for n, p in engine.module.named_parameters() if p.ds_persist)
    tensors = {n: t.clone() for n, t in named_tensors(engine)}
    scores = scorer.score(PROMPTS, ANSWERS)
    torch.save({"built_whole": built_whole, "local_share": local_share, "rm_sharded": rm_sharded,
                "persistent": persistent, "tensors": tensors, "scores": scores}, Path(result_dir) / f"rank{rank}.pt")


@pytest.mark.e2e
def test_zero3_init_builds_sharded_models_that_sync_and_score_exactly(tiny_paths, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from reward.scoring import RewardModelScorer

    policy_dir = save_family_model("qwen2", tmp_path / "policy", tiny_paths.base)  # tied embeddings, q/k/v biases
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    rm.config.pad_token_id = rm.config.eos_token_id
    rm.save_pretrained(tmp_path / "rm")
    (tmp_path / "rm").joinpath("tokenizer.json").write_bytes((policy_dir / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (policy_dir / name).exists():
            (tmp_path / "rm" / name).write_bytes((policy_dir / name).read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(policy_dir), str(tmp_path / "rm"), str(tmp_path)), nprocs=2,
                       start_method="spawn")

    expected = dict(AutoModelForCausalLM.from_pretrained(policy_dir).named_parameters())
    expected_scores = RewardModelScorer(tmp_path / "rm").score(PROMPTS, ANSWERS)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["built_whole"] == [], f"rank {rank} built these whole: {got['built_whole']}"
        assert got["local_share"] == pytest.approx(0.5, abs=0.02)
        assert got["rm_sharded"]
        # norms and biases (1-D, <= 10 x hidden 128) stay whole; every weight matrix is sharded
        assert got["persistent"] == sorted(n for n, p in expected.items() if p.dim() == 1)
        torch.testing.assert_close(got["scores"], expected_scores, rtol=0, atol=1e-5)
    synced = torch.load(tmp_path / "rank0.pt", weights_only=False)["tensors"]
    assert sorted(synced) == sorted(n for n in expected if n != "lm_head.weight"), "tied lm_head is the embedding"
    for name, tensor in synced.items():
        assert torch.equal(tensor, expected[name].detach()), name


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_engine_config_accumulates_gradients_in_fp32_and_partitions_in_the_model_dtype(stage, dtype):
    config = engine_config(ZeroSettings(stage=stage), dtype, on_gpu=True, hidden_size=4096, micro_batch_size=2,
                           grad_accum_steps=4, world=8, max_grad_norm=1.0)
    assert config["bf16"]["enabled"] == (dtype == torch.bfloat16) and config["fp16"]["enabled"] == (dtype == torch.float16)
    fp32_accumulation = config.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    assert fp32_accumulation == (dtype != torch.float32 and stage >= 1)  # stage 0 has no fp32 buffer in DeepSpeed
    zero = config["zero_optimization"]
    assert zero.get("stage3_param_persistence_threshold") == (40960 if stage == 3 else None)
    assert config["train_batch_size"] == 2 * 4 * 8
    cpu = engine_config(ZeroSettings(stage=stage), dtype, on_gpu=False, hidden_size=64, micro_batch_size=1,
                        grad_accum_steps=1, world=1, max_grad_norm=1.0)
    assert "bf16" not in cpu and "data_types" not in cpu  # DeepSpeed on CPU trains in float32


def test_accelerate_settings_ppo_does_not_use_are_named(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    ignored = ignored_accelerate_settings("float32")
    assert [w.split("=")[0] for w in ignored] == ["mixed_precision", "gradient_accumulation_steps", "gradient_clipping",
                                                  "offload_param_device"]
    assert "policy.dtype" in ignored[0] and "bfloat16" in ignored[0]
    assert ignored_accelerate_settings("bfloat16")[0].startswith("gradient_accumulation_steps")
    for name in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert ignored_accelerate_settings("float32") == []
