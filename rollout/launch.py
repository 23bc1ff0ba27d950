"""Start local rollout servers on devices reserved for them, for a PPO run that asked for `launch_servers`.

Each server is `python -m alignment rollout serve` (vLLM's OpenAI server) in its own process (and, on GPUs, its own
CUDA_VISIBLE_DEVICES), on a free loopback port. They share a secret with the returned engine (ALIGNMENT_ROLLOUT_SECRET
if set, else one made for this run), so no other process of the host can drive them. The engine stops them when
closed.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys

from alignment.errors import RolloutError
from alignment.lifetime import EXIT_WITH_PARENT
from rollout.auth import SECRET_ENV, rollout_secret
from rollout.remote import RemoteEngine


class LaunchedServers(RemoteEngine):
    """A RemoteEngine that owns its server processes."""

    def __init__(self, urls: list[str], processes: list[subprocess.Popen], timeout: float, weight_sync: str = "shm",
                 log_dir: str | None = None, tokenizer=None, secret: str | None = None):
        self.processes, self.log_dir = processes, log_dir
        super().__init__(urls, timeout=timeout, weight_sync=weight_sync, tokenizer=tokenizer, secret=secret)

    def wait_until_ready(self, ready_timeout: float) -> LaunchedServers:
        """Wait for every server's /health; stop them all and raise RolloutError as soon as one exits, or after the
        time (naming the servers and where their logs are)."""

        def check_alive(i: int) -> None:
            proc = self.processes[i]
            if proc.poll() is not None:
                raise RolloutError(f"rollout server {self.urls[i]} exited with code {proc.returncode} while starting")

        try:
            self.wait_ready(ready_timeout, check_alive)
        except RolloutError as exc:
            self.close()
            raise RolloutError(f"{exc}; see {self.log_dir or 'its log'}") from None
        return self

    def close(self) -> None:
        """Stop every server with its vLLM engine processes (each server leads its own process group)."""
        super().close()
        for p in self.processes:
            _signal_group(p, signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)  # whatever is left of the group (engine core, workers)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_servers(
    model: str, count: int, devices: list[str], *, dtype: str, max_model_len: int, seed: int, timeout_s: float,
    ready_timeout_s: float | None = 600.0, log_dir: str | None = None, weight_sync: str = "shm",
) -> LaunchedServers:
    """Start `count` servers for `model`; server i sees devices[i] (if given; several devices, e.g. "0,1", make it
    tensor-parallel over them). Logs go to log_dir/rollout-server-i.log. With ready_timeout_s None it returns at
    once (the caller does other work while they start, then calls `wait_until_ready`)."""
    if devices and len(devices) != count:
        raise RolloutError(f"rollout.server_devices lists {len(devices)} device sets for {count} servers")
    urls, processes = [], []
    secret = rollout_secret() or secrets.token_hex(32)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    for i in range(count):
        port = _free_port()
        env = dict(os.environ)
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # not part of the trainer's group
            env.pop(var, None)
        env[EXIT_WITH_PARENT] = "1"  # the server (and with it its engine) ends when the trainer does, even by SIGKILL
        env[SECRET_ENV] = secret
        log = open(os.path.join(log_dir, f"rollout-server-{i}.log"), "w") if log_dir else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "alignment", "rollout", "serve", "--model", model, "--port", str(port),
               "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", str(seed),
               "--weight-sync", "gloo" if weight_sync == "shm" else weight_sync]  # the shm route works with any
        if devices:  # the server sees only these; a server given several splits its replica over them (tensor parallel)
            cmd += ["--devices", devices[i]]
        # A new session: the server and the engine processes it spawns form one group, stopped together.
        processes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    servers = LaunchedServers(urls, processes, timeout=timeout_s, weight_sync=weight_sync, log_dir=log_dir, tokenizer=model,
                              secret=secret)
    return servers if ready_timeout_s is None else servers.wait_until_ready(ready_timeout_s)
