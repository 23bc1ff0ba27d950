"""The memory plan: what each training rank will hold, per model, before anything loads.

From the recipe, the launch (world size, ZeRO stage and offload of the accelerate config) and each model's
`config.json` (the model is built on the `meta` device to count its parameters exactly), it adds up per rank what
is held all along:

- models that train (policy, critic; SFT's and RM's model): weights, gradients, AdamW states (two fp32 moments,
  plus an fp32 master copy when the weights are 16-bit, and always under ZeRO-3), each divided over the ranks as the
  ZeRO stage shards it (stage 1: optimizer states; 2: + gradients; 3: + weights), on the host when offloaded; under
  ZeRO-3 each also has a gradient reduce bucket of hidden^2 elements on every rank;
- models that only score (PPO's reference and reward models): weights, sharded under ZeRO-3;
- a colocated rollout engine, and the runtime (libraries, CUDA context and NCCL buffers; a measured constant on
  CPU, an assumed one on GPU);

and what is held during one phase of a step only, of which the largest phase counts:

- train: activations of the largest micro-batch (per layer and token about 6 x hidden + 4 x intermediate values kept
  for backward, attention through SDPA/flash keeping no seq^2 matrix; with gradient checkpointing each layer's input
  plus one layer recomputed), the policy's logits over the answer and their gradient; under ZeRO-3 the gathered
  layer with its prefetch and the parameters kept gathered from forward to backward (stage3_max_reuse_distance);
- optimizer step: AdamW's temporaries (ZeRO-3: per sub-group of at most 1e9 elements, a flattened fp32 gradient
  and torch's own temporaries);
- score (PPO): forwards without gradients (one layer at a time, logits over the answer);
- generate and sync (PPO): a sleeping colocated engine awake, rank 0's weight-transfer buffers.

The stages print it at start (and warn when it exceeds the device); `alignment validate --memory` prints it for any
recipe and accelerate config without loading anything. It is an estimate: allocator fragmentation and framework
caches come on top (see the README for how it compares with measured peaks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from alignment import console

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_CPU = int(0.6 * GiB)  # RSS of a stage process after importing torch, transformers, DeepSpeed, vLLM (measured)
RUNTIME_GPU = int(1.5 * GiB)  # CUDA context, cuBLAS workspaces and NCCL buffers (assumed)
VLLM_FRONT_END_CPU = int(0.2 * GiB)  # a colocated vLLM engine's front end in the trainer process (measured; its
# EngineCore process holds the weights and KV cache apart)
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of the GPU for a colocated engine
# ZeRO-3 settings our engines set (alignment.training) and the plan reads: DeepSpeed's defaults for the sub-group
# and the reuse distance, HF's "auto" reduce bucket (DeepSpeed's own default is 5e8 elements whatever the model).
ZERO3_SUB_GROUP_ELEMENTS = 1_000_000_000
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000
ZERO3_MIN_REDUCE_BUCKET_ELEMENTS = 4 * 2**20  # small models: a few reductions per backward, not one per layer


def zero3_reduce_bucket_elements(hidden_size: int) -> int:
    """HF's "auto" reduce bucket, hidden^2 elements (12.8M at 7B), at least 4M."""
    return max(hidden_size * hidden_size, ZERO3_MIN_REDUCE_BUCKET_ELEMENTS)


