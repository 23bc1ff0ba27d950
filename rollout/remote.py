"""RemoteEngine: the RolloutEngine interface over one or more rollout servers (rollout.server).

Prompts are split into contiguous shards, one per server, sent concurrently (data parallel), and the
samples come back in prompt order. Every request has a timeout: a dead or hung server raises
`alignment.errors.RolloutError` naming the server, never a silent hang.

Weight sync: `weight_sync="shm"` writes chunked safetensors files in the trainer's /dev/shm that every server
loads (servers on the trainer's host only); "gloo" (TCP, any host) or "nccl" (GPUs) stream the weights through
vLLM's weight-transfer API, the servers' workers joining one transfer group with this process.
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
from rollout.types import Sample, SamplingConfig, SyncStats
from rollout.weight_sync import (
    DEFAULT_CHUNK_BYTES,
    ServersSyncClient,
    ShmTransport,
    TransferEngineTransport,
    as_weight_source,
    local_address_towards,
)


class RemoteEngine:
    """Client over rollout servers.

    urls: one URL or a list (e.g. "http://127.0.0.1:8000").
    timeout: seconds to wait for any one answer (generation of a whole shard included).
    wait_ready: if > 0, poll /health of every server for up to this many seconds before returning.
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        timeout: float = 300.0,
        wait_ready: float = 0.0,
        shm_dir: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        weight_sync: str = "shm",
        master_address: str | None = None,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise RolloutError("RemoteEngine needs at least one rollout server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = float(timeout)
        self.weight_version = 0
        self._shm = ShmTransport(shm_dir, chunk_bytes)
        self.weight_sync = weight_sync
        self.master_address = master_address or local_address_towards(self.urls[0])
        self._transfer = None  # built at the first sync, when every server is up
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="rollout-remote")
        if wait_ready > 0:
            self.wait_ready(wait_ready)
            self.weight_version = self.health(self.urls[0])["weight_version"]

    def _transfer_transport(self) -> TransferEngineTransport:
        if self._transfer is None:
            sizes = [int(r["world_size"]) for r in self._all("/get_world_size")]
            client = ServersSyncClient(self.urls, sizes, timeout_s=self.timeout)
            self._transfer = TransferEngineTransport(self.weight_sync, client, 1 + sum(sizes), self.master_address,
                                                     timeout_s=self.timeout)
        return self._transfer

    # ------------------------------------------------------------------------------ HTTP
    def _request(self, url: str, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            url + path, data=data, method="GET" if data is None else "POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except Exception:
                detail = exc.reason
            raise RolloutError(f"rollout server {url} failed on {path} (HTTP {exc.code}): {detail}") from None
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

    def health(self, url: str | None = None) -> dict:
        return self._request(url or self.urls[0], "/health", timeout=min(self.timeout, 10.0))

    def wait_ready(self, seconds: float) -> None:
        """Poll every server's /health until all answer, or raise RolloutError after `seconds`."""
        deadline = time.monotonic() + seconds
        for url in self.urls:
            while True:
                try:
                    self._request(url, "/health", timeout=5.0)
                    break
                except RolloutError as exc:
                    if time.monotonic() > deadline:
                        raise RolloutError(f"rollout server {url} was not ready within {seconds:g} s: {exc}") from None
                    time.sleep(0.5)

    # ------------------------------------------------------------------------------ interface
    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        if not prompts:
            return []
        k = min(len(self.urls), len(prompts))
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        futures = []
        for j in range(k):
            lo, hi = bounds[j], bounds[j + 1]
            shard_sampling = SamplingConfig.from_dict(sampling.to_dict())
            if shard_sampling.seed is not None:
                shard_sampling.seed += lo  # prompt i keeps seed + i whatever the split
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

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Send the weights to every server (see the module docstring); later samples carry `version`."""
        if self.weight_sync != "shm":
            try:
                stats = self._transfer_transport().send(as_weight_source(named_tensors))
            except RolloutError:
                raise
            except Exception as exc:
                raise RolloutError(f"weight sync ({self.weight_sync}) to {', '.join(self.urls)} failed: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
            # vLLM's trainer engine finishes the round without a version: tag it on every server
            replies = self._all("/update_weight_version", {"weight_version": str(int(version))})
            self._check_versions(replies, version)
            self.weight_version = int(version)
            return stats
        return self._update_through_shm(named_tensors, version)

    def _update_through_shm(self, named_tensors, version: int) -> SyncStats:
        """Write chunks to shm and have every server load each one; the chunk files are removed here."""

        def begin():
            self._all("/update_weights", {"paths": [], "begin": True, "finish": False})

        def load(path: str):
            self._all("/update_weights", {"paths": [path], "begin": False, "finish": False, "delete": False})

        def finish():
            replies = self._all("/update_weights", {"paths": [], "begin": False, "finish": True, "version": int(version)})
            self._check_versions(replies, version)

        stats = self._shm.send(named_tensors, begin=begin, load=load, finish=finish)
        self.weight_version = int(version)
        return stats

    def _check_versions(self, replies: list[dict], version: int) -> None:
        bad = [(u, r["weight_version"]) for u, r in zip(self.urls, replies) if r["weight_version"] != int(version)]
        if bad:
            raise RolloutError(f"rollout servers report the wrong weight version after sync: {bad}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
