"""Rollout engines against real vLLM on CPU (fp32), the tiny default model, and transformers.

The colocated engine is the session-wide `vllm_engine` of tests/conftest.py (start-up ~40 s); every
test here syncs the weights it compares against first. The remote-server test starts a second
engine in a subprocess, launched by the first vLLM test so the two start-ups overlap.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignment.errors import RolloutError
from conftest import stage_env
from alignment.ppo.logprobs import completion_logprobs
from alignment.ppo.mismatch import token_mult_prob_error
from rollout import SamplingConfig, SyncStats, make_engine, named_tensors
from rollout.types import RolloutEngine, Sample

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["how is my laptop", "give me a opinion on my phone", "describe my blue camera", "a broken mouse and a heavy kettle"]
MAX_LEN = 256


# ------------------------------------------------------------------------------------------ helpers


def load_hf(model_dir: Path, state: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    return model


def random_weights(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """A fresh weight set for the model's parameters: matrices N(0, 0.15), norm gains 1 + N(0, 0.1).

    Wide enough that next-token distributions are neither flat (greedy ties) nor one-hot.
    """
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, p in load_hf(model_dir).named_parameters():
        noise = torch.randn(p.shape, generator=g)
        weights[name] = 0.15 * noise if p.dim() > 1 else 1 + 0.1 * noise
    return weights


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, top_k=None, top_p=None, temperature=None,
    )
    return out[0, len(prompt_ids) :].tolist()


@torch.no_grad()
def trainer_logprobs(model, samples: list[Sample], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample trainer recompute; returns (sampler, trainer) logprobs as flat [1, N] tensors."""
    ours, theirs = [], []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(ids).logits
        theirs.append(completion_logprobs(logits, ids, len(s.prompt_ids), temperature=temperature)[0])
        ours.append(torch.tensor(s.logprobs))
    return torch.cat(ours)[None], torch.cat(theirs)[None]


def assert_greedy_matches(engine, hf_model, prompts=PROMPTS, n_new: int = 16) -> list[Sample]:
    samples = engine.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=n_new))
    assert len(samples) == len(prompts)
    for s in samples:
        expected = hf_greedy(hf_model, s.prompt_ids, n_new)
        assert s.completion_ids == expected, f"prompt {s.prompt_index}: vLLM {s.completion_ids} != HF {expected}"
    return samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_dir(tiny_paths) -> Path:
    return Path(tiny_paths.base)


@pytest.fixture(scope="module")
def server_proc(tiny_dir, tmp_path_factory):
    """A rollout server subprocess, started first so its start-up overlaps the in-process engine's: with its CPU
    defaults (the context is the tiny model's own, shorter than 1024) and an option of vLLM's passed through."""
    port = free_port()
    env = stage_env(VLLM_CPU_KVCACHE_SPACE="1")
    log = open(tmp_path_factory.mktemp("rollout_server") / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignment", "rollout", "serve", "--model", str(tiny_dir), "--port", str(port),
         "--max-num-seqs", "64"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    yield proc, f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        proc.terminate()  # the server closes its engine on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)
    log.close()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the server and the vLLM engine processes it started (its process group): nothing outlives the test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


# ------------------------------------------------------------------------------------------ tests without vLLM


def test_sampling_config_round_trip():
    cfg = SamplingConfig(temperature=0.7, top_k=5, stop=["\n"], stop_token_ids=[2], seed=3, n=2)
    assert SamplingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1)


def test_write_chunks_bounds_and_cleans_up(tmp_path):
    from safetensors.torch import load_file

    from rollout.weight_sync import write_chunks

    pairs = [(f"w{i}", torch.full((256,), float(i))) for i in range(10)]  # 1 KiB each
    seen = {}
    for chunk in write_chunks(pairs, str(tmp_path), chunk_bytes=3000):
        assert chunk.bytes <= 3072 and os.path.exists(chunk.path)
        seen.update(load_file(chunk.path))
    assert sorted(seen) == sorted(n for n, _ in pairs) and torch.equal(seen["w7"], pairs[7][1])
    assert list(tmp_path.iterdir()) == []  # every chunk removed, no temp files left


