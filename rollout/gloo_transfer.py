"""Weight transfer over torch.distributed's gloo backend (TCP), as a backend of vLLM's weight-transfer API.

vLLM ships NCCL and CUDA-IPC backends; neither reaches an engine on a CPU, or on a host the trainer shares no GPU
fabric with. This backend does, over plain TCP, through the same lifecycle (`init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update`) and the same clients (in-process `vllm.LLM`, the
HTTP routes of a server), so the CPU tests exercise the code path GPU users run with `nccl`.

- Worker side: `GlooWeightTransferEngine`, registered as "gloo" into vLLM's `WeightTransferEngineFactory` by our
  vLLM plugin (rollout/vllm_plugin.py, an entry point in pyproject.toml), so any vLLM process, a stock
  `vllm serve` included, can load it. It receives fixed-size buckets by broadcast from the trainer (rank 0 of a gloo group of
  its own) and loads them through vLLM's layerwise reload, the next bucket already on the wire while one loads.
- Trainer side: `GlooTrainerWeightTransferEngine`, registered likewise into `WeightTransferTrainerFactory`. It packs
  the tensors of a `WeightSource` (gathered layer by layer under ZeRO-3: the whole model is never in one place)
  into two alternating buckets, filling one while the other is sent.

Both sides derive the bucket plan from the update's metadata (names, dtypes, shapes), so only metadata travels
over HTTP. Before the first bucket they agree on that plan (`TransferPlan`, broadcast by the trainer, then a MIN
all-reduce of every worker's verdict): a worker that joined with another bucket size, or was told of other tensors
than the trainer sends (a client driving the routes itself), refuses before it loads anything, and the trainer says
so at once; gloo itself would fill the larger buffer partly and return. Every collective has the group's timeout: a
dead peer is an error after `timeout_s`, never a hang.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rollout.types import tensor_bytes
from rollout.weight_sync import GLOO_BUCKET_BYTES

BACKEND = "gloo"
DEFAULT_TIMEOUT_S = 600.0


def register() -> None:
    """Make "gloo" a weight-transfer backend in this process (our vLLM plugin does it in every vLLM process);
    registering twice is harmless."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, __name__, "GlooTrainerWeightTransferEngine")


# --------------------------------------------------------------------------------------------- shared


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """What a worker needs to join the trainer's group: the trainer's TCPStore, its rank offset in the group
    (1 + the workers of the servers before it), the group's size, the timeout and the bucket size."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    bucket_bytes: int = GLOO_BUCKET_BYTES


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def _group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group of its own (not the default group): rank 0 hosts the rendezvous store."""
    timeout = timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                                       wait_for_workers=False)
    return torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)


def plan_buckets(dtypes: list[torch.dtype], shapes: list[list[int]], bucket_bytes: int) -> list[list[int]]:
    """Indices of the tensors in each bucket, in order: consecutive tensors while they fit `bucket_bytes` (a larger
    tensor travels alone). Both sides compute it from the same metadata."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, (dtype, shape) in enumerate(zip(dtypes, shapes)):
        nbytes = tensor_bytes(dtype, shape)
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def _broadcast(group, buffer: torch.Tensor):
    return group.broadcast([buffer], torch.distributed.BroadcastOptions())


@dataclass(frozen=True)
class TransferPlan:
    """What one update moves, as each side computes it from the metadata and its bucket size."""

    tensors: int
    bytes: int
    buckets: int
    bucket_bytes: int

    @classmethod
    def of(cls, dtypes: list[torch.dtype], shapes: list[list[int]], bucket_bytes: int) -> TransferPlan:
        return cls(len(dtypes), sum(tensor_bytes(d, s) for d, s in zip(dtypes, shapes)),
                   len(plan_buckets(dtypes, shapes, bucket_bytes)), bucket_bytes)

    def describe(self) -> str:
        return f"{self.tensors} tensors, {self.bytes} bytes in {self.buckets} buckets of up to {self.bucket_bytes} bytes"


def exchange_plan(group, own: TransferPlan, is_trainer: bool) -> tuple[TransferPlan, bool]:
    """The trainer (rank 0) broadcasts its plan; every rank reports whether it is its own (a MIN all-reduce).
    Returns the trainer's plan and whether every rank agreed with it."""
    header = torch.tensor(astuple(own) if is_trainer else (0, 0, 0, 0), dtype=torch.int64)
    _broadcast(group, header).wait()
    announced = TransferPlan(*header.tolist())
    verdict = torch.tensor([int(announced == own)], dtype=torch.int64)
    options = torch.distributed.AllreduceOptions()
    options.reduceOp = torch.distributed.ReduceOp.MIN
    group.allreduce([verdict], options).wait()
    return announced, bool(verdict.item())


