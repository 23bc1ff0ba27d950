"""Weight-sync time into a rollout server: the shm route (safetensors chunks in /dev/shm) against `gloo` (vLLM's
weight-transfer API over TCP, rollout/gloo_transfer.py) and the limit, a raw gloo broadcast of the same bytes in
the same 16 MiB buckets between two processes of this host with nothing else (no packing, no loading).

    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
    python benchmarks/bench_weight_sync.py --models tiny 100m --out sync.json

One server (vLLM's OpenAI server, as `alignment rollout serve` starts it) on loopback, so the shm route works too;
the best of `--repeats` syncs each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

RECEIVER = """
import sys, torch
from rollout.gloo_transfer import _group, _broadcast
port, sizes = int(sys.argv[1]), [int(n) for n in sys.argv[2].split(",")]
group = _group("127.0.0.1", port, 1, 2, 600)
for _ in range(int(sys.argv[3])):
    for n in sizes:
        _broadcast(group, torch.empty(n, dtype=torch.uint8)).wait()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_broadcast(meta, repeats: int) -> float:
    """Best seconds to broadcast the model's bytes, in the transfer's buckets, to one other process."""
    from rollout.gloo_transfer import _broadcast, _group, plan_buckets
    from rollout.types import tensor_bytes
    from rollout.weight_sync import GLOO_BUCKET_BYTES

    buckets = plan_buckets([m.dtype for m in meta], [list(m.shape) for m in meta], GLOO_BUCKET_BYTES)
    sizes = [sum(tensor_bytes(meta[i].dtype, meta[i].shape) for i in b) for b in buckets]
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), ",".join(map(str, sizes)), str(repeats)],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    group = _group("127.0.0.1", port, 0, 2, 600)
    buffers = [torch.ones(n, dtype=torch.uint8) for n in sizes]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for buffer in buffers:
            _broadcast(group, buffer).wait()
        best = min(best, time.perf_counter() - start)
    receiver.wait()
    return best


def time_lifecycle(client) -> dict[str, float]:
    """Wrap a sync client's start / update / finish calls so each records its seconds (last call wins): `update`
    returns when the workers have received and loaded every bucket, `finish` when the reload is finalised."""
    phases: dict[str, float] = {}
    for name in ("start_weight_update", "update_weights", "finish_weight_update"):
        call = getattr(client, name)

        def timed(*args, _call=call, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                phases[_name] = time.perf_counter() - start

        setattr(client, name, timed)
    return phases


def main() -> None:
    from transformers import AutoModelForCausalLM

    from alignment.tiny import build_tiny
    from bench_ppo import benchmark_policy
    from rollout.remote import RemoteEngine
    from rollout.weight_sync import ModelWeights

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "100m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_sync_"))
    tiny = build_tiny(work / "tiny")
    results = {}
    for name in args.models:
        model_dir = benchmark_policy(name, tiny, work)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        weights = ModelWeights(model)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "alignment", "rollout", "serve", "--model", str(model_dir),
                                   "--port", str(port), "--max-model-len", "256", "--weight-sync", "gloo"], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            row = {"bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
            for sync in ("shm", "gloo"):
                engine = RemoteEngine(url, timeout=600, wait_ready=600, weight_sync=sync)
                if sync == "gloo":  # where the time goes: the servers' lifecycle calls, timed from here
                    phases = time_lifecycle(engine._transfer_transport().client)
                row[sync] = min(engine.update_weights(weights, version=v + 1).seconds for v in range(args.repeats))
            row["gloo_phases_last_sync"] = phases
            row["raw_broadcast"] = raw_broadcast(weights.metadata(), args.repeats)
        finally:
            os.killpg(server.pid, 15)
            server.wait()
        row["gloo_over_raw_throughput"] = row["raw_broadcast"] / row["gloo"]
        results[name] = row
        print(f"{name}: {row['bytes'] / 2**20:.1f} MiB; shm {row['shm']:.3f} s, gloo {row['gloo']:.3f} s, raw gloo "
              f"broadcast {row['raw_broadcast']:.3f} s; gloo reaches {row['gloo_over_raw_throughput']:.2f}x the raw "
              f"throughput; last gloo sync: " + ", ".join(f"{k} {v:.3f} s" for k, v in row["gloo_phases_last_sync"].items()),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