def test_named_tensors_plain_module_strips_wrapper():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))

    class Wrapper(torch.nn.Module):  # like a DeepSpeed engine / DDP: the model sits in .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    names = [n for n, _ in named_tensors(Wrapper(model))]
    assert names == ["0.weight", "0.bias"]
    assert all(t.dtype == torch.bfloat16 for _, t in named_tensors(model, dtype=torch.bfloat16))


def test_lora_sync_merges_out_of_place_and_leaves_bf16_base_weights_bitwise_unchanged(tiny_dir):
    """50 syncs of a bf16 LoRA policy: the frozen base weights stay bit for bit what they were (an in-place
    merge/unmerge, W += d; W -= d, rounds twice per sync in bf16 and drifts them), and each merged tensor is
    W + B A * scaling computed in float32 and rounded once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (no delta); give the adapters something to merge
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    base_before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    for _ in range(50):
        synced = dict(named_tensors(model))
    assert all(torch.equal(p.detach(), base_before[n]) for n, p in model.get_base_model().named_parameters() if n in base_before)

    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    assert torch.equal(synced["model.layers.0.self_attn.q_proj.weight"], expected)
    assert not torch.equal(expected, layer.base_layer.weight)  # the delta is large enough to show
    assert set(synced) == {n.replace(".base_layer", "") for n in base_before}  # plain HF names, no adapter tensors
    assert all(t.dtype == torch.bfloat16 for t in synced.values())


def test_hung_server_times_out():
    """A socket that accepts connections but never answers: RolloutError within the timeout."""
    from rollout.remote import RemoteEngine

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        engine = RemoteEngine(url, timeout=2)
        start = time.monotonic()
        with pytest.raises(RolloutError, match=r"did not answer within 2 s"):
            engine.generate(["how is"], SamplingConfig(max_new_tokens=4))
        assert time.monotonic() - start < 6
        engine.close()


def test_dead_server_is_unreachable():
    from rollout.remote import RemoteEngine

    engine = RemoteEngine(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(RolloutError, match="unreachable"):
        engine.generate(["how is"], SamplingConfig(max_new_tokens=4))


def test_a_launched_server_that_exits_while_starting_is_an_error_at_once(tmp_path):
    """A server that dies during start-up (here: no such model) stops the wait when it exits, naming its log
    directory, instead of polling until the timeout."""
    from rollout.launch import launch_servers

    servers = launch_servers(str(tmp_path / "no-model"), 1, [], dtype="float32", max_model_len=64, seed=0, timeout_s=10,
                             ready_timeout_s=None, log_dir=str(tmp_path / "logs"))
    start = time.monotonic()
    with pytest.raises(RolloutError, match=rf"exited with code \d+ while starting; see {tmp_path / 'logs'}"):
        servers.wait_until_ready(600)
    assert time.monotonic() - start < 120
    assert all(p.poll() is not None for p in servers.processes)


def test_hf_engine_server_takes_generation_and_shm_syncs(tiny_dir):
    """`alignment rollout serve --engine hf`: our JSON server, which RemoteEngine tells from vLLM's by its /health;
    weights arrive through /dev/shm, and a transfer backend is refused with a clear error."""
    from rollout.remote import RemoteEngine

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alignment", "rollout", "serve", "--engine", "hf", "--model",
                             str(tiny_dir), "--port", str(port)], cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        engine = RemoteEngine(url, timeout=60, wait_ready=120)
        state = random_weights(tiny_dir, seed=12)
        engine.update_weights(state.items(), version=3)
        samples = assert_greedy_matches(engine, load_hf(tiny_dir, state))
        assert all(s.weight_version == 3 for s in samples) and engine.health()["weight_version"] == 3
        with pytest.raises(RolloutError, match="is not a vLLM server"):
            RemoteEngine(url, timeout=60, weight_sync="gloo").update_weights(state.items(), version=4)
        # behind the secret, like vLLM's server; with it, only the trainer's weight chunks are loaded
        with pytest.raises(RolloutError, match="HTTP 401"):
            RemoteEngine(url, timeout=60, secret="not-the-secret-0123456789").generate(PROMPTS, SamplingConfig())
        canary = tiny_dir.parent / "canary-hf.txt"
        canary.write_text("keep me")
        with pytest.raises(RolloutError, match="HTTP 400.*refused to load"):
            engine._all("/update_weights", {"paths": [str(canary)], "delete": True, "version": 5})
        assert canary.read_text() == "keep me" and engine.health()["weight_version"] == 3
        engine.close()
    finally:
        kill_group(proc)


def test_the_worker_loads_only_the_trainers_weight_chunks(vllm_engine, tmp_path):
    """The worker extension's load route (reached through `/collective_rpc` on a server) takes a path: anything but a
    chunk of the shm transport in this host's shm directory is refused before it is read or deleted: another file, a
    `..` out of the directory, a link in it pointing out, a chunk-named file elsewhere."""
    from rollout.weight_sync import default_shm_dir

    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    shm = Path(default_shm_dir())
    outside_chunk = tmp_path / f"rollout-weights-{os.getpid()}-0123abcd-00000.safetensors"
    outside_chunk.write_text("not weights")
    link = shm / f"rollout-weights-{os.getpid()}-deadbeef-00000.safetensors"
    link.symlink_to(canary)
    try:
        for path in (canary, shm / ".." / canary.relative_to("/"), link, outside_chunk):
            with pytest.raises(Exception, match="refused to load"):
                vllm_engine.load_weight_file(str(path), delete=True)
    finally:
        link.unlink()
    assert canary.read_text() == "keep me" and outside_chunk.exists()


def test_hf_engine_samples_with_the_recipes_settings_whatever_the_models_generation_config(tiny_dir, tmp_path):
    """A model whose generation_config.json says top_p 0.8, top_k 20 and repetition_penalty 1.05 (as Qwen-Instruct's
    do): the HF engine still samples from the full softmax at the asked temperature, so its log-probs are the
    trainer's (transformers fills every setting left None from that file)."""
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.8, "top_k": 20,
                                                                  "repetition_penalty": 1.05, "temperature": 0.7}))
    engine = make_engine("hf", model=str(model_dir))
    samples = engine.generate(PROMPTS, SamplingConfig(temperature=1.0, max_new_tokens=12, n=4, seed=0))
    sampler, trainer = trainer_logprobs(load_hf(model_dir), samples, temperature=1.0)
    torch.testing.assert_close(sampler, trainer, rtol=0, atol=1e-5)
    assert engine.model.generation_config.top_p == 0.8  # the model's own file is left as it was


