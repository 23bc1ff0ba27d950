"""Moving trainer weights into rollout engines.

Two pieces:

* **Sources** — `named_tensors(model)` yields `(hf_name, tensor)` pairs from a trainer model: a plain
  `nn.Module`, a DDP/DeepSpeed wrapper, or a DeepSpeed ZeRO-3 engine whose parameters are sharded
  (gathered one module at a time, so at most one layer is ever whole in memory). Under ZeRO-3 every
  rank must iterate it (the gathers are collectives); only rank 0 receives tensors.
  `sync_weights(engine, model, version)` does that dance on all ranks.
* **Transports** — how the tensors reach the engine:
  - `ShmTransport` (CPU / same host): safetensors files in /dev/shm, written in chunks of about
    `chunk_bytes` (write to a temp name, then rename), each loaded by the vLLM worker extension
    inside one layerwise-reload session and deleted. Memory stays bounded by one chunk.
  - `TransferEngineTransport`: vLLM's weight-transfer API, `nccl` on GPUs or our `gloo` over TCP (CPUs, engines on
    other hosts), streaming the gathered layers into fixed-size buckets; `ipc` for an engine on the trainer's GPU.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from alignment.errors import RolloutError
from rollout.types import SyncStats, tensor_bytes

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
NCCL_BUFFER_BYTES = 64 * 2**20  # each of the two packed buffers of an nccl sync (GPU links saturate well below it)
# gloo's buckets (rollout/gloo_transfer.py), 16 MiB: a 103M model synced in 0.38-0.43 s on loopback here, against
# 0.59-0.67 s with 64 MiB buckets (smaller messages pipeline better, and the workers load one while the next arrives);
# benchmarks/bench_weight_sync.py. Here, where the memory plan reads it without importing vLLM.
GLOO_BUCKET_BYTES = 16 * 2**20
IPC_BUFFER_BYTES = 2**30  # vLLM's default packed IPC buffer; raised to the largest tensor (see `ipc_buffer_bytes`)


def ipc_buffer_bytes(metadata) -> int:
    """The packed CUDA-IPC buffer for these weights: vLLM's 1 GiB, or the largest tensor when that is larger. vLLM's
    producer refuses any tensor larger than its buffer (Qwen2.5-7B's embedding in bf16 is 1.02 GiB)."""
    return max(IPC_BUFFER_BYTES, max((tensor_bytes(m.dtype, m.shape) for m in metadata), default=0))


# --------------------------------------------------------------------------------------------- sources


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DeepSpeed engine / DDP wrapper (both keep it in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_zero3(model: torch.nn.Module) -> bool:
    """True when the parameters are ZeRO-3 partitioned (DeepSpeed tags them with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in _unwrap(model).parameters())


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def named_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every parameter of a trainer model, with HF checkpoint names.

    Plain modules: the parameters themselves (detached, no copy). ZeRO-3: every rank must run the
    whole iteration in the same order (each module's parameters are gathered with
    `deepspeed.zero.GatheredParameters`, a collective); rank 0 gets full copies one module at a
    time, the other ranks get nothing. `dtype` casts what is yielded (e.g. to the engine's dtype), `device` moves
    it (an export streams each gathered module to the CPU: the whole model never sits on one GPU).
    Shared (tied) parameters are yielded once, under their first name, like `named_parameters()`.
    """
    model = _unwrap(model)
    cast = (lambda t: t.to(device=device, dtype=dtype)) if dtype is not None or device is not None else (lambda t: t)
    if hasattr(model, "merge_adapter"):  # a peft model: the engine serves the base weights with LoRA merged in
        yield from _merged_lora_tensors(model, cast)
        return
    if not is_zero3(model):
        for name, p in model.named_parameters():
            yield name, cast(p.detach())
        return

    import deepspeed

    rank0 = _rank() == 0
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if rank0:
                # Copy inside the context: the full data is released again when it exits.
                batch = [(f"{mod_name}.{n}" if mod_name else n, _copy(cast(p.detach()), p)) for n, p in own]
            else:
                batch = []
        yield from batch


def _copy(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`t` itself when casting already copied `param`'s data, else a copy (the gathered data is freed on exit)."""
    return t.clone() if t.data_ptr() == param.data_ptr() else t


def _merged_lora_tensors(model: torch.nn.Module, cast) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the base weights with the active LoRA deltas merged in, under the plain HF names.

    Merged tensors are built out of place, W + sum_a delta_a in float32 and rounded once to W's dtype; the model's
    own weights are never touched. (peft's merge_adapter / unmerge_adapter work in place, W += d then W -= d, which
    in bf16 rounds twice per sync and drifts the frozen base weights a little further at every sync.)
    ZeRO-3 + LoRA is rejected by the PPO stage: merging needs whole weights on every rank.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[int, torch.Tensor] = {}  # id(base parameter) -> its merged value
    for mod_name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if any(a in module.lora_variant for a in adapters):
            raise ValueError(f"{mod_name}: LoRA variants (e.g. DoRA) cannot be merged for weight sync; use plain LoRA")
        layer = module.get_base_layer()
        weight = layer.weight.detach()
        merged[id(layer.weight)] = (
            weight.float() + sum(module.get_delta_weight(a).float() for a in adapters)
        ).to(weight.dtype)
        if any(module.lora_bias.get(a, False) for a in adapters):
            bias = layer.bias.detach()
            merged[id(layer.bias)] = (
                bias.float() + sum(module.lora_B[a].bias.float() * module.scaling[a] for a in adapters if module.lora_bias[a])
            ).to(bias.dtype)
    for name, p in _base_parameters(model):
        yield name, cast(merged.get(id(p), p.detach()))


def _base_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """A peft model's base parameters under their plain HF names (adapter tensors left out)."""
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            yield name.replace(".base_layer", ""), p


def sync_weights(engine, model: torch.nn.Module, version: int, dtype: torch.dtype | None = None) -> SyncStats | None:
    """Push `model`'s weights into `engine` as `version`; call it on every rank.

    Rank 0 streams the tensors into `engine.update_weights`; under ZeRO-3 the other ranks iterate the
    same gathers so the collectives line up. Returns the SyncStats on rank 0, None elsewhere.
    """
    if _rank() == 0:
        return engine.update_weights(ModelWeights(model, dtype), version)
    for _ in named_tensors(model, dtype=dtype):
        pass
    return None


# ------------------------------------------------------------------------------------------ shm files


def default_shm_dir() -> str:
    """/dev/shm where it exists and is writable (RAM-backed), else the temp directory."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


CHUNK_PREFIX = "rollout-weights"
CHUNK_NAME = re.compile(re.escape(CHUNK_PREFIX) + r"-\d+-[0-9a-f]{8}-\d{5}\.safetensors")  # see write_chunks


def check_chunk_path(path: str) -> str:
    """`path` resolved, if it names a weight chunk `write_chunks` writes in this host's shm directory: inside it (no
    `..`, no symbolic link out of it or in it), with the chunk naming pattern. Anything else is a ValueError, raised
    before the file is read or removed: the servers' load routes take paths from their callers."""
    directory = os.path.realpath(default_shm_dir())
    resolved = os.path.realpath(path)
    if (os.path.islink(path) or os.path.dirname(resolved) != directory
            or not CHUNK_NAME.fullmatch(os.path.basename(resolved))):
        raise ValueError(f"refused to load {path!r}: only the weight chunks the trainer writes are loaded "
                         f"({directory}/{CHUNK_PREFIX}-<pid>-<id>-<n>.safetensors)")
    return resolved


@dataclass
class ChunkFile:
    path: str
    bytes: int
    tensors: int


def write_chunks(
    pairs: Iterable[tuple[str, torch.Tensor]],
    directory: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefix: str = CHUNK_PREFIX,
) -> Iterator[ChunkFile]:
    """Write `pairs` into safetensors files of about `chunk_bytes` each and yield them one at a time.

    Each file is written under a temporary name and renamed, so a reader never sees half a file.
    The consumer loads (and may delete) a chunk before asking for the next; whatever is left of a
    chunk when the consumer comes back — or when the generator is closed early — is removed here.
    """
    from safetensors.torch import save_file

    directory = directory or default_shm_dir()
    tag = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    batch: dict[str, torch.Tensor] = {}
    size = 0
    index = 0

    def flush() -> ChunkFile:
        nonlocal batch, size, index
        path = os.path.join(directory, f"{tag}-{index:05d}.safetensors")
        tmp = path + ".tmp"
        try:
            save_file(batch, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        chunk = ChunkFile(path, size, len(batch))
        batch, size, index = {}, 0, index + 1
        return chunk

    for name, tensor in pairs:
        if name in batch:
            raise ValueError(f"tensor {name!r} appears twice in one weight sync")
        # safetensors wants contiguous CPU tensors that share no storage (a view gets its own copy).
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        batch[name] = t
        size += t.nbytes
        if size >= chunk_bytes:
            yield from _handed_out(flush())
    if batch:
        yield from _handed_out(flush())


def _handed_out(chunk: ChunkFile) -> Iterator[ChunkFile]:
    """Yield a chunk file to the consumer, then delete it whatever the consumer did with it."""
    try:
        yield chunk
    finally:
        if os.path.exists(chunk.path):
            os.remove(chunk.path)


def load_file_weights(path: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return list(load_file(path).items())


class ShmTransport:
    """CPU / same-host transport: chunked safetensors files in /dev/shm.

    `send(pairs, begin, load, finish)` writes chunk after chunk and hands each path to `load`
    (which loads it into the engine, e.g. through the worker extension or an HTTP call); `begin` and
    `finish` open and close the engine's reload session. Returns the timed SyncStats.
    """

    def __init__(self, directory: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.directory = directory or default_shm_dir()
        self.chunk_bytes = int(chunk_bytes)

    def check_space(self, weights) -> None:
        """Stop before writing when the directory cannot hold one chunk (containers give /dev/shm 64 MB by
        default): a chunk of `chunk_bytes`, or the whole model when it is smaller (known from its metadata)."""
        need = self.chunk_bytes
        if hasattr(weights, "metadata"):
            need = min(need, sum(tensor_bytes(m.dtype, m.shape) for m in weights.metadata()))
        if shutil.disk_usage(self.directory).free < need:
            raise RolloutError(self._no_space(need))

    def _no_space(self, need: int) -> str:
        free = shutil.disk_usage(self.directory).free
        return (f"weight sync: {self.directory} has {free / 2**20:.0f} MiB free, a chunk of the weights needs "
                f"{need / 2**20:.0f} MiB; enlarge it (docker run --shm-size=2g, or a larger tmpfs) or use "
                "rollout.weight_sync: gloo, which needs no shared memory")

    def send(
        self,
        pairs: Iterable[tuple[str, torch.Tensor]],
        begin: Callable[[], None],
        load: Callable[[str], None],
        finish: Callable[[], None],
    ) -> SyncStats:
        start = time.perf_counter()
        total, count = 0, 0
        self.check_space(pairs)
        begin()
        try:
            for chunk in write_chunks(pairs, self.directory, self.chunk_bytes):
                load(chunk.path)
                total += chunk.bytes
                count += chunk.tensors
        except Exception as exc:  # OSError from Python, SafetensorError ("os error 28") from safetensors' writer
            if getattr(exc, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(exc):
                raise RolloutError(self._no_space(self.chunk_bytes)) from None
            raise
        if count == 0:
            raise ValueError("weight sync got no tensors")
        finish()
        return SyncStats(bytes=total, seconds=time.perf_counter() - start, tensors=count)


# ------------------------------------------------------------------------------------------ vLLM's weight-transfer API


class ModelWeights:
    """A trainer model's weights as vLLM's `WeightSource` protocol wants them: `metadata()` (names, dtypes and full
    shapes, read without gathering anything) and iteration (`named_tensors`, gathered layer by layer under ZeRO-3),
    in the same order. Plain iteration is all the shm transport needs."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None):
        self.model, self.dtype = model, dtype
        self._metadata: list | None = None  # read once per sync (the transport and the backend both ask)

    def metadata(self) -> list:
        if self._metadata is None:
            self._metadata = self._read_metadata()
        return self._metadata

    def _read_metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        model = _unwrap(self.model)
        if hasattr(model, "merge_adapter"):  # peft: the base weights under their plain names (see named_tensors)
            params = list(_base_parameters(model))
        else:
            params = list(model.named_parameters())
        # ZeRO-3 keeps the full shape in ds_shape (the local tensor is a flat shard)
        return [ParamMeta(n, self.dtype or p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in params]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return named_tensors(self.model, dtype=self.dtype)


class PairsWeights:
    """A weight source over already materialised `(name, tensor)` pairs (metadata read from them)."""

    def __init__(self, pairs: Iterable[tuple[str, torch.Tensor]]):
        self.pairs = list(pairs)

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.pairs)


def as_weight_source(weights):
    """`weights` itself when it declares its metadata (ModelWeights), else its pairs materialised."""
    return weights if hasattr(weights, "metadata") else PairsWeights(weights)


def local_address_towards(url: str) -> str:
    """This host's address on the route to `url`'s host (what a server there can reach us at)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


class TransferEngineTransport:
    """Trainer side of vLLM's weight-transfer API: `nccl` (GPUs), `gloo` (TCP: CPUs, other hosts; ours, in
    rollout/gloo_transfer.py), through `WeightTransferTrainerFactory`, or `ipc` (CUDA IPC into an engine colocated on
    the trainer's GPU: packed into one bounded buffer, handed over by handle; see `_ipc_trainer_class`).

    `client` is a `VLLMWeightSyncClient`: the in-process `vllm.LLM` (wrapped by `LLMSyncClient`) or servers'
    HTTP routes (`ServersSyncClient`). `world_size` = 1 (this trainer rank) + every worker behind the client. The
    first `send` rendezvouses (this process hosts the store on a free port of `master_address`, which the workers
    must reach); each send then streams the model from the ZeRO-3 gather straight into the transfer's buckets.
    Only trainer rank 0 uses it; other ranks merely iterate `named_tensors` (see `sync_weights`).
    """

    def __init__(self, backend: str, client, world_size: int, master_address: str = "127.0.0.1",
                 timeout_s: float = 600.0):
        self.backend, self.client, self.world_size = backend, client, int(world_size)
        self.master_address, self.timeout_s = master_address, float(timeout_s)
        self._engine = None

    def _connect(self, weights) -> None:
        import socket

        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from rollout.gloo_transfer import GlooTrainerInitInfo, register

        if self.backend in ("nccl", "ipc") and not torch.cuda.is_available():
            raise RuntimeError(f"weight sync '{self.backend}' needs CUDA on the trainer; on CPU use 'gloo'")
        if self.backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            # packed: the weights travel through one bounded buffer, never all copied on the GPU at once
            info = IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=ipc_buffer_bytes(weights.metadata()), rank=0)
            self._engine = _ipc_trainer_class().trainer_init(info, client=self.client, source=weights)
            return
        register()
        with socket.socket() as s:  # a free port on the address the workers will dial
            s.bind((self.master_address, 0))
            port = s.getsockname()[1]
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            # vLLM's default buffers are 2 x 1 GiB on the trainer's GPU, beside the training state
            info = NCCLTrainerInitInfo(master_address=self.master_address, master_port=port, world_size=self.world_size,
                                       packed_buffer_size_bytes=NCCL_BUFFER_BYTES, rank=0)
        else:
            info = GlooTrainerInitInfo(master_address=self.master_address, master_port=port, world_size=self.world_size,
                                       timeout_s=self.timeout_s, rank=0)
        self._engine = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=weights)

    def send(self, weights: ModelWeights) -> SyncStats:
        """Connect (first time) and send `weights`, all within `timeout_s`, else a RolloutError."""
        start = time.perf_counter()
        meta = weights.metadata()
        if not meta:
            raise ValueError("weight sync got no tensors")
        _within(self.timeout_s, lambda: self._connect_and_send(weights), on_timeout=self._abort,
                what=f"weight sync ({self.backend})")
        nbytes = sum(tensor_bytes(m.dtype, m.shape) for m in meta)
        return SyncStats(bytes=nbytes, seconds=time.perf_counter() - start, tensors=len(meta))

    def _connect_and_send(self, weights: ModelWeights) -> None:
        if self._engine is None:
            self._connect(weights)
        self._engine.source = weights
        self._engine.send_weights()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _abort(self) -> None:
        """After a timeout: tear the transfer down (NCCL: ncclCommAbort, which frees the stuck kernels), best effort."""
        engine, self._engine = self._engine, None
        if engine is not None:
            threading.Thread(target=engine.shutdown, daemon=True).start()


def _within(seconds: float, work: Callable[[], None], on_timeout: Callable[[], None], what: str) -> None:
    """Run `work` and wait for it at most `seconds`; past that call `on_timeout` and raise a RolloutError.

    Only gloo's collectives have a timeout of their own: vLLM's NCCL communicator and its CUDA-IPC path wait forever
    for a peer that died mid-transfer (and `LLM.update_weights` calls its workers without a timeout), so the wait is
    bounded here. `work` runs in a daemon thread on the caller's CUDA device (a new thread starts on device 0, where
    another rank's GPU would be); a thread stuck past the timeout is left behind as the run stops.
    """
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    outcome: list[BaseException | None] = []

    def run() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        try:
            work()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            outcome.append(exc)

    thread = threading.Thread(target=run, name="weight-sync", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        on_timeout()
        raise RolloutError(f"{what} did not finish within {seconds:g} s (rollout.timeout_s): a rollout engine died or "
                           "hangs mid-transfer; the transfer cannot be resumed, so the run stops")
    if outcome[0] is not None:
        raise outcome[0]


def _ipc_trainer_class():
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerWeightTransferEngine

    class ColocatedIPCTrainer(IPCTrainerWeightTransferEngine):
        """vLLM's CUDA-IPC trainer engine for an engine colocated with trainer rank 0, the only rank that sends.

        vLLM's engine expects every trainer rank to send (FSDP: each holds the whole gathered tensor) and all-gathers
        the handles over the default process group. Here the other ranks never call it (they only run their ZeRO-3
        gathers, in `sync_weights`) and the engine reads rank 0's GPU alone, so there is nothing to gather: that
        all-gather would wait for ranks that never come."""

        def _all_gather_and_merge_handles(self, handles):
            return handles

        @staticmethod
        def _post_send_sync() -> None:
            torch.cuda.ipc_collect()

    return ColocatedIPCTrainer


class LLMSyncClient:
    """Adapts an in-process `vllm.LLM` to vLLM's `VLLMWeightSyncClient` protocol (four methods)."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


class ServersSyncClient:
    """`VLLMWeightSyncClient` over several servers' weight-transfer HTTP routes (a stock `vllm serve` in dev mode, or
    `alignment rollout serve`), driven as one: every call goes to all of them at once (their workers meet in the same
    collectives), and each server's workers take their own ranks after those of the servers before it. `headers` go
    with every request (the servers' secret: rollout/auth.py)."""

    def __init__(self, urls: list[str], world_sizes: list[int], timeout_s: float, headers: dict[str, str] | None = None):
        self.clients = [_http_sync_client(u, timeout_s, headers or {}) for u in urls]
        self.world_sizes = world_sizes

    def _all(self, call) -> None:
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            for future in [pool.submit(call, i, c) for i, c in enumerate(self.clients)]:
                future.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offsets = [init_info["rank_offset"] + sum(self.world_sizes[:i]) for i in range(len(self.clients))]
        self._all(lambda i, c: c.init_weight_transfer_engine({**init_info, "rank_offset": offsets[i]}))

    def start_weight_update(self) -> None:
        self._all(lambda i, c: c.start_weight_update())

    def update_weights(self, update_info) -> None:
        self._all(lambda i, c: c.update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda i, c: c.finish_weight_update(weight_version))


def _http_sync_client(url: str, timeout_s: float, headers: dict[str, str]):
    """vLLM's HTTP weight-sync client for one server, sending `headers` with each request (vLLM's sends none)."""
    import requests
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

    class WithHeaders(HTTPVLLMWeightSyncClient):
        def _post(self, path: str, json: dict | None = None) -> None:
            requests.post(f"{self.base_url}/{path}", json=json, timeout=self.timeout, headers=headers).raise_for_status()

    return WithHeaders(url, timeout=timeout_s)