# --------------------------------------------------------------------------------------------- worker side


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Receives dense checkpoint-format weights by gloo broadcast and loads them with vLLM's layerwise reload."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = GLOO_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        worker_rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.group = _group(init_info.master_address, init_info.master_port, init_info.rank_offset + worker_rank,
                            init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from rollout.worker_extension import reprocess_shared_weight_layers

        finalize_layerwise_reload(self.model, self.model_config)
        reprocess_shared_weight_layers(self.model)  # tied embeddings: the head's kernels follow the new weight

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which fails where there is no accelerator; the
        # weights are loaded synchronously below (and copied onto an accelerator by load_weights when there is one).
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        dtypes = [getattr(torch, name) for name in update_info.dtype_names]
        own = TransferPlan.of(dtypes, update_info.shapes, self.bucket_bytes)
        announced, agreed = exchange_plan(self.group, own, is_trainer=False)
        if announced != own:
            raise ValueError(f"gloo weight transfer refused, nothing loaded: the trainer sends {announced.describe()}, "
                             f"this worker was told of {own.describe()} (its update info and the bucket size it joined "
                             "with differ from the trainer's)")
        if not agreed:
            raise ValueError("gloo weight transfer refused, nothing loaded: another worker expects another transfer "
                             "than the trainer's (see that worker's error)")
        buckets = plan_buckets(dtypes, update_info.shapes, self.bucket_bytes)

        def post(bucket):  # a fresh buffer per bucket: the reload may keep views of it until a layer is complete
            buffer = torch.empty(sum(tensor_bytes(dtypes[i], update_info.shapes[i]) for i in bucket), dtype=torch.uint8)
            return buffer, _broadcast(self.group, buffer)

        with disable_mtp_completeness_check():
            pending = post(buckets[0]) if buckets else None
            for k, bucket in enumerate(buckets):
                buffer, work = pending
                work.wait()
                pending = post(buckets[k + 1]) if k + 1 < len(buckets) else None  # on the wire while this one loads
                tensors, offset = [], 0
                for i in bucket:
                    n = tensor_bytes(dtypes[i], update_info.shapes[i])
                    tensors.append((update_info.names[i], buffer[offset:offset + n].view(dtypes[i]).view(update_info.shapes[i])))
                    offset += n
                self.model.load_weights(tensors)

    def shutdown(self) -> None:
        self.group = None


# --------------------------------------------------------------------------------------------- trainer side


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer's end: it hosts the TCPStore at master_address:master_port (an address the workers can reach)
    as rank 0 of a group of `world_size` (1 + every worker of every engine)."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    bucket_bytes: int = GLOO_BUCKET_BYTES


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Sends a `WeightSource` to the workers by gloo broadcast, bucket by bucket, packing the next bucket while the
    last is on the wire. Non-sender trainer ranks only iterate the source (ZeRO-3 gathers are collectives)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = GLOO_BUCKET_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None
        self.last_bytes = 0  # bytes of the last send_weights (the sender's)

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo trainer weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(init_info.master_address, init_info.master_port, 1, init_info.world_size,
                                                 init_info.timeout_s, init_info.bucket_bytes)
        # The workers block in the rendezvous inside init_weight_transfer_engine: run it beside ours.
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = _group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                  init_info.timeout_s)
            future.result()
        return engine

    def send_weights(self) -> None:
        source = self.source
        if not self.is_sender:
            for _ in source:
                pass
            return
        meta = source.metadata()
        update = GlooWeightTransferUpdateInfo([m.name for m in meta], [str(m.dtype).removeprefix("torch.") for m in meta],
                                              [list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            receiving = pool.submit(self.client.update_weights, asdict(update))
            self.last_bytes = self._send(source, meta)
            receiving.result()  # the workers' errors, if any
        finally:
            pool.shutdown(wait=False)  # after a failed broadcast the worker's call may never return
        self.client.finish_weight_update()

    def _send(self, source, meta) -> int:
        dtypes, shapes = [m.dtype for m in meta], [list(m.shape) for m in meta]
        plan = TransferPlan.of(dtypes, shapes, self.bucket_bytes)
        if not exchange_plan(self.group, plan, is_trainer=True)[1]:
            raise RuntimeError(f"rollout workers refused the weight update, nothing loaded: they expect another "
                               f"transfer than this trainer's {plan.describe()} (did a client drive "
                               "/init_weight_transfer_engine or /update_weights with other settings?)")
        buckets = plan_buckets(dtypes, shapes, self.bucket_bytes)
        pairs = iter(source)
        in_flight = []  # (buffer, work) of the bucket on the wire; with the one being packed, two buffers live
        total = 0
        for k, bucket in enumerate(buckets):
            buffer = torch.empty(sum(tensor_bytes(meta[i].dtype, meta[i].shape) for i in bucket), dtype=torch.uint8)
            offset = 0
            for i in bucket:
                pair = next(pairs, None)
                if pair is None:
                    raise ValueError(f"weight source yielded {i} tensors where its metadata declared {len(meta)}")
                name, tensor = pair
                expected = meta[i]
                if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != tuple(expected.shape):
                    raise ValueError(f"weight source yielded {name} {tensor.dtype} {tuple(tensor.shape)} where its "
                                     f"metadata said {expected.name} {expected.dtype} {tuple(expected.shape)}")
                n = tensor.nbytes
                buffer[offset:offset + n].copy_(tensor.detach().reshape(-1).view(torch.uint8))
                offset += n
            if in_flight:  # the previous bucket must be sent before a third buffer exists
                in_flight.pop()[1].wait()
            in_flight.append((buffer, _broadcast(self.group, buffer)))
            total += buffer.numel()
        for _, work in in_flight:
            work.wait()
        if next(pairs, None) is not None:
            raise ValueError("weight source yielded more tensors than its metadata declared")
        return total

    def shutdown(self) -> None:
        self.group = None