def test_hf_engine_interface(tiny_dir):
    engine = make_engine("hf", model=str(tiny_dir))
    assert isinstance(engine, RolloutEngine)
    state = random_weights(tiny_dir, seed=10)
    engine.update_weights(state.items(), version=0)
    samples = assert_greedy_matches(engine, load_hf(tiny_dir, state))
    assert all(isinstance(s, Sample) and s.weight_version == 0 for s in samples)

    state = random_weights(tiny_dir, seed=11)
    stats = engine.update_weights(state.items(), version=4)
    assert isinstance(stats, SyncStats) and stats.bytes == sum(t.nbytes for t in state.values())
    assert_greedy_matches(engine, load_hf(tiny_dir, state))

    sampling = SamplingConfig(temperature=0.8, top_k=20, max_new_tokens=12, n=2, seed=1, stop_token_ids=[5])
    samples = engine.generate([[1, 40, 41], "my phone"], sampling)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert samples == engine.generate([[1, 40, 41], "my phone"], sampling)  # seeded: reproducible
    for s in samples:
        assert s.weight_version == 4 and len(s.logprobs) == len(s.completion_ids) > 0
        assert s.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in s.logprobs)
    engine.close()


# ------------------------------------------------------------------------------------------ vLLM


def test_vllm_sync_then_greedy_matches_transformers(server_proc, vllm_engine, tiny_dir):
    # (server_proc only to launch the remote test's server now, so both engines start together)
    state = random_weights(tiny_dir, seed=1)
    stats = vllm_engine.update_weights(state.items(), version=1)
    assert stats.bytes == sum(t.nbytes for t in state.values()) and stats.seconds > 0
    assert stats.tensors == len(state)
    samples = assert_greedy_matches(vllm_engine, load_hf(tiny_dir, state))
    assert all(s.weight_version == 1 for s in samples)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_trainer(vllm_engine, tiny_dir, temperature):
    state = random_weights(tiny_dir, seed=2)
    vllm_engine.update_weights(state.items(), version=10)
    prompts = PROMPTS + [[1, 30, 31, 32]]
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=24, n=2, seed=0)
    samples = vllm_engine.generate(prompts, sampling)
    assert len(samples) == 2 * len(prompts)
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(2)]
    ours, trainer = trainer_logprobs(load_hf(tiny_dir, state), samples, temperature)
    error = token_mult_prob_error(ours, trainer, torch.ones_like(trainer))
    assert error < 1.02, error
    # the metric must see a difference: the T=1 logprobs of the same tokens differ at T != 1
    if temperature != 1.0:
        _, at_t1 = trainer_logprobs(load_hf(tiny_dir, state), samples, 1.0)
        assert token_mult_prob_error(ours, at_t1, torch.ones_like(at_t1)) > 1.02


