"""Rollout servers that cannot see the trainer's /dev/shm (as on another host): each runs in a mount namespace of
its own with a private tmpfs on /dev/shm. Weights reach it over `gloo`, our backend of vLLM's weight-transfer API
(rollout/gloo_transfer.py), loaded into the server's vLLM processes as a plugin; the shm route fails with a clear
error naming the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, stage_env, tiny_ppo_overrides
from test_rollout import MAX_LEN, assert_greedy_matches, free_port, kill_group, load_hf, random_weights

TINY_PPO = REPO / "recipes" / "tiny"


def isolated_server(model: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`alignment rollout serve` in a mount namespace whose /dev/shm is its own (the trainer's files are not there)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    port = free_port()
    serve = [sys.executable, "-m", "alignment", "rollout", "serve", "--model", str(model), "--port", str(port),
             "--max-model-len", str(MAX_LEN), "--dtype", "float32", "--weight-sync", "gloo"]
    # vLLM's CPU engine needs ~160 MiB of /dev/shm for its own inter-process queues
    script = "mount -t tmpfs -o size=512m tmpfs /dev/shm && exec " + " ".join(serve)
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                            env=stage_env(VLLM_CPU_KVCACHE_SPACE="1"), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory):
    from alignment.errors import RolloutError
    from rollout.remote import RemoteEngine

    log = tmp_path_factory.mktemp("isolated") / "server.log"
    proc, url = isolated_server(Path(tiny_paths.base), log)
    try:
        for _ in range(600):
            assert proc.poll() is None, f"the isolated server died: {log.read_text()[-3000:]}"
            try:
                RemoteEngine(url, timeout=5).health()
                break
            except RolloutError:
                time.sleep(0.5)
        yield url
    finally:
        kill_group(proc)


def test_gloo_sync_reaches_a_server_without_the_trainers_shm(server, tiny_paths):
    from alignment.errors import RolloutError
    from rollout.remote import RemoteEngine

    tiny = Path(tiny_paths.base)
    shm = RemoteEngine(server, timeout=60, wait_ready=300)
    with pytest.raises(RolloutError, match="no such file on the server's host.*rollout.weight_sync: gloo"):
        shm.update_weights(random_weights(tiny, seed=3).items(), version=1)
    engine = RemoteEngine(server, timeout=60, wait_ready=300, weight_sync="gloo")
    for version, seed in ((1, 1), (2, 2)):  # the second sync reuses the transfer group
        state = random_weights(tiny, seed=seed)
        stats = engine.update_weights(state.items(), version=version)
        assert stats.bytes == sum(t.nbytes for t in state.values()) and stats.tensors == len(state)
        assert engine.health()["weight_version"] == version
        samples = assert_greedy_matches(engine, load_hf(tiny, state))
        assert all(s.weight_version == version for s in samples)


@pytest.mark.e2e
def test_ppo_over_gloo_with_an_isolated_server_raises_gold(server, tiny_paths, tiny_sft, tiny_rm, tmp_path):
    """GRPO on the tiny task with its rollouts on the isolated server: the sampler's log-probs are the trainer's after
    every sync, and gold rises as in the colocated run."""
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages.ppo import run
    from test_ppo import assert_gold_rises

    out = tmp_path / "gloo"
    recipe = load_recipe(TINY_PPO / "ppo_grpo.yaml", PPORecipe, [
        *tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), "rollout.engine=remote",
        f"rollout.servers=[{server}]", "rollout.weight_sync=gloo"])
    run(recipe)
    metrics = read_metrics(out)
    assert all(m["sync/bytes"] > 0 for m in metrics)
    assert_gold_rises(metrics, tiny_sft.summary["gold_after"], "grpo over gloo")


@pytest.mark.e2e
def test_a_stock_vllm_server_loads_the_gloo_backend_and_receives_weights(tiny_paths, tmp_path):
    """vLLM's own OpenAI server (dev mode, `--weight-transfer-config '{"backend": "gloo"}'`) finds our backend through
    the plugin entry point and takes a sync from the trainer's transport: after an all-zero model is sent, every
    sampled token has log-probability -log(vocabulary). (`vllm serve` itself looks up a distribution named "vllm",
    which the CPU build, "vllm-cpu", is not; its module entry point is the same server.)"""
    import json
    import math
    import urllib.request

    import torch
    from transformers import AutoModelForCausalLM

    from rollout.weight_sync import ModelWeights, ServersSyncClient, TransferEngineTransport

    model_dir, port = str(tiny_paths.base), free_port()
    log = tmp_path / "vllm.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
         "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--enforce-eager",
         "--weight-transfer-config", '{"backend": "gloo"}'],
        cwd=REPO, env=stage_env(VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1"), stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        workers = json.loads(urllib.request.urlopen(url + "/get_world_size").read())["world_size"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        transport = TransferEngineTransport("gloo", ServersSyncClient([url], [workers], 120), 1 + workers)
        assert transport.send(ModelWeights(model)).tensors == len(list(model.parameters()))
        request = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"}, data=json.dumps(
            {"model": model_dir, "prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 1, "temperature": 1.0}).encode())
        logprobs = json.loads(urllib.request.urlopen(request).read())["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs == pytest.approx([-math.log(model.config.vocab_size)] * 4, abs=1e-5)
    finally:
        kill_group(server)
