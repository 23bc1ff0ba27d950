"""RemoteEngine: the RolloutEngine interface over one or more rollout servers.

A server is vLLM's own OpenAI server (what `alignment rollout serve` starts, or one a user runs anywhere with the
flags rollout/serve.py lists), or our small JSON server around the HF engine (rollout/server.py); the kind is read
from its /health answer. Prompts are split into contiguous shards, one per server (data parallel), and the samples
come back in prompt order. Every request has a timeout: a dead or hung server raises
`alignment.errors.RolloutError` naming the server, never a silent hang.

Weight sync: `weight_sync="shm"` writes chunked safetensors files in the trainer's /dev/shm that every server
loads (servers on the trainer's host only: vLLM's through `/collective_rpc` into our worker extension); "gloo" (TCP,
any host) or "nccl" (GPUs) stream the weights through vLLM's weight-transfer API, the servers' workers joining one
transfer group with this process. The trainer never syncs while a generation is in flight (rollout_schedule.py), so
samples carry the version this client last synced.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from alignment.errors import RolloutError
from rollout.auth import bearer_headers, rollout_secret
from rollout.openai_completions import completion_request, samples_from_completion, set_texts
from rollout.types import Sample, SamplingConfig, SyncStats
from rollout.weight_sync import (
    DEFAULT_CHUNK_BYTES,
    ServersSyncClient,
    ShmTransport,
    TransferEngineTransport,
    as_weight_source,
    local_address_towards,
)

MAX_REQUESTS_IN_FLIGHT = 64  # per-prompt completion requests open at once (the servers batch them)


class RemoteEngine:
    """Client over rollout servers.

    urls: one URL or a list (e.g. "http://127.0.0.1:8000").
    timeout: seconds to wait for any one answer (a generation or a weight-transfer step included).
    wait_ready: if > 0, poll /health of every server for up to this many seconds before returning.
    tokenizer: a tokenizer or its path, to decode vLLM servers' completions as the colocated engine does (else the
      server's own text is kept).
    secret: the servers' shared secret, sent as `Authorization: Bearer` (default: ALIGNMENT_ROLLOUT_SECRET; see
      rollout/auth.py).
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        timeout: float = 300.0,
        wait_ready: float = 0.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        weight_sync: str = "shm",
        master_address: str | None = None,
        tokenizer=None,
        secret: str | None = None,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise RolloutError("RemoteEngine needs at least one rollout server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = float(timeout)
        self.weight_version = 0
        self._shm = ShmTransport(chunk_bytes=chunk_bytes)  # the servers load chunks from this host's shm directory only
        self.weight_sync = weight_sync
        self.master_address = master_address or local_address_towards(self.urls[0])
        self._tokenizer = tokenizer
        self._headers = bearer_headers(secret or rollout_secret())
        self._transfer = None  # built at the first sync, when every server is up
        self._served: dict[str, str] = {}  # vLLM server URL -> the model name it serves
        self._kind: str | None = None  # "vllm" or "alignment", read from the first /health
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="rollout-remote")
        self._requests = ThreadPoolExecutor(max_workers=MAX_REQUESTS_IN_FLIGHT, thread_name_prefix="rollout-requests")
        if wait_ready > 0:
            self.wait_ready(wait_ready)
            self.weight_version = self.health(self.urls[0])["weight_version"]

    # ------------------------------------------------------------------------------ HTTP
    def _request(self, url: str, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json", **self._headers})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as exc:
            raise RolloutError(f"rollout server {url} failed on {path} (HTTP {exc.code}): {_error_detail(exc)}") from None
        except (TimeoutError, socket.timeout):
            raise RolloutError(
                f"rollout server {url} did not answer within {timeout:g} s ({path}); it is hung or overloaded "
                "(raise the rollout timeout if generations are this long)"
            ) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise RolloutError(f"rollout server {url} did not answer within {timeout:g} s ({path}); it is hung or overloaded") from None
            raise RolloutError(f"rollout server {url} is unreachable ({exc.reason}); is it running?") from None
        except (ConnectionError, OSError) as exc:
            raise RolloutError(f"rollout server {url} dropped the connection on {path} ({exc}); did it die?") from None

    def _all(self, path: str, payload: dict | None = None) -> list[dict]:
        futures = [self._pool.submit(self._request, u, path, payload) for u in self.urls]
        return [f.result() for f in futures]

    def _is_vllm(self) -> bool:
        """vLLM's server answers /health with an empty body, ours with its state."""
        if self._kind is None:
            kinds = {u: "alignment" if self._request(u, "/health", timeout=min(self.timeout, 10.0)) else "vllm"
                     for u in self.urls}
            if len(set(kinds.values())) > 1:
                raise RolloutError(f"rollout servers of two kinds (vLLM's and the HF engine's) in one run: {kinds}")
            self._kind = kinds[self.urls[0]]
        return self._kind == "vllm"

    def health(self, url: str | None = None) -> dict:
        """{"status": "ok", "weight_version": int, ...} of one server (the first by default)."""
        url = url or self.urls[0]
        if not self._is_vllm():
            return self._request(url, "/health", timeout=min(self.timeout, 10.0))
        version = self._request(url, "/weight_info", timeout=min(self.timeout, 10.0)).get("weight_version")
        return {"status": "ok", "weight_version": int(version) if str(version).isdigit() else 0}

    def wait_ready(self, seconds: float, check_alive=None) -> None:
        """Poll every server's /health until all answer, or raise RolloutError after `seconds`. `check_alive(i)`, if
        given, runs before each poll of server i and raises when that server can no longer come up."""
        deadline = time.monotonic() + seconds
        for i, url in enumerate(self.urls):
            while True:
                if check_alive is not None:
                    check_alive(i)
                try:
                    self._request(url, "/health", timeout=5.0)
                    break
                except RolloutError as exc:
                    if time.monotonic() > deadline:
                        raise RolloutError(f"rollout server {url} was not ready within {seconds:g} s: {exc}") from None
                    time.sleep(0.5)

    # ------------------------------------------------------------------------------ generation
    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        if not prompts:
            return []
        if self._is_vllm():
            return self._generate_completions(prompts, sampling)
        k = min(len(self.urls), len(prompts))
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        futures = []
        for j in range(k):
            lo, hi = bounds[j], bounds[j + 1]
            shard_sampling = SamplingConfig.from_dict(sampling.to_dict())
            if shard_sampling.seed is not None:
                shard_sampling.seed = sampling.prompt_seed(lo)  # prompt i keeps its seed whatever the split
            payload = {"prompts": [p if isinstance(p, str) else [int(t) for t in p] for p in prompts[lo:hi]],
                       "sampling": shard_sampling.to_dict()}
            futures.append((lo, self._pool.submit(self._request, self.urls[j], "/generate", payload)))
        samples: list[Sample] = []
        for lo, fut in futures:
            for d in fut.result()["samples"]:
                s = Sample.from_dict(d)
                s.prompt_index += lo
                samples.append(s)
        return samples

    def _generate_completions(self, prompts, sampling: SamplingConfig) -> list[Sample]:
        """One /v1/completions request per prompt, prompt i to server i * servers // prompts (contiguous shards)."""
        futures = []
        for i, prompt in enumerate(prompts):
            url = self.urls[i * len(self.urls) // len(prompts)]
            futures.append(self._requests.submit(self._request, url, "/v1/completions",
                                                 completion_request(self._model_of(url), prompt, sampling, i)))
        samples, stop_reasons = [], []
        for i, future in enumerate(futures):
            got, stops = samples_from_completion(future.result(), i, self.weight_version)
            samples += got
            stop_reasons += stops
        if self._tokenizer is not None:
            if isinstance(self._tokenizer, str):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer)
            set_texts(self._tokenizer, samples, stop_reasons)
        return samples

    def _model_of(self, url: str) -> str:
        if url not in self._served:
            self._served[url] = self._request(url, "/v1/models")["data"][0]["id"]
        return self._served[url]

    # ------------------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Send the weights to every server (see the module docstring); later samples carry `version`."""
        vllm = self._is_vllm()
        if self.weight_sync == "shm":
            stats = self._shm.send(named_tensors, **(self._vllm_reload_steps() if vllm else self._json_reload_steps(version)))
        elif not vllm:
            raise RolloutError(f"rollout.weight_sync {self.weight_sync}: {self.urls[0]} is not a vLLM server (an HF "
                               "engine's server takes weights through shm only)")
        else:
            try:
                stats = self._transfer_transport().send(as_weight_source(named_tensors))
            except RolloutError:
                raise
            except Exception as exc:
                raise RolloutError(f"weight sync ({self.weight_sync}) to {', '.join(self.urls)} failed: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        if vllm:
            self._all("/update_weight_version", {"new_version": str(int(version))})
            self._all("/reset_prefix_cache", {})  # cached prefixes hold KV computed with the old weights
            replies = [{"weight_version": int(r["weight_version"])} for r in self._all("/weight_info")]
        else:
            replies = [self.health(u) for u in self.urls]
        bad = [(u, r["weight_version"]) for u, r in zip(self.urls, replies) if r["weight_version"] != int(version)]
        if bad:
            raise RolloutError(f"rollout servers report the wrong weight version after sync: {bad}")
        self.weight_version = int(version)
        return stats

    def _transfer_transport(self) -> TransferEngineTransport:
        if self._transfer is None:
            sizes = [int(r["world_size"]) for r in self._all("/get_world_size")]
            client = ServersSyncClient(self.urls, sizes, timeout_s=self.timeout, headers=self._headers)
            self._transfer = TransferEngineTransport(self.weight_sync, client, 1 + sum(sizes), self.master_address,
                                                     timeout_s=self.timeout)
        return self._transfer

    def _vllm_reload_steps(self) -> dict:
        """The shm route into vLLM servers: our worker extension's reload methods through `/collective_rpc`."""

        def rpc(method: str, **kwargs):
            try:
                self._all("/collective_rpc", {"method": method, "kwargs": kwargs, "timeout": self.timeout})
            except RolloutError as exc:
                raise RolloutError(f"{exc} (the /dev/shm weight sync needs the server started with VLLM_SERVER_DEV_MODE=1 "
                                   "and --worker-extension-cls rollout.worker_extension.WeightSyncExtension, as "
                                   "`alignment rollout serve` does, on the trainer's host; else use "
                                   "rollout.weight_sync: gloo)") from None

        return {"begin": lambda: rpc("rollout_begin_reload"),
                "load": lambda path: rpc("rollout_load_file", path=path, delete=False),  # every server reads it
                "finish": lambda: rpc("rollout_finish_reload")}

    def _json_reload_steps(self, version: int) -> dict:
        """The shm route into our JSON server: one /update_weights call per step."""
        return {"begin": lambda: self._all("/update_weights", {"paths": [], "begin": True, "finish": False}),
                "load": lambda path: self._all("/update_weights", {"paths": [path], "begin": False, "finish": False}),
                "finish": lambda: self._all("/update_weights", {"paths": [], "begin": False, "finish": True,
                                                                "version": int(version)})}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._requests.shutdown(wait=False, cancel_futures=True)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The message inside an error reply: ours ({"error": "..."}), vLLM's ({"error": {"message": ...}}) or FastAPI's
    ({"detail": ...})."""
    try:
        body = json.loads(exc.read())
    except Exception:
        return str(exc.reason)
    detail = body.get("error") or body.get("detail") or body.get("message") or body
    return str(detail.get("message", detail) if isinstance(detail, dict) else detail)