def test_vllm_seed_stop_and_token_prompts(vllm_engine):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=5, n=3)
    a = vllm_engine.generate(["how is", [1, 40, 41]], sampling)
    b = vllm_engine.generate(["how is", [1, 40, 41]], sampling)
    assert [s.completion_ids for s in a] == [s.completion_ids for s in b]
    assert a[3].prompt_ids == [1, 40, 41]
    first = a[0].completion_ids[2]
    stopped = vllm_engine.generate(["how is"], SamplingConfig(temperature=1.0, max_new_tokens=16, seed=5, stop_token_ids=[first]))
    assert stopped[0].finish_reason == "stop" and stopped[0].completion_ids[-1] == first

    # text is the completion decoded on its own, the same with and without stop strings
    tok = vllm_engine.llm.get_tokenizer()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    plain = vllm_engine.generate(["how is"], greedy)[0]
    assert plain.text == tok.decode(plain.completion_ids, skip_special_tokens=True)
    words = plain.text.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = vllm_engine.generate(["how is"], SamplingConfig(temperature=0.0, max_new_tokens=12, stop=[stop]))[0]
        assert cut.finish_reason == "stop" and plain.text.startswith(cut.text) and stop not in cut.text
        assert cut.text == plain.text[: plain.text.index(stop)]


def test_vllm_cpu_step_larger_than_the_default_token_budget(vllm_engine):
    """32 prompts x 8 samples x 40 prompt tokens (10240 prefill tokens > vLLM's default budget of 4096): on CPU a
    split prefill killed the engine (a seeded CPU generator cannot rewind); seeded sampling stays reproducible."""
    prompts = [[5 + (i + k) % 60 for k in range(40)] for i in range(32)]
    sampling = SamplingConfig(n=8, temperature=1.0, max_new_tokens=8, seed=3)
    first, again = vllm_engine.generate(prompts, sampling), vllm_engine.generate(prompts, sampling)
    assert len(first) == 256 and [s.completion_ids for s in first] == [s.completion_ids for s in again]


def test_vllm_versions_follow_alternating_syncs(vllm_engine, tiny_dir):
    sets = {"A": random_weights(tiny_dir, seed=3), "B": random_weights(tiny_dir, seed=4)}
    hf = {k: load_hf(tiny_dir, v) for k, v in sets.items()}
    outputs = {}
    for version, key in enumerate(["A", "B", "A", "B"], start=20):
        vllm_engine.update_weights(sets[key].items(), version=version)
        assert vllm_engine.weight_version == version
        samples = assert_greedy_matches(vllm_engine, hf[key], n_new=12)
        assert all(s.weight_version == version for s in samples)
        outputs.setdefault(key, []).append([s.completion_ids for s in samples])
    assert outputs["A"][0] == outputs["A"][1] and outputs["A"][0] != outputs["B"][0]


def test_vllm_chunked_sync(vllm_engine, tiny_dir):
    """Many small shm chunks in one reload session give the same model as one big file."""
    state = random_weights(tiny_dir, seed=5)
    old = vllm_engine._shm.chunk_bytes
    vllm_engine._shm.chunk_bytes = 64 * 1024
    try:
        vllm_engine.update_weights(state.items(), version=30)
    finally:
        vllm_engine._shm.chunk_bytes = old
    assert_greedy_matches(vllm_engine, load_hf(tiny_dir, state))
    from rollout.weight_sync import default_shm_dir

    assert not [f for f in os.listdir(default_shm_dir()) if f.startswith(f"rollout-weights-{os.getpid()}-")]


