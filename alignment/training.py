"""DeepSpeed engines for models we train ourselves (PPO's policy and critic) and sharded inference models.

We call `deepspeed.initialize` directly (as OpenRLHF does) because PPO trains two models with different
learning rates, which `accelerate.prepare` does not support under DeepSpeed. The ZeRO stage and offload
come from the accelerate config the user launched with (`accelerate launch --config_file ...`), so the
same recipe runs on one CPU process, 2 CPU processes under ZeRO-3, or many GPUs.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from alignment.distributed import any_rank
from alignment.memory_plan import ZERO3_MAX_REUSE_DISTANCE, ZERO3_SUB_GROUP_ELEMENTS, zero3_reduce_bucket_elements
from alignment.models import disable_dropout


# DeepSpeed's ZeRO-3 calls torch collectives that torch 2.13 deprecates: a FutureWarning per call, hundreds of lines a
# step (enough to fill a launcher's output pipe), about nothing a user can change.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                        "deprecated", category=FutureWarning)


@dataclass(frozen=True)
class ZeroSettings:
    stage: int = 0
    offload_optimizer: str | None = None  # "cpu" / "nvme" / None
    offload_param: str | None = None
    init: bool = False  # zero3_init_flag: build models already partitioned (stage 3 only), see `zero3_init`

    @classmethod
    def from_accelerate_env(cls) -> ZeroSettings:
        """Read what `accelerate launch` exported from its DeepSpeed config (stage 0 when not under DeepSpeed)."""
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return cls()
        init = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true"
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and config_file.lower() != "none":
            zero = json.loads(Path(config_file).read_text()).get("zero_optimization", {})
            return cls(
                int(zero.get("stage", 0)),
                _device(zero.get("offload_optimizer", {}).get("device")),
                _device(zero.get("offload_param", {}).get("device")),
                init,
            )
        return cls(
            int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0)),
            _device(os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")),
            _device(os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")),
            init,
        )


def ignored_accelerate_settings(model_dtype: str) -> list[str]:
    """Settings of the launching accelerate config that PPO's own DeepSpeed engines do not take, each with what
    takes its place (the stage prints them as warnings at start)."""
    env = os.environ.get
    ignored = []
    precision = env("ACCELERATE_MIXED_PRECISION", "no").lower()
    wanted = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    if wanted is not None and wanted != model_dtype:
        ignored.append(f"mixed_precision={precision}: PPO computes in the recipe's dtype ({model_dtype}); set "
                       f"policy.dtype (and value.dtype, reference.dtype) to {wanted} to train in {precision}")
    if env("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return ignored
    if env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto") not in ("auto", "1"):
        ignored.append(f"gradient_accumulation_steps={env('ACCELERATE_GRADIENT_ACCUMULATION_STEPS')}: PPO accumulates "
                       "over each minibatch (algorithm.minibatches and algorithm.micro_batch_size)")
    if env("ACCELERATE_GRADIENT_CLIPPING", "auto").lower() not in ("auto", "none"):
        ignored.append(f"gradient_clipping={env('ACCELERATE_GRADIENT_CLIPPING')}: PPO clips at train.max_grad_norm")
    zero = ZeroSettings.from_accelerate_env()
    if zero.offload_param and zero.stage != 3:
        ignored.append(f"offload_param_device={zero.offload_param}: parameters are offloaded only under ZeRO stage 3")
    return ignored


def _device(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the launcher's process group, or make a world of one for a plain `alignment ppo` run.

    `timeout_s`: the longest rank 0 may keep the others waiting in a collective (PPO: `PPORecipe.rank0_alone_s`, its
    servers starting, generating, taking weights); the group's timeout (DeepSpeed's 10 minutes by default) is raised
    to cover it with a minute to spare.

    The world of one passes rank, size and address explicitly rather than through os.environ, where
    RANK/MASTER_PORT would be inherited by any process started later (a rollout server, another stage) and make
    it join this process's group. Only LOCAL_RANK goes there, because DeepSpeed's engine insists on it.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    from deepspeed.constants import default_pg_timeout

    timeout = max(default_pg_timeout, timedelta(seconds=(timeout_s or 0) + 60))
    if "RANK" in os.environ:  # started by a launcher (accelerate, torchrun, deepspeed)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    with socket.socket() as s:  # a free loopback port for the single-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=f"tcp://127.0.0.1:{port}",
                               rank=0, world_size=1, timeout=timeout)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
    return torch.device("cpu")


def _zero_config(zero: ZeroSettings, hidden_size: int | None) -> dict:
    config: dict = {"stage": zero.stage}
    if zero.offload_optimizer:
        config["offload_optimizer"] = {"device": zero.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if zero.offload_param and zero.stage == 3:
        config["offload_param"] = {"device": zero.offload_param, "pin_memory": torch.cuda.is_available()}
    if zero.stage == 3:
        config["stage3_gather_16bit_weights_on_model_save"] = True  # full weights for the HF export
        # Set rather than left to DeepSpeed's defaults, so that the memory plan reads the same numbers.
        config["sub_group_size"] = ZERO3_SUB_GROUP_ELEMENTS
        config["stage3_max_reuse_distance"] = ZERO3_MAX_REUSE_DISTANCE
        if hidden_size:
            # Parameters up to 10 x hidden size (norms, biases) stay whole on every rank: gathering them before each
            # layer of each micro-batch costs a collective apiece for a few KB (HF's "auto" value). Weight matrices
            # are larger and stay sharded.
            config["stage3_param_persistence_threshold"] = 10 * hidden_size
            # HF's "auto" reduce bucket: DeepSpeed's default is 5e8 elements (954 MiB in bf16) on every rank for each
            # trained model, whatever the model's size. (HF's "auto" prefetch bucket, 0.9 x hidden^2, is not taken:
            # with it a ZeRO-3 gather after training found parameters still in flight and DeepSpeed aborted, 2 CPU
            # ranks; DeepSpeed's default of 5e7 elements does not.)
            config["reduce_bucket_size"] = zero3_reduce_bucket_elements(hidden_size)
    return config


def _hidden_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None) or getattr(getattr(model, "inner", None), "config", None)
    return getattr(config, "hidden_size", None)


def _precision(model_dtype: torch.dtype, on_gpu: bool) -> dict:
    """DeepSpeed's precision flags for a model of `model_dtype`: they also set the dtype ZeRO-3 partitions a model
    into (left out, a bf16 model would be sharded as float32: twice the memory). On CPU DeepSpeed runs float32."""
    if not on_gpu:
        return {}
    return {"bf16": {"enabled": model_dtype == torch.bfloat16}, "fp16": {"enabled": model_dtype == torch.float16}}


def engine_config(zero: ZeroSettings, model_dtype: torch.dtype, on_gpu: bool, hidden_size: int | None,
                  micro_batch_size: int, grad_accum_steps: int, world: int, max_grad_norm: float) -> dict:
    """The DeepSpeed config of a training engine (see `make_train_engine`)."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": _zero_config(zero, hidden_size),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The loop owns the accumulation boundary (`AccumulationWindow`): backward per usable micro-batch, then one
        # step() that reduces and updates, or none when every micro-batch of the window was skipped.
        "managed_gradient_accumulation": False,
    }
    config.update(_precision(model_dtype, on_gpu))
    if on_gpu:
        if model_dtype != torch.float32 and zero.stage >= 1:
            # DeepSpeed accumulates gradients in the model's dtype unless told otherwise: summing many micro-batches
            # in bf16 (8 bits of mantissa) loses the small ones. Stage 0 cannot (its bf16 path has no fp32 buffer).
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def make_train_engine(
    model: torch.nn.Module,
    zero: ZeroSettings,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    max_grad_norm: float,
):
    """Wrap `model` in a DeepSpeed training engine with AdamW and linear warmup, in training mode with dropout off.

    Training mode: `from_pretrained` returns models in eval mode, and transformers' gradient checkpointing recomputes
    a layer only in training mode (`GradientCheckpointingLayer`), so without it checkpointing silently keeps every
    activation. Dropout off: see `alignment.models.disable_dropout`.

    grad_accum_steps is the number of micro-batches per optimizer step (DeepSpeed's batch-size bookkeeping); the
    loop drives each step through an `AccumulationWindow`, with losses already reduced over the whole window.
    """
    world = dist.get_world_size()
    disable_dropout(model)
    config = engine_config(zero, next(model.parameters()).dtype, torch.cuda.is_available(), _hidden_size(model),
                           micro_batch_size, grad_accum_steps, world, max_grad_norm)
    params = [p for p in model.parameters() if p.requires_grad]
    if zero.offload_optimizer:
        # Offloaded optimizer states need DeepSpeed's own CPU Adam; let it build one from the config.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}}
        optimizer = None
    else:
        # torch's AdamW: DeepSpeed's fused Adam would be JIT-compiled on CPU, for no gain at our sizes.
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, config=config, lr_scheduler=scheduler
    )
    engine.train()
    if world == 1 and zero.stage == 0:
        # One process has nothing to reduce, yet DeepSpeed would flatten every gradient into one buffer,
        # "all-reduce" it and copy it back at each optimizer step: ~1 s per step for 100M parameters on CPU.
        engine.enable_backward_allreduce = False
    return engine


