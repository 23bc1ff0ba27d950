"""Weight sync from a DeepSpeed ZeRO-3 model on 2 CPU processes (gloo): every rank gathers, rank 0 sends."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


class RecordingEngine:
    weight_version = 0

    def __init__(self):
        self.got: dict[str, torch.Tensor] = {}

    def update_weights(self, pairs, version):
        from rollout.types import SyncStats

        for name, tensor in pairs:
            self.got[name] = tensor.clone()
        self.weight_version = version
        return SyncStats(bytes=sum(t.nbytes for t in self.got.values()), seconds=0.0, tensors=len(self.got))


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    sys.path.insert(0, str(REPO))
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollout.weight_sync import is_zero3, sync_weights

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    engine, *_ = deepspeed.initialize(
        model=model, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    )
    assert is_zero3(engine)
    rollout = RecordingEngine() if rank == 0 else None
    stats = sync_weights(rollout, engine, version=3)
    if rank == 0:
        assert sorted(rollout.got) == sorted(reference)
        for name, tensor in rollout.got.items():
            assert torch.equal(tensor, reference[name]), name
        assert stats.tensors == len(reference) and rollout.weight_version == 3
    else:
        assert stats is None
    # parameters are partitioned again afterwards (nothing stays gathered)
    assert all(p.data.numel() == 0 or p.data.numel() < p.ds_numel for p in engine.module.parameters())
    torch.distributed.barrier()
    Path(result_dir, f"ok{rank}").write_text("ok")


@pytest.mark.e2e
def test_zero3_named_tensors_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