# ------------------------------------------------------------------------------------------ remote


def test_remote_server_generate_sync_and_death(server_proc, tiny_dir):
    """`alignment rollout serve` is vLLM's own OpenAI server: completions with token-id prompts, a /dev/shm sync through
    its collective_rpc route, several servers behind one client, and a clear error once it is dead."""
    from rollout.remote import RemoteEngine

    proc, url = server_proc
    engine = make_engine("remote", urls=[url], timeout=60, wait_ready=240)
    assert engine.health()["status"] == "ok"
    assert engine._request(url, "/v1/models")["data"][0]["max_model_len"] == MAX_LEN  # the model's own context
    assert len(engine.generate(PROMPTS, SamplingConfig(max_new_tokens=4))) == len(PROMPTS)

    state = random_weights(tiny_dir, seed=6)
    stats = engine.update_weights(state.items(), version=7)
    assert stats.bytes > 0 and engine.weight_version == 7
    samples = assert_greedy_matches(engine, load_hf(tiny_dir, state))
    assert all(s.weight_version == 7 for s in samples)

    # data parallel: the same server listed twice gets half the prompts each; order is kept
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    dp = RemoteEngine([url, url], timeout=60)
    split = dp.generate(PROMPTS + PROMPTS[:1], sampling)
    whole = engine.generate(PROMPTS + PROMPTS[:1], sampling)
    assert [s.prompt_index for s in split] == list(range(5))
    assert [s.completion_ids for s in split] == [s.completion_ids for s in whole]

    # the same seed samples the same tokens; a tokenizer decodes each completion on its own, as the colocated engine
    from transformers import AutoTokenizer

    decoding = RemoteEngine(url, timeout=60, tokenizer=str(tiny_dir))
    again = decoding.generate(PROMPTS + PROMPTS[:1], sampling)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in whole]
    assert [lp for s in again for lp in s.logprobs] == pytest.approx([lp for s in whole for lp in s.logprobs])
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert [s.text for s in again] == [tokenizer.decode(s.completion_ids, skip_special_tokens=True) for s in again]
    assert all(len(s.logprobs) == len(s.completion_ids) > 0 and s.finish_reason in ("stop", "length") for s in again)
    decoding.close()

    kill_group(proc)  # a dead server (and its engine)
    start = time.monotonic()
    with pytest.raises(RolloutError, match=r"rollout server http://127\.0\.0\.1:\d+ "):
        engine.generate(PROMPTS, SamplingConfig(max_new_tokens=4))
    assert time.monotonic() - start < 60
    engine.close()
    dp.close()


# ------------------------------------------------------------------------------------------ GPU


class RecordingSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol, recording the calls a trainer engine makes."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args))


def test_ipc_trainer_sends_packed_from_rank_0_alone(monkeypatch):
    """`ipc` (CUDA IPC into an engine on the trainer's GPU; no GPU here, so the CUDA queries are faked): the trainer
    asks the engine for packed transfers (one bounded buffer, never a whole copy of the model on the GPU), and with
    several training ranks it gathers no handles over the default group, which vLLM's engine would do and which the
    other ranks, not holding the engine, never join."""
    from types import SimpleNamespace

    from rollout.weight_sync import PairsWeights, TransferEngineTransport

    with pytest.raises(RuntimeError, match="'ipc' needs CUDA on the trainer; on CPU use 'gloo'"):
        TransferEngineTransport("ipc", RecordingSyncClient(), 2)._connect(PairsWeights([("w", torch.zeros(1))]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="GPU-0"))
    client = RecordingSyncClient()
    transport = TransferEngineTransport("ipc", client, 2)
    transport._connect(PairsWeights([("w", torch.zeros(1))]))
    assert client.calls == [("init_weight_transfer_engine", ({"packed": True},))]
    assert transport._engine.is_sender and transport._engine.packed

    def no_gather(*args, **kwargs):
        raise AssertionError("handles gathered over the default group")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", no_gather)
    monkeypatch.setattr(torch.distributed, "barrier", no_gather)
    handles = [{"GPU-0": ("args",)}]
    assert transport._engine._all_gather_and_merge_handles(handles) == handles
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    transport._engine._post_send_sync()  # no barrier either