def make_inference_model(model: torch.nn.Module, zero: ZeroSettings) -> torch.nn.Module:
    """A frozen model for scoring (reference, reward): ZeRO-3-sharded under stage 3, else a plain replica."""
    model.eval().requires_grad_(False)
    if zero.stage != 3:
        return model.to(device())
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": _zero_config(ZeroSettings(3, None, zero.offload_param), _hidden_size(model)),
        "steps_per_print": 10**9,
        **_precision(next(model.parameters()).dtype, torch.cuda.is_available()),
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine.module


@contextmanager
def zero3_init(zero: ZeroSettings, dtype: torch.dtype):
    """While open, transformers builds the models it loads already partitioned over the ranks (deepspeed.zero.Init)
    when the launch's accelerate config has zero3_init_flag: true under ZeRO-3: no rank ever holds a whole model,
    in host memory or on its device (at 7B, four whole models per rank would not fit). Otherwise it does nothing."""
    if not (zero.stage == 3 and zero.init):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # Everything partitioned as it is built; the engines then keep small parameters whole (persistence threshold).
    partitioned = {**_zero_config(zero, None), "stage3_param_persistence_threshold": 0}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": partitioned,
              **_precision(dtype, torch.cuda.is_available())}
    hf_config = HfDeepSpeedConfig(config)  # transformers holds it by weak reference: on while it lives
    try:
        yield hf_config
    finally:
        unset_hf_deepspeed_config()


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class AccumulationWindow:
    """The micro-batches of one optimizer step of a DeepSpeed engine built by `make_train_engine`.

    A micro-batch whose loss is NaN/inf on any rank contributes no gradient on any rank (ranks stay in step). A
    window whose every micro-batch was skipped takes no optimizer step at all: stepping on no gradient would advance
    the learning-rate schedule and, wherever the optimizer sees zeros rather than missing gradients, move the weights
    through Adam's moments and weight decay (DeepSpeed's ZeRO-2 optimizer even fails on a window without backward).
    """

    def __init__(self, engine):
        self.engine = engine
        self.used = 0  # micro-batches whose gradient went in
        self.skipped = 0  # micro-batches left out for a non-finite loss

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate `loss`'s gradient unless it is non-finite on some rank."""
        if any_rank(not finite(loss)):
            self.skipped += 1
            return
        self.engine.backward(loss, scale_wrt_gas=False)
        self.used += 1

    def step(self) -> bool:
        """End the window: reduce and update if any gradient went in; returns whether the optimizer stepped."""
        if self.used == 0:
            return False
        self.engine.step()
        return True