@dataclass(frozen=True)
class Launch:
    """Where a stage runs: ranks, ZeRO settings, and the memory each rank has."""

    world: int
    ranks_per_node: int
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    on_gpu: bool
    device_bytes: int  # one GPU's memory; on CPU the node's RAM, shared by its ranks
    device_name: str

    @classmethod
    def current(cls) -> Launch:
        """This launch, as a stage sees it at start."""
        import torch

        from alignment import distributed
        from alignment.training import ZeroSettings

        zero = ZeroSettings.from_accelerate_env()
        world = distributed.world_size()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return cls(world, per_node, zero.stage, bool(zero.offload_optimizer), bool(zero.offload_param), True,
                       props.total_memory, props.name)
        return cls(world, per_node, zero.stage, bool(zero.offload_optimizer), bool(zero.offload_param), False,
                   _host_bytes(), "host memory")

    @classmethod
    def from_accelerate_config(cls, path: str | None, gpu_gib: float | None) -> Launch:
        """The launch an accelerate config describes (one process without a config), on GPUs of `gpu_gib` GiB,
        else on this machine's CPU."""
        import json

        import yaml

        config = yaml.safe_load(Path(path).read_text()) if path else {}
        world = int(config.get("num_processes", 1))
        per_node = max(1, world // int(config.get("num_machines", 1)))
        ds = config.get("deepspeed_config", {}) if config.get("distributed_type") == "DEEPSPEED" else {}
        if ds.get("deepspeed_config_file"):
            zero = json.loads(Path(ds["deepspeed_config_file"]).read_text()).get("zero_optimization", {})
            stage = int(zero.get("stage", 0))
            opt, param = zero.get("offload_optimizer", {}).get("device"), zero.get("offload_param", {}).get("device")
        else:
            stage = int(ds.get("zero_stage", 0))
            opt, param = ds.get("offload_optimizer_device"), ds.get("offload_param_device")
        offloaded = lambda device: device not in (None, "none")  # noqa: E731
        if gpu_gib is not None:
            return cls(world, per_node, stage, offloaded(opt), offloaded(param), True, int(gpu_gib * GiB), f"{gpu_gib:g} GiB GPU")
        return cls(world, per_node, stage, offloaded(opt), offloaded(param), False, _host_bytes(), "host memory")


def _host_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    largest_module: int  # parameters of the largest module gathered at once under ZeRO-3 (embeddings, a projection)


def model_shape(name_or_path: str, head: str = "lm", trust_remote_code: bool = False) -> ModelShape:
    """Shape of a model from its config.json alone: built on the meta device (no weights read, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        if head == "lm":
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        else:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())  # tied tensors once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(params, text.hidden_size, text.num_hidden_layers,
                      getattr(text, "intermediate_size", None) or 4 * text.hidden_size, text.vocab_size, largest)


def lora_params(shape: ModelShape, r: int) -> int:
    """Trainable LoRA parameters when every linear projection of every layer is adapted (target 'all-linear'): per
    layer q, k, v, o and the MLP's gate, up, down, r x (in + out) each (an upper bound for narrower targets)."""
    h, i = shape.hidden, shape.intermediate
    per_layer = r * (4 * 2 * h + 3 * (h + i))
    return shape.layers * per_layer


@dataclass
class PlanLine:
    what: str
    device: int = 0  # bytes per rank on its device (on CPU: in host memory)
    host: int = 0  # bytes per rank held in host memory besides (offloaded states)
    note: str = ""
    phase: str | None = None  # None: held all along; else held only during this phase of a step (see MemoryPlan)


@dataclass
class MemoryPlan:
    """Lines of memory per rank: resident ones (weights, states, buffers, runtime) and transient ones, each held during
    one phase of a step (PPO: generate, score, train, optimizer step, sync). Phases come one after another, so the
    total is the resident lines plus the largest phase."""

    title: str
    launch: Launch
    lines: list[PlanLine] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # models whose config.json could not be read

    def phase_bytes(self) -> dict[str, int]:
        phases: dict[str, int] = {}
        for line in self.lines:
            if line.phase is not None:
                phases[line.phase] = phases.get(line.phase, 0) + line.device
        return phases

    @property
    def peak_phase(self) -> str | None:
        phases = self.phase_bytes()
        return max(phases, key=phases.get) if phases else None

    @property
    def per_rank(self) -> int:
        resident = sum(line.device for line in self.lines if line.phase is None)
        return resident + max(self.phase_bytes().values(), default=0)

    @property
    def host_per_rank(self) -> int:
        return sum(line.host for line in self.lines)

    @property
    def fits(self) -> bool:
        if self.launch.on_gpu:
            return self.per_rank <= self.launch.device_bytes
        return self.launch.ranks_per_node * (self.per_rank + self.host_per_rank) <= self.launch.device_bytes

    def render(self) -> str:
        launch = self.launch
        where, aside = ("GPU", "host") if launch.on_gpu else ("RAM", "offloaded")
        out = [f"memory plan: {self.title}; {launch.world} rank(s), {launch.ranks_per_node} per node, ZeRO stage "
               f"{launch.zero_stage}" + (", optimizer offloaded" if launch.offload_optimizer else "")
               + (", parameters offloaded" if launch.offload_param else ""),
               f"  {'per rank':<58} {where:>10} {aside:>10}"]

        def row(line: PlanLine, indent: str = "") -> str:
            device = _gib(line.device) if line.device or not line.host else "-"
            return (f"  {indent + line.what:<58} {device:>10} {_gib(line.host) if line.host else '':>10}"
                    + (f"  {line.note}" if line.note else ""))

        out += [row(line) for line in self.lines if line.phase is None]
        phases = self.phase_bytes()
        if phases:
            out.append("  held during one phase of a step (phases follow each other; the largest counts):")
            for phase, total in phases.items():
                mark = "  <- peak" if phase == self.peak_phase else ""
                out.append(f"    {phase:<56} {_gib(total):>10}{mark}")
                out += [row(line, "    ") for line in self.lines if line.phase == phase]
        out.append(f"  {'total per rank':<58} {_gib(self.per_rank):>10} {_gib(self.host_per_rank) if self.host_per_rank else '':>10}")
        if launch.on_gpu:
            verdict = f"{_gib(self.per_rank)} of {_gib(launch.device_bytes)} per GPU ({launch.device_name})"
        else:
            node = launch.ranks_per_node * (self.per_rank + self.host_per_rank)
            verdict = f"{_gib(node)} for the node's {launch.ranks_per_node} rank(s) of {_gib(launch.device_bytes)} {launch.device_name}"
        out.append(f"  {'fits' if self.fits else 'DOES NOT FIT'}: {verdict}")
        out += [f"  not planned: {s}" for s in self.skipped]
        return "\n".join(out)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ----------------------------------------------------------------------------------------------- per model


def _shard(n: float, ranks: int, sharded: bool) -> int:
    return int(n / ranks) if sharded else int(n)


def _trainable(shape: ModelShape, lora_rank: int | None) -> int:
    return lora_params(shape, lora_rank) if lora_rank else shape.params


def trained_model(name: str, shape: ModelShape, dtype: str, launch: Launch, lora_rank: int | None = None) -> list[PlanLine]:
    """Weights, gradients and AdamW states of a model trained under the launch's ZeRO stage, and ZeRO-3's reduce
    bucket."""
    d = DTYPE_BYTES[dtype]
    stage, world = launch.zero_stage, launch.world
    trainable = _trainable(shape, lora_rank)
    # GPU engines accumulate 16-bit models' gradients in fp32 under ZeRO >= 1 (training.engine_config)
    grad_bytes = 4 if launch.on_gpu and d != 4 and stage >= 1 else d
    # two fp32 moments, plus an fp32 master copy of a 16-bit model; ZeRO-3 makes that copy for fp32 models too
    # (measured: its fp32 partition is a clone of the weights' partition)
    adam_bytes = 8 + (4 if d != 4 or stage == 3 else 0)
    weights = _shard(shape.params * d, world, stage == 3)
    grads = _shard(trainable * grad_bytes, world, stage >= 2)
    optimizer = _shard(trainable * adam_bytes, world, stage >= 1)
    size = f"{_count(shape.params)} params" + (f", {_count(trainable)} LoRA" if lora_rank else "")
    lines = [
        PlanLine(f"{name}: weights ({dtype})", 0 if launch.offload_param else weights,
                 weights if launch.offload_param else 0, size),
        PlanLine(f"{name}: gradients", 0 if launch.offload_optimizer else grads, grads if launch.offload_optimizer else 0),
        PlanLine(f"{name}: AdamW states", 0 if launch.offload_optimizer else optimizer,
                 optimizer if launch.offload_optimizer else 0),
    ]
    if stage == 3:  # one per engine, on every rank whatever the world size, in the communication dtype
        bucket = zero3_reduce_bucket_elements(shape.hidden) * (d if launch.on_gpu else 4)
        lines.append(PlanLine(f"{name}: ZeRO-3 gradient reduce bucket", bucket, note="hidden^2 elements"))
    return lines


def optimizer_step_temporaries(shape: ModelShape, launch: Launch, lora_rank: int | None = None) -> PlanLine | None:
    """What the optimizer step allocates and frees. ZeRO-3 steps one sub-group (at most ZERO3_SUB_GROUP_ELEMENTS of
    this rank's partition) at a time: a flattened fp32 copy of its gradient, then torch AdamW's temporaries over it
    (foreach on GPUs: one sqrt of the second moment; the per-tensor path on CPU: two). Other stages: one fp32
    temporary per parameter updated. DeepSpeed's CPU Adam (offloaded optimizer) makes none."""
    if launch.offload_optimizer:
        return None
    trainable = _trainable(shape, lora_rank)
    if launch.zero_stage == 3:
        group = min(trainable // launch.world, ZERO3_SUB_GROUP_ELEMENTS)
        per_element = 4 + (4 if launch.on_gpu else 8)
        return PlanLine("AdamW step temporaries", per_element * group, phase="optimizer step",
                        note=f"sub-group of {_count(group)}")
    return PlanLine("AdamW step temporaries", _shard(4 * trainable, launch.world, launch.zero_stage >= 1),
                    phase="optimizer step")


def frozen_model(name: str, shape: ModelShape, dtype: str, launch: Launch) -> PlanLine:
    weights = _shard(shape.params * DTYPE_BYTES[dtype], launch.world, launch.zero_stage == 3)
    offloaded = launch.offload_param and launch.zero_stage == 3
    return PlanLine(f"{name}: weights ({dtype})", 0 if offloaded else weights, weights if offloaded else 0,
                    f"{_count(shape.params)} params, frozen")


def activation_bytes(shape: ModelShape, tokens: int, dtype: str, checkpointing: bool, logit_tokens: int = 0) -> int:
    """Values kept for backward in one micro-batch of `tokens` tokens (see the module docstring), and the logits of
    `logit_tokens` positions with their gradient."""
    d = DTYPE_BYTES[dtype]
    per_token_layer = 6 * shape.hidden + 4 * shape.intermediate
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden + tokens * per_token_layer
    else:
        kept = shape.layers * tokens * per_token_layer
    return d * (kept + 2 * logit_tokens * shape.vocab)


def inference_bytes(shape: ModelShape, tokens: int, dtype: str, logit_tokens: int = 0) -> int:
    """A forward without gradients over `tokens` tokens: one layer's temporaries at a time (q, k, v, o and the MLP's
    gate and up projections), and the logits of `logit_tokens` positions."""
    return DTYPE_BYTES[dtype] * (tokens * (4 * shape.hidden + 2 * shape.intermediate) + logit_tokens * shape.vocab)


def logprob_chunk_bytes(logit_elements: int) -> int:
    """The chunked log-softmax's float32 temporaries over `logit_elements` logits (alignment.ppo.logprobs: a few
    chunks of at most CHUNK_ELEMENTS live at once)."""
    from alignment.ppo.logprobs import CHUNK_ELEMENTS

    return 3 * 4 * min(CHUNK_ELEMENTS, logit_elements)


def zero3_gathered_lines(shapes: list[ModelShape], dtype: str, launch: Launch, phase: str,
                         trained: ModelShape | None = None) -> list[PlanLine]:
    """ZeRO-3's gathered parameters during a phase: the largest module being used and the next one prefetched; in
    training, also the parameters kept whole from forward to backward (those used again within
    stage3_max_reuse_distance elements: the last half-distance of the model, all of a smaller one)."""
    if launch.zero_stage != 3 or not shapes:
        return []
    d = DTYPE_BYTES[dtype]
    lines = [PlanLine("ZeRO-3 gathered layer (+ prefetch)", 2 * max(s.largest_module for s in shapes) * d, phase=phase)]
    if trained is not None:
        kept = min(trained.params, ZERO3_MAX_REUSE_DISTANCE // 2)
        lines.append(PlanLine("ZeRO-3 parameters kept gathered for backward", kept * d, phase=phase,
                              note=f"{_count(kept)} (stage3_max_reuse_distance)"))
    return lines


def runtime_line(launch: Launch) -> PlanLine:
    if launch.on_gpu:
        return PlanLine("runtime (CUDA context, NCCL)", RUNTIME_GPU, note="assumed")
    return PlanLine("runtime (python, torch, libraries)", RUNTIME_CPU, note="measured")


# ----------------------------------------------------------------------------------------------- per stage


def plan_ppo(recipe, launch: Launch, prompt_tokens: int, resolve=lambda path: path) -> MemoryPlan:
    """PPO: policy and critic train, reference and reward models score. `prompt_tokens`: the longest prompt (the
    stage knows it; `alignment validate` bounds it by rollout.max_model_len)."""
    algo, train = recipe.algorithm, recipe.train
    new_tokens = recipe.rollout.completion_tokens()
    seq = min(prompt_tokens + new_tokens, recipe.rollout.max_model_len)
    tokens = algo.micro_batch_size * seq
    if algo.micro_batch_tokens is not None:  # a token budget; one sequence longer than it goes alone
        tokens = min(tokens, max(algo.micro_batch_tokens, seq))
    logit_tokens = min(algo.micro_batch_size * (new_tokens + 1), tokens)  # the policy's logits cover the answer only
    plan = MemoryPlan(f"PPO, micro-batch {algo.micro_batch_size} x {seq} tokens"
                      + (f" (at most {tokens} {'packed' if algo.packing else 'padded'} tokens)"
                         if algo.micro_batch_tokens is not None else "")
                      + (", gradient checkpointing" if train.gradient_checkpointing else ""), launch)
    shapes: dict[str, tuple[ModelShape, str]] = {}

    def shape_of(role: str, section_or_path, dtype: str, head: str):
        path = section_or_path if isinstance(section_or_path, str) else section_or_path.name_or_path
        try:
            shapes[role] = (model_shape(resolve(path), head), dtype)
        except (OSError, ValueError) as exc:
            plan.skipped.append(f"{role} '{path}': {str(exc).splitlines()[0][:160]}")

    shape_of("policy", recipe.policy, recipe.policy.dtype, "lm")
    from alignment.ppo import ADVANTAGE_ESTIMATORS

    if ADVANTAGE_ESTIMATORS[algo.advantage].needs_critic and recipe.value is not None:
        shape_of("critic", recipe.value, recipe.value.dtype, "value")
    reference = recipe.reference or recipe.policy
    shape_of("reference", reference, reference.dtype, "lm")
    for i, source in enumerate(recipe.rewards):
        if source.kind == "model":
            shape_of(f"reward model {i}", source.path, source.dtype or recipe.policy.dtype, "value")
    lora = recipe.policy.lora.r if recipe.policy.lora is not None else None
    trained = {role: shape for role, (shape, _) in shapes.items() if role in ("policy", "critic")}
    for role, (shape, dtype) in shapes.items():
        if role in trained:
            plan.lines += trained_model(role, shape, dtype, launch, lora if role == "policy" else None)
        else:
            plan.lines.append(frozen_model(role, shape, dtype, launch))
    engine_dtype = recipe.rollout.engine_dtype(recipe.policy.dtype)
    plan.lines += _rollout_engine_lines(recipe, launch, shapes.get("policy"), engine_dtype)
    plan.lines.append(runtime_line(launch))
    every = [shape for shape, _ in shapes.values()]

    # score: forwards without gradients of micro-batches, one model at a time (policy and reference logits over the
    # answer)
    scoring = [inference_bytes(shape, tokens, dtype, logit_tokens if role in ("policy", "reference") else 0)
               for role, (shape, dtype) in shapes.items()]
    chunks = max((logprob_chunk_bytes(logit_tokens * shape.vocab) for shape, _ in shapes.values()), default=0)
    if scoring:
        plan.lines.append(PlanLine("activations (no gradients)", max(scoring) + chunks, phase="score"))
    plan.lines += zero3_gathered_lines(every, recipe.policy.dtype, launch, "score")
    # train: policy and critic run forward + backward one after the other: the larger of the two at a time
    activations = [(role, activation_bytes(shape, tokens, shapes[role][1], train.gradient_checkpointing,
                                           logit_tokens if role == "policy" else 0)) for role, shape in trained.items()]
    if activations:
        role, peak = max(activations, key=lambda a: a[1])
        plan.lines.append(PlanLine(f"activations + logits ({role})", peak + chunks, phase="train",
                                   note=f"{tokens} tokens per micro-batch, logits of {logit_tokens}"))
        plan.lines += zero3_gathered_lines(every, recipe.policy.dtype, launch, "train",
                                           trained=max(trained.values(), key=lambda s: s.params))
    # optimizer step: the two models step one after the other
    temporaries = [line for role, shape in trained.items()
                   if (line := optimizer_step_temporaries(shape, launch, lora if role == "policy" else None)) is not None]
    if temporaries:
        plan.lines.append(max(temporaries, key=lambda line: line.device))
    if "policy" in shapes:
        plan.lines += _weight_sync_lines(recipe, launch, shapes["policy"][0], engine_dtype)
    return plan


def _rollout_engine_lines(recipe, launch: Launch, policy: tuple[ModelShape, str] | None, engine_dtype: str) -> list[PlanLine]:
    """What a rollout engine in the trainer's process costs rank 0 (servers run elsewhere and cost nothing here). A
    sleeping colocated engine holds its share of the GPU while it generates and only its weights during the sync."""
    engine = recipe.rollout.engine
    if engine == "hf" and policy is not None:  # a second, whole copy of the policy
        return [PlanLine("rollout engine (HF, rank 0)", policy[0].params * DTYPE_BYTES[engine_dtype], note="a whole policy copy")]
    if engine != "vllm":
        return []
    if not launch.on_gpu:
        return [PlanLine("rollout engine front end (vLLM)", VLLM_FRONT_END_CPU, note="measured; weights and KV cache "
                         "live in its own process")]
    share = recipe.rollout.gpu_memory_utilization or VLLM_GPU_MEMORY_UTILIZATION
    engine_bytes = int(share * launch.device_bytes)
    if not recipe.rollout.sleep:
        return [PlanLine("rollout engine (vLLM, colocated)", engine_bytes, note=f"gpu_memory_utilization {share}")]
    lines = [PlanLine("rollout engine (vLLM, awake)", engine_bytes, phase="generate", note=f"gpu_memory_utilization {share}")]
    if policy is not None:
        lines.append(PlanLine("rollout engine weights (vLLM, woken for the sync)",
                              policy[0].params * DTYPE_BYTES[engine_dtype], phase="sync"))
    return lines


def _weight_sync_lines(recipe, launch: Launch, policy: ModelShape, engine_dtype: str) -> list[PlanLine]:
    """Rank 0's buffers while it sends the weights: the gathered module's copy in the engine's dtype, and the
    transport's buffers (NCCL: two packed buffers; CUDA IPC: one, at least the largest tensor; gloo: two buckets and
    shm: one file chunk, in host memory)."""
    from rollout.weight_sync import DEFAULT_CHUNK_BYTES, GLOO_BUCKET_BYTES, IPC_BUFFER_BYTES, NCCL_BUFFER_BYTES

    if recipe.rollout.engine == "hf":
        return []
    d = DTYPE_BYTES[engine_dtype]
    sync = recipe.rollout.weight_sync
    copy = PlanLine("weight sync: gathered module copy (rank 0)", policy.largest_module * d, phase="sync")
    if sync in ("nccl", "ipc"):
        on_device = 2 * NCCL_BUFFER_BYTES if sync == "nccl" else max(IPC_BUFFER_BYTES, policy.largest_module * d)
        return [copy, PlanLine(f"weight sync: {sync} buffers (rank 0)", on_device, phase="sync")]
    in_host = 2 * GLOO_BUCKET_BYTES if sync == "gloo" else min(DEFAULT_CHUNK_BYTES, policy.params * d)
    return [copy, PlanLine(f"weight sync: {sync} buffers (rank 0)", 0 if launch.on_gpu else in_host,
                           in_host if launch.on_gpu else 0, phase="sync", note="in host memory")]


def plan_single_model(stage: str, recipe, launch: Launch, resolve=lambda path: path) -> MemoryPlan:
    """SFT (a causal LM with its logits), RM (a 1-output head; chosen and rejected in one batch) or DPO (a causal LM
    with its logits, chosen and rejected in one batch; the reference's log-probs are computed before training)."""
    train, model = recipe.train, recipe.model
    rows = train.per_device_batch_size * (1 if stage == "sft" else 2)
    tokens = rows * train.max_length
    plan = MemoryPlan(f"{stage.upper()}, micro-batch {rows} x {train.max_length} tokens"
                      + (", gradient checkpointing" if train.gradient_checkpointing else ""), launch)
    causal_lm = stage in ("sft", "dpo")
    try:
        shape = model_shape(resolve(model.name_or_path), "lm" if causal_lm else "value", model.trust_remote_code)
    except (OSError, ValueError) as exc:
        plan.skipped.append(f"model '{model.name_or_path}': {str(exc).splitlines()[0][:160]}")
        return plan
    lora = model.lora.r if model.lora else None
    plan.lines += trained_model("model", shape, model.dtype, launch, lora)
    plan.lines.append(runtime_line(launch))
    plan.lines.append(PlanLine("activations" + (" + logits" if causal_lm else ""),
                               activation_bytes(shape, tokens, model.dtype, train.gradient_checkpointing,
                                                tokens if causal_lm else 0),
                               phase="train", note=f"{tokens} tokens per micro-batch (at max_length)"))
    plan.lines += zero3_gathered_lines([shape], model.dtype, launch, "train", trained=shape)
    temporaries = optimizer_step_temporaries(shape, launch, lora)
    if temporaries is not None:
        plan.lines.append(temporaries)
    return plan


def plan_recipe(stage: str, recipe, launch: Launch, recipe_path: str | None = None, prompt_tokens: int | None = None) -> MemoryPlan | None:
    """The plan of a training stage's recipe (None for stages that train nothing). A model path that a sibling
    recipe will write (`<its output.dir>/final`, not there yet) is read from that recipe's model."""
    resolve = _sibling_resolver(recipe_path)
    if stage == "ppo":
        return plan_ppo(recipe, launch, prompt_tokens if prompt_tokens is not None else recipe.rollout.max_model_len, resolve)
    if stage in ("sft", "rm", "dpo"):
        return plan_single_model(stage, recipe, launch, resolve)
    return None


def _sibling_resolver(recipe_path: str | None):
    """path -> path to read config.json from: itself if it exists, else the model of the sibling recipe (same
    folder) whose output.dir/final it is, followed as far as it goes (PPO <- RM <- SFT <- a hub id)."""
    outputs: dict[str, str] = {}
    if recipe_path:
        import yaml

        for sibling in Path(recipe_path).parent.glob("*.yaml"):
            try:
                data = yaml.safe_load(sibling.read_text()) or {}
                outputs[os.path.normpath(f"{data['output']['dir']}/final")] = data["model"]["name_or_path"]
            except (KeyError, TypeError, ValueError, OSError):
                continue

    def resolve(path: str) -> str:
        seen = set()
        while not Path(path).exists() and os.path.normpath(path) in outputs and path not in seen:
            seen.add(path)
            path = outputs[os.path.normpath(path)]
        return path

    return resolve


# ----------------------------------------------------------------------------------------------- at stage start


def announce(stage: str, recipe, prompt_tokens: int | None = None) -> MemoryPlan | None:
    """Print this launch's plan for the stage (call on rank 0 before the models load); warn when it does not fit.

    While the libraries' output is captured, a plan that fits shows as its first and last lines on the console and
    whole in the stage's log."""
    plan = plan_recipe(stage, recipe, Launch.current(), prompt_tokens=prompt_tokens)
    if plan is None:
        return None
    table = plan.render()
    if plan.fits and console.log_path() is not None:
        print(table, flush=True)
        lines = table.splitlines()
        console.say(f"{lines[0]}; {lines[-1].strip()} (the whole plan is in the stage log)")
    else:
        console.say(table)
    if not plan.fits:
        console.say("warning: by the memory plan above this run will not fit: lower the micro-batch size or the sequence "
                    "length, turn on train.gradient_checkpointing, use more ranks, a higher ZeRO stage or offload")
    return plan


def peak_bytes() -> int:
    """This process's peak so far: allocated GPU memory on a GPU, else the resident set size."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
