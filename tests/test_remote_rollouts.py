"""Rollout servers that cannot see the trainer's /dev/shm (as on another host): vLLM's own OpenAI server (started by
`alignment rollout serve`) in a mount namespace of its own with a private tmpfs on /dev/shm, listening on every
interface with the tests' shared secret (conftest.py). Weights reach it over `gloo`, our backend of vLLM's
weight-transfer API (rollout/gloo_transfer.py), which the stock server loads through our vLLM plugin; the shm route
fails with a clear error naming the fix; without the secret nothing it serves answers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, read_metrics, stage_env, tiny_ppo_overrides
from rollout import SamplingConfig
from test_rollout import MAX_LEN, PROMPTS, assert_greedy_matches, free_port, kill_group, load_hf, random_weights

TINY_PPO = REPO / "recipes" / "tiny"


def start_server(model: Path, log_path: Path, isolated: bool) -> tuple[subprocess.Popen, str]:
    """`alignment rollout serve`; `isolated`: in a mount namespace whose /dev/shm is its own (the trainer's files are
    not there)."""
    port = free_port()
    serve = [sys.executable, "-m", "alignment", "rollout", "serve", "--model", str(model), "--port", str(port),
             "--max-model-len", str(MAX_LEN), "--dtype", "float32", "--weight-sync", "gloo"]
    if isolated:  # as a server on another host would: reachable on every interface, behind the secret
        serve += ["--host", "0.0.0.0"]
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("needs root and unshare(1) for a mount namespace")
        # vLLM's CPU engine needs ~160 MiB of /dev/shm for its own inter-process queues
        serve = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 "mount -t tmpfs -o size=512m tmpfs /dev/shm && exec " + " ".join(serve)]
    proc = subprocess.Popen(serve, cwd=REPO, env=stage_env(VLLM_CPU_KVCACHE_SPACE="1"), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory):
    """An isolated server (`url`, `proc`) and a plain one beside it (`other_url`), started together."""
    from alignment.errors import RolloutError
    from rollout.remote import RemoteEngine

    logs = tmp_path_factory.mktemp("servers")
    started = [start_server(Path(tiny_paths.base), logs / f"{name}.log", isolated=name == "isolated")
               for name in ("isolated", "plain")]
    try:
        for (proc, url), name in zip(started, ("isolated", "plain")):
            for _ in range(600):
                assert proc.poll() is None, f"the {name} server died: {(logs / f'{name}.log').read_text()[-3000:]}"
                try:
                    RemoteEngine(url, timeout=5).health()
                    break
                except RolloutError:
                    time.sleep(0.5)
        yield SimpleNamespace(url=started[0][1], proc=started[0][0], other_url=started[1][1])
    finally:
        for proc, _ in started:
            kill_group(proc)


def test_gloo_sync_reaches_a_server_without_the_trainers_shm(server, tiny_paths):
    from alignment.errors import RolloutError
    from rollout.remote import RemoteEngine

    tiny = Path(tiny_paths.base)
    shm = RemoteEngine(server.url, timeout=60, wait_ready=300)
    with pytest.raises(RolloutError, match="No such file or directory.*rollout.weight_sync: gloo"):
        shm.update_weights(random_weights(tiny, seed=3).items(), version=1)
    # Two servers behind one client: their workers join one transfer group, each server's after the other's.
    urls = [server.url, server.other_url]
    engine = RemoteEngine(urls, timeout=60, wait_ready=300, weight_sync="gloo")
    for version, seed in ((1, 1), (2, 2)):  # the second sync reuses the transfer group
        state = random_weights(tiny, seed=seed)
        stats = engine.update_weights(state.items(), version=version)
        assert stats.bytes == sum(t.nbytes for t in state.values()) and stats.tensors == len(state)
        assert [engine.health(u)["weight_version"] for u in urls] == [version, version]
        samples = assert_greedy_matches(engine, load_hf(tiny, state))  # half the prompts on each server
        assert all(s.weight_version == version for s in samples)


@pytest.mark.e2e
def test_ppo_over_gloo_with_an_isolated_server_raises_gold(server, tiny_paths, tiny_sft, tiny_rm, tmp_path):
    """GRPO on the tiny task with its rollouts on the isolated server: the sampler's log-probs are the trainer's after
    every sync, and gold rises as in the colocated run. (One server: with two on this 2-core machine each sync takes
    ~0.6 s instead of 0.03 s, since a server's engine core and worker busy-wait through the transfer, ~80% of a core
    each in `top`, and starve the rest.)"""
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages.ppo import run
    from test_ppo import assert_gold_rises

    out = tmp_path / "gloo"
    recipe = load_recipe(TINY_PPO / "ppo_grpo.yaml", PPORecipe, [
        *tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), "rollout.engine=remote",
        f"rollout.servers=[{server.url}]", "rollout.weight_sync=gloo"])
    run(recipe)
    metrics = read_metrics(out)
    assert all(m["sync/bytes"] > 0 for m in metrics)
    assert_gold_rises(metrics, tiny_sft.summary["gold_after"], "grpo over gloo")


def _status(url: str, method: str, path: str, body: dict | None, headers: dict) -> int:
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json",
                                                                                   **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_without_the_secret_the_server_does_nothing(server, tmp_path):
    """The server listens on every interface with a secret: without it (or with another), every development route,
    weight-transfer route and `/v1` answers 401 and changes nothing: a file outside the shm directory survives a
    `rollout_load_file` with delete (with the secret too: the worker loads only the trainer's weight chunks), the
    transfer group is never joined, and greedy output and weight version stay as they were. /health stays open."""
    from alignment.errors import RolloutError
    from rollout.remote import RemoteEngine

    canary = tmp_path / "canary.txt"  # the isolated server sees tmp_path (only its /dev/shm is its own)
    canary.write_text("keep me")
    engine = RemoteEngine(server.url, timeout=60)  # the tests' secret
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    before, version = [s.completion_ids for s in engine.generate(PROMPTS, greedy)], engine.health()["weight_version"]
    load_canary = {"method": "rollout_load_file", "kwargs": {"path": str(canary), "delete": True}}
    routes = [("POST", "/collective_rpc", load_canary), ("POST", "/sleep", {}), ("POST", "/pause", {}),
              ("POST", "/reset_prefix_cache", {}), ("POST", "/start_weight_update", {}),
              ("POST", "/init_weight_transfer_engine", {"init_info": {"master_address": "127.0.0.1", "master_port": 1,
                                                                      "rank_offset": 1, "world_size": 2}}),
              ("POST", "/update_weights", {"update_info": {"names": [], "dtype_names": [], "shapes": []}}),
              ("POST", "/finish_weight_update", {}), ("POST", "/update_weight_version", {"new_version": "99"}),
              ("GET", "/weight_info", None), ("GET", "/server_info", None), ("GET", "/metrics", None),
              ("GET", "/v1/models", None),
              ("POST", "/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4})]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer not-the-secret-0123456789"}, {"Authorization": "Basic abc"}):
            assert _status(server.url, method, path, body, headers) == 401, (method, path, headers)
    assert _status(server.url, "GET", "/health", None, {}) == 200
    assert canary.read_text() == "keep me"
    with pytest.raises(RolloutError, match="refused to load"):  # with the secret: not a weight chunk, not touched
        engine._all("/collective_rpc", {**load_canary, "timeout": 60})
    assert canary.read_text() == "keep me"
    assert [s.completion_ids for s in engine.generate(PROMPTS, greedy)] == before
    assert engine.health()["weight_version"] == version


def test_a_server_that_hangs_mid_transfer_is_an_error_within_the_timeout(server, tiny_paths):
    """The server (API process and engine) is stopped while the trainer streams the weights over gloo: the sync ends in
    a RolloutError naming the transfer within the timeout, not a hang. Runs last: the server stays stopped."""
    from alignment.errors import RolloutError
    from rollout.remote import RemoteEngine
    from rollout.weight_sync import PairsWeights

    state = random_weights(Path(tiny_paths.base), seed=4)

    class StopsTheServer(PairsWeights):  # the first tensor is gathered, then the server stops answering
        def __iter__(self):
            for k, pair in enumerate(self.pairs):
                if k == 1:
                    os.killpg(server.proc.pid, signal.SIGSTOP)
                yield pair

    timeout = 10.0
    engine = RemoteEngine(server.url, timeout=timeout, wait_ready=60, weight_sync="gloo")
    start = time.monotonic()
    with pytest.raises(RolloutError, match=r"weight sync \(gloo\) did not finish within 10 s"):
        engine.update_weights(StopsTheServer(state.items()), version=9)
    elapsed = time.monotonic() - start
    print(f"\nhung server: error after {elapsed:.1f} s")
    assert elapsed < 3 * timeout, f"the hung transfer took {elapsed:.0f} s to fail"