def test_a_transfer_that_blocks_is_an_error_within_the_timeout():
    """vLLM's NCCL communicator has no timeout (nor has its IPC path): a send that blocks, as one into a server that died
    mid-transfer does, is a RolloutError within the transport's timeout, and the transfer is torn down (the NCCL
    engine's shutdown aborts its communicator)."""
    import threading

    from rollout.weight_sync import PairsWeights, TransferEngineTransport

    class BlockedSend:  # a trainer engine whose peer never receives
        def __init__(self):
            self.released = threading.Event()
            self.source = None

        def send_weights(self):
            self.released.wait(60)

        def shutdown(self):
            self.released.set()

    transport = TransferEngineTransport("nccl", RecordingSyncClient(), 2, timeout_s=1.0)
    transport._engine = blocked = BlockedSend()  # connected already
    start = time.monotonic()
    with pytest.raises(RolloutError, match=r"weight sync \(nccl\) did not finish within 1 s \(rollout.timeout_s\)"):
        transport.send(PairsWeights([("w", torch.zeros(4))]))
    assert time.monotonic() - start < 5
    assert blocked.released.wait(5), "the blocked transfer was not shut down"
    assert transport._engine is None  # the next sync connects afresh


def test_ipc_buffer_holds_the_largest_tensor_of_a_7b_model(monkeypatch):
    """vLLM's packed IPC producer refuses a tensor larger than its buffer (1 GiB by default): the trainer sizes the buffer
    for Qwen2.5-7B (built on the meta device, bf16: its embedding is 1,089,994,752 bytes) so the first sync goes through."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from rollout.weight_sync import ModelWeights, TransferEngineTransport

    config = AutoConfig.from_pretrained(REPO / "tests/data/qwen2.5-7b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    weights = ModelWeights(model)
    largest = max(t.numel() * t.element_size() for t in model.parameters())
    assert largest == 1_089_994_752 > 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="GPU-0"))
    transport = TransferEngineTransport("ipc", RecordingSyncClient(), 2)
    transport._connect(weights)
    assert transport._engine.packed_buffer_size_bytes == largest


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and the CUDA vllm build")
def test_nccl_transport_gpu(tmp_path):  # pragma: no cover - runs only on a 2-GPU machine
    """NCCL sync into a vLLM engine on another GPU (needs 2 GPUs; see rollout.weight_sync.TransferEngineTransport)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL weight transfer needs the trainer and vLLM on different GPUs")
    from rollout.vllm_engine import VLLMEngine

    from alignment.tiny import build_tiny

    model_dir = Path(build_tiny(tmp_path / "tiny").base)
    torch.cuda.set_device(0)
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # the engine's worker process gets GPU 1
    engine = VLLMEngine(str(model_dir), max_model_len=MAX_LEN, weight_transport="nccl", gpu_memory_utilization=0.2)
    state = random_weights(model_dir, seed=1)
    stats = engine.update_weights(((k, v.cuda()) for k, v in state.items()), version=1)
    assert stats.bytes > 0 and engine.weight_version == 1
    engine.close()


def test_a_full_shm_stops_the_sync_with_the_fix_named(tmp_path):
    """A /dev/shm too small for a chunk (containers give it 64 MB) is a clear error before anything is written."""
    from alignment.errors import RolloutError
    from rollout.weight_sync import ModelWeights, ShmTransport

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "shm"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights
        calls = []
        with pytest.raises(RolloutError, match=r"has 1 MiB free, a chunk of the weights needs 4 MiB.*weight_sync: gloo"):
            ShmTransport(str(small)).send(ModelWeights(model), begin=lambda: calls.append("begin"), load=calls.append,
                                          finish=lambda: calls.append("finish"))
        assert calls == [] and list(small.iterdir()) == []
        # a source without metadata finds out when the disk fills: the same message, nothing left behind
        with pytest.raises(RolloutError, match="weight_sync: gloo"):
            ShmTransport(str(small), chunk_bytes=512 * 1024).send(list(model.named_parameters()), begin=lambda: None,
                                                                   load=lambda path: None, finish=lambda: None)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


