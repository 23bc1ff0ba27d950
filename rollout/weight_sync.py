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
  - `NCCLTransport` (GPU, disaggregated): vLLM 0.32's native weight-transfer API over NCCL.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from rollout.types import SyncStats

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


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
    for name, p in base.named_parameters():
        if "lora_" not in name:
            yield name.replace(".base_layer", ""), cast(merged.get(id(p), p.detach()))


def sync_weights(engine, model: torch.nn.Module, version: int, dtype: torch.dtype | None = None) -> SyncStats | None:
    """Push `model`'s weights into `engine` as `version`; call it on every rank.

    Rank 0 streams the tensors into `engine.update_weights`; under ZeRO-3 the other ranks iterate the
    same gathers so the collectives line up. Returns the SyncStats on rank 0, None elsewhere.
    """
    if _rank() == 0:
        return engine.update_weights(named_tensors(model, dtype=dtype), version)
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


@dataclass
class ChunkFile:
    path: str
    bytes: int
    tensors: int


def write_chunks(
    pairs: Iterable[tuple[str, torch.Tensor]],
    directory: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefix: str = "rollout-weights",
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

    def send(
        self,
        pairs: Iterable[tuple[str, torch.Tensor]],
        begin: Callable[[], None],
        load: Callable[[str], None],
        finish: Callable[[], None],
    ) -> SyncStats:
        start = time.perf_counter()
        total, count = 0, 0
        begin()
        for chunk in write_chunks(pairs, self.directory, self.chunk_bytes):
            load(chunk.path)
            total += chunk.bytes
            count += chunk.tensors
        if count == 0:
            raise ValueError("weight sync got no tensors")
        finish()
        return SyncStats(bytes=total, seconds=time.perf_counter() - start, tensors=count)


# ------------------------------------------------------------------------------------------ NCCL (GPU)


class _LLMSyncClient:
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


class _PairsSource:
    """A vLLM `WeightSource` over one round's `(name, tensor)` pairs (materialised once per round)."""

    def __init__(self):
        self.pairs: list[tuple[str, torch.Tensor]] = []

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

    def __iter__(self):
        return iter(self.pairs)


class NCCLTransport:
    """GPU transport over vLLM 0.32's native weight-transfer API (NCCL broadcast). Needs CUDA.

    Setup (disaggregated: the trainer and the vLLM workers sit on *different* GPUs; NCCL refuses
    two ranks on one device — for one shared GPU use vLLM's "ipc" backend instead):

    1. Start the engine with the NCCL backend enabled:
       `VLLMEngine(model, weight_transport="nccl")` (which passes
       `weight_transfer_config=WeightTransferConfig(backend="nccl")` to `vllm.LLM`), or a server
       `vllm serve MODEL --weight-transfer-config '{"backend": "nccl"}'` in dev mode
       (`VLLM_SERVER_DEV_MODE=1`), which exposes `/init_weight_transfer_engine`,
       `/start_weight_update`, `/update_weights`, `/finish_weight_update`.
    2. On trainer rank 0 (its CUDA device current), build the transport with a client — the
       in-process `vllm.LLM` (wrapped automatically) or
       `vllm.distributed.weight_transfer.clients.HTTPVLLMWeightSyncClient(url)` — and a free TCP
       port; `world_size` = 1 (trainer) + the engine's TP x PP x DP workers.
       `connect()` rendezvouses: the workers join the NCCL group (ranks 1..) while the trainer
       opens rank 0.
    3. Each sync, `send(pairs, version)`: the workers start a layerwise reload, receive the
       broadcast (packed into ~1 GB buffers by default) and `load_weights` as it arrives, then
       finish the reload; the version is recorded on the engine.
    Other trainer ranks do not call this; under ZeRO-3 they only iterate `named_tensors(model)`.
    """

    def __init__(
        self,
        client,
        master_address: str = "127.0.0.1",
        master_port: int = 29555,
        world_size: int = 2,
        packed: bool = True,
    ):
        if not hasattr(client, "start_weight_update"):
            raise TypeError("client must be a vllm.LLM or a VLLMWeightSyncClient")
        if type(client).__name__ == "LLM":
            client = _LLMSyncClient(client)
        self.client = client
        self.master_address = master_address
        self.master_port = int(master_port)
        self.world_size = int(world_size)
        self.packed = packed
        self._source = _PairsSource()
        self._engine = None

    def connect(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("NCCLTransport needs CUDA; on CPU use ShmTransport")
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        info = NCCLTrainerInitInfo(
            master_address=self.master_address,
            master_port=self.master_port,
            world_size=self.world_size,
            packed=self.packed,
            rank=0,
        )
        self._engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=self._source)

    def send(self, pairs: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        if self._engine is None:
            self.connect()
        start = time.perf_counter()
        device = torch.device("cuda", torch.cuda.current_device())
        self._source.pairs = [(n, t.detach().to(device)) for n, t in pairs]
        if not self._source.pairs:
            raise ValueError("weight sync got no tensors")
        try:
            self._engine.send_weights()
            torch.cuda.synchronize()
        finally:
            nbytes = sum(t.nbytes for _, t in self._source.pairs)
            count = len(self._source.pairs)
            self._source.pairs = []
        return SyncStats(bytes=nbytes, seconds=time.perf_counter() - start, tensors=count)