class DirectGlooClient:
    """vLLM's weight-sync client protocol straight into one in-process gloo worker engine (the HTTP routes' part),
    with a model that records what it is asked to load. `worker_bucket_bytes`: the worker joins with that bucket size
    instead of the trainer's, as a client driving /init_weight_transfer_engine itself could make it."""

    def __init__(self, worker_bucket_bytes: int | None = None):
        from types import SimpleNamespace

        from rollout.gloo_transfer import GlooWeightTransferEngine

        self.loaded, self.worker_errors = [], []
        model = SimpleNamespace(load_weights=lambda tensors: self.loaded.extend(name for name, _ in tensors))
        parallel = SimpleNamespace(data_parallel_index=0, world_size=1, rank=0)
        self.worker = GlooWeightTransferEngine(None, SimpleNamespace(parallel_config=parallel, model_config=None),
                                               torch.device("cpu"), model)
        self.worker_bucket_bytes = worker_bucket_bytes

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        if self.worker_bucket_bytes is not None:
            init_info = {**init_info, "bucket_bytes": self.worker_bucket_bytes}
        self.worker.init_transfer_engine(self.worker.init_info_cls(**init_info))

    def start_weight_update(self) -> None:  # the layerwise reload session needs a vLLM model: not under test here
        pass

    def update_weights(self, update_info: dict) -> None:
        try:
            self.worker.update_weights(update_info)
        except Exception as exc:
            self.worker_errors.append(str(exc))
            raise

    def finish_weight_update(self, weight_version=None) -> None:
        pass


@pytest.mark.parametrize("case", ["agreed", "other bucket size", "source short of its metadata"])
def test_gloo_transfer_loads_only_what_both_sides_planned(case):
    """The gloo backend's two sides agree on the transfer (tensors, bytes, buckets) before the first bucket: a worker
    that joined with another bucket size refuses and loads nothing, and the trainer says so at once, not after the
    timeout (gloo itself would fill the larger buffers partly and carry on); a source that yields fewer tensors than
    its metadata declared is a clear error."""
    from rollout.gloo_transfer import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine
    from rollout.weight_sync import PairsWeights

    weights = [(f"layer{i}.weight", torch.full((64, 64), float(i))) for i in range(6)]  # 16 KiB each

    class Short(PairsWeights):  # declares every tensor, yields all but the last
        def __iter__(self):
            return iter(self.pairs[:-1])

    source = (Short if case == "source short of its metadata" else PairsWeights)(weights)
    client = DirectGlooClient(worker_bucket_bytes=48 * 1024 if case == "other bucket size" else None)
    info = GlooTrainerInitInfo(master_address="127.0.0.1", master_port=free_port(), world_size=2, timeout_s=20,
                               bucket_bytes=32 * 1024, rank=0)
    trainer = GlooTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
    start = time.monotonic()
    if case == "agreed":
        trainer.send_weights()
        assert client.loaded == [name for name, _ in weights]
        return
    expected = "refused the weight update, nothing loaded" if case == "other bucket size" else "yielded 5 tensors where its metadata declared 6"
    with pytest.raises((RuntimeError, ValueError), match=expected):
        trainer.send_weights()
    if case == "other bucket size":
        assert time.monotonic() - start < 10  # the handshake's answer, not the group's 20 s timeout
        deadline = time.monotonic() + 10
        while not client.worker_errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.worker_errors and "refused, nothing loaded: the trainer sends 6 tensors" in client.worker_errors[0]
        assert client.loaded == []


def test_nothing_we_configure_sends_gpu_sampling_to_vllms_per_request_loop(vllm_engine):
    """Every rollout request carries a seed (exact resume). vLLM's V1 model runner samples each seeded request with a
    kernel of its own at every decode step ("TODO: This can be slow"); its V2 runner, the default on CUDA with Triton,
    keeps a seed per request in one tensor and samples all of them in one Gumbel kernel, at no extra cost. It falls
    back to V1 only for the features this list names: none of our engine's settings may be among them."""
    config = vllm_engine.llm.llm_engine.vllm_config
    assert config._get_v2_model_runner_unsupported_features() == []
