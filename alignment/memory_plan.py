"""The memory plan: what each training rank will hold, per model, before anything loads.

From the recipe, the launch (world size, ZeRO stage and offload of the accelerate config) and each model's
`config.json` (the model is built on the `meta` device to count its parameters exactly), it adds up per rank:

- models that train (policy, critic; SFT's and RM's model): weights, gradients, AdamW states (two fp32 moments,
  plus an fp32 master copy when the weights are 16-bit), each divided over the ranks as the ZeRO stage shards it
  (stage 1: optimizer states; 2: + gradients; 3: + weights), on the host when offloaded;
- models that only score (PPO's reference and reward models): weights, sharded under ZeRO-3;
- activations of the largest micro-batch: per layer and token about 6 x hidden + 4 x intermediate values kept
  for backward (attention through SDPA/flash keeps no seq^2 matrix); with gradient checkpointing only each
  layer's input plus one layer recomputed; plus the logits and their gradient (tokens x vocabulary);
- ZeRO-3's gathered working copy (the largest layer, twice for prefetch), and the runtime (libraries, CUDA
  context and NCCL buffers; a measured constant on CPU, an assumed one on GPU).

The stages print it at start (and warn when it exceeds the device); `alignment validate --memory` prints it for any
recipe and accelerate config without loading anything. It is an estimate: allocator fragmentation, temporary
buffers and framework caches come on top (see the README for how it compares with measured peaks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_CPU = int(0.6 * GiB)  # RSS of a stage process after importing torch, transformers, DeepSpeed, vLLM (measured)
RUNTIME_GPU = int(1.5 * GiB)  # CUDA context, cuBLAS workspaces and NCCL buffers (assumed)
VLLM_FRONT_END_CPU = int(0.2 * GiB)  # a colocated vLLM engine's front end in the trainer process (measured; its
# EngineCore process holds the weights and KV cache apart)
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of the GPU for a colocated engine


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


@dataclass
class MemoryPlan:
    title: str
    launch: Launch
    lines: list[PlanLine] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # models whose config.json could not be read

    @property
    def per_rank(self) -> int:
        return sum(line.device for line in self.lines)

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
               f"  {'per rank':<46} {where:>10} {aside:>10}"]
        for line in self.lines:
            device = _gib(line.device) if line.device or not line.host else "-"
            out.append(f"  {line.what:<46} {device:>10} {_gib(line.host) if line.host else '':>10}"
                       + (f"  {line.note}" if line.note else ""))
        out.append(f"  {'total per rank':<46} {_gib(self.per_rank):>10} {_gib(self.host_per_rank) if self.host_per_rank else '':>10}")
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


def trained_model(name: str, shape: ModelShape, dtype: str, launch: Launch, lora_rank: int | None = None) -> list[PlanLine]:
    """Weights, gradients and AdamW states of a model trained under the launch's ZeRO stage."""
    d = DTYPE_BYTES[dtype]
    stage, world = launch.zero_stage, launch.world
    trainable = lora_params(shape, lora_rank) if lora_rank else shape.params
    # GPU engines accumulate 16-bit models' gradients in fp32 under ZeRO >= 1 (training.engine_config)
    grad_bytes = 4 if launch.on_gpu and d != 4 and stage >= 1 else d
    adam_bytes = 8 + (4 if d != 4 else 0)  # two fp32 moments (+ the fp32 master weights of a 16-bit model)
    weights = _shard(shape.params * d, world, stage == 3)
    grads = _shard(trainable * grad_bytes, world, stage >= 2)
    optimizer = _shard(trainable * adam_bytes, world, stage >= 1)
    size = f"{_count(shape.params)} params" + (f", {_count(trainable)} LoRA" if lora_rank else "")
    return [
        PlanLine(f"{name}: weights ({dtype})", 0 if launch.offload_param else weights,
                 weights if launch.offload_param else 0, size),
        PlanLine(f"{name}: gradients", 0 if launch.offload_optimizer else grads, grads if launch.offload_optimizer else 0),
        PlanLine(f"{name}: AdamW states", 0 if launch.offload_optimizer else optimizer,
                 optimizer if launch.offload_optimizer else 0),
    ]


def optimizer_step_temporaries(shape: ModelShape, launch: Launch, lora_rank: int | None = None) -> PlanLine | None:
    """torch's AdamW (foreach) makes fp32 temporaries the size of the parameters it updates at each step; DeepSpeed's
    CPU Adam (offloaded optimizer) makes none."""
    if launch.offload_optimizer:
        return None
    trainable = lora_params(shape, lora_rank) if lora_rank else shape.params
    return PlanLine("AdamW step temporaries", _shard(4 * trainable, launch.world, launch.zero_stage >= 1))


def frozen_model(name: str, shape: ModelShape, dtype: str, launch: Launch) -> PlanLine:
    weights = _shard(shape.params * DTYPE_BYTES[dtype], launch.world, launch.zero_stage == 3)
    offloaded = launch.offload_param and launch.zero_stage == 3
    return PlanLine(f"{name}: weights ({dtype})", 0 if offloaded else weights, weights if offloaded else 0,
                    f"{_count(shape.params)} params, frozen")


def activation_bytes(shape: ModelShape, tokens: int, dtype: str, checkpointing: bool, logits: bool) -> int:
    """Values kept for backward in one micro-batch of `tokens` tokens (see the module docstring)."""
    d = DTYPE_BYTES[dtype]
    per_token_layer = 6 * shape.hidden + 4 * shape.intermediate
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden + tokens * per_token_layer
    else:
        kept = shape.layers * tokens * per_token_layer
    return d * (kept + (2 * tokens * shape.vocab if logits else 0))


def zero3_gather_bytes(shapes: list[ModelShape], dtype: str, launch: Launch) -> int:
    if launch.zero_stage != 3:
        return 0
    return 2 * max(s.largest_module for s in shapes) * DTYPE_BYTES[dtype]


def runtime_line(launch: Launch) -> PlanLine:
    if launch.on_gpu:
        return PlanLine("runtime (CUDA context, NCCL)", RUNTIME_GPU, note="assumed")
    return PlanLine("runtime (python, torch, libraries)", RUNTIME_CPU, note="measured")


# ----------------------------------------------------------------------------------------------- per stage


def plan_ppo(recipe, launch: Launch, prompt_tokens: int, resolve=lambda path: path) -> MemoryPlan:
    """PPO: policy and critic train, reference and reward models score. `prompt_tokens`: the longest prompt (the
    stage knows it; `alignment validate` bounds it by rollout.max_model_len)."""
    algo, train = recipe.algorithm, recipe.train
    seq = min(prompt_tokens + recipe.rollout.sampling.max_new_tokens, recipe.rollout.max_model_len)
    tokens = algo.micro_batch_size * seq
    plan = MemoryPlan(f"PPO, micro-batch {algo.micro_batch_size} x {seq} tokens"
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
    for role, (shape, dtype) in shapes.items():
        if role in ("policy", "critic"):
            plan.lines += trained_model(role, shape, dtype, launch, lora if role == "policy" else None)
        else:
            plan.lines.append(frozen_model(role, shape, dtype, launch))
    # policy and critic run forward + backward one after the other: the larger of the two at a time
    activations = [(role, activation_bytes(shape, tokens, dtype, train.gradient_checkpointing, logits=role == "policy"))
                   for role, (shape, dtype) in shapes.items() if role in ("policy", "critic")]
    if activations:
        role, peak = max(activations, key=lambda a: a[1])
        plan.lines.append(PlanLine(f"activations + logits ({role})", peak, note=f"{tokens} tokens per micro-batch"))
    if shapes:
        gather = zero3_gather_bytes([s for s, _ in shapes.values()], recipe.policy.dtype, launch)
        if gather:
            plan.lines.append(PlanLine("ZeRO-3 gathered layer (+ prefetch)", gather))
    trained = [(shape, lora if role == "policy" else None) for role, (shape, _) in shapes.items() if role in ("policy", "critic")]
    temporaries = [line for shape, r in trained if (line := optimizer_step_temporaries(shape, launch, r)) is not None]
    if temporaries:  # the two models step one after the other
        plan.lines.append(max(temporaries, key=lambda line: line.device))
    engine = _rollout_engine_line(recipe, launch, shapes.get("policy"))
    if engine is not None:
        plan.lines.append(engine)
    if recipe.rollout.engine != "hf" and "policy" in shapes:  # shm weight sync: one safetensors chunk at a time
        from rollout.weight_sync import DEFAULT_CHUNK_BYTES

        policy, _ = shapes["policy"]
        chunk = min(DEFAULT_CHUNK_BYTES, policy.params * DTYPE_BYTES[recipe.rollout.dtype])
        plan.lines.append(PlanLine("weight sync chunk (rank 0)", 0 if launch.on_gpu else chunk,
                                   chunk if launch.on_gpu else 0, note="in host memory"))
    plan.lines.append(runtime_line(launch))
    return plan


def _rollout_engine_line(recipe, launch: Launch, policy: tuple[ModelShape, str] | None) -> PlanLine | None:
    """What a rollout engine in the trainer's process costs rank 0 (servers run elsewhere and cost nothing here)."""
    engine = recipe.rollout.engine
    if engine == "hf" and policy is not None:  # a second, whole copy of the policy
        return PlanLine("rollout engine (HF, rank 0)", policy[0].params * DTYPE_BYTES[recipe.rollout.dtype],
                        note="a whole policy copy")
    if engine == "vllm":
        if launch.on_gpu:  # weights and KV cache on this GPU, at the share it is given
            share = recipe.rollout.gpu_memory_utilization or VLLM_GPU_MEMORY_UTILIZATION
            note = f"gpu_memory_utilization {share}" + (" (asleep while training)" if recipe.rollout.sleep else "")
            return PlanLine("rollout engine (vLLM, colocated)", int(share * launch.device_bytes), note=note)
        return PlanLine("rollout engine front end (vLLM)", VLLM_FRONT_END_CPU, note="measured; weights and KV cache "
                        "live in its own process")
    return None


def plan_single_model(stage: str, recipe, launch: Launch, resolve=lambda path: path) -> MemoryPlan:
    """SFT (a causal LM with its logits) or RM (a 1-output head; chosen and rejected in one batch)."""
    train, model = recipe.train, recipe.model
    rows = train.per_device_batch_size * (2 if stage == "rm" else 1)
    tokens = rows * train.max_length
    plan = MemoryPlan(f"{stage.upper()}, micro-batch {rows} x {train.max_length} tokens"
                      + (", gradient checkpointing" if train.gradient_checkpointing else ""), launch)
    try:
        shape = model_shape(resolve(model.name_or_path), "lm" if stage == "sft" else "value", model.trust_remote_code)
    except (OSError, ValueError) as exc:
        plan.skipped.append(f"model '{model.name_or_path}': {str(exc).splitlines()[0][:160]}")
        return plan
    plan.lines += trained_model("model", shape, model.dtype, launch, model.lora.r if model.lora else None)
    plan.lines.append(PlanLine("activations" + (" + logits" if stage == "sft" else ""),
                               activation_bytes(shape, tokens, model.dtype, train.gradient_checkpointing, stage == "sft"),
                               note=f"{tokens} tokens per micro-batch (at max_length)"))
    temporaries = optimizer_step_temporaries(shape, launch, model.lora.r if model.lora else None)
    if temporaries is not None:
        plan.lines.append(temporaries)
    gather = zero3_gather_bytes([shape], model.dtype, launch)
    if gather:
        plan.lines.append(PlanLine("ZeRO-3 gathered layer (+ prefetch)", gather))
    plan.lines.append(runtime_line(launch))
    return plan


def plan_recipe(stage: str, recipe, launch: Launch, recipe_path: str | None = None, prompt_tokens: int | None = None) -> MemoryPlan | None:
    """The plan of a training stage's recipe (None for stages that train nothing). A model path that a sibling
    recipe will write (`<its output.dir>/final`, not there yet) is read from that recipe's model."""
    resolve = _sibling_resolver(recipe_path)
    if stage == "ppo":
        return plan_ppo(recipe, launch, prompt_tokens if prompt_tokens is not None else recipe.rollout.max_model_len, resolve)
    if stage in ("sft", "rm"):
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
    """Print this launch's plan for the stage (call on rank 0 before the models load); warn when it does not fit."""
    plan = plan_recipe(stage, recipe, Launch.current(), prompt_tokens=prompt_tokens)
    if plan is None:
        return None
    print(plan.render(), flush=True)
    if not plan.fits:
        print("warning: by the memory plan above this run will not fit: lower the micro-batch size or the sequence "
              "length, turn on train.gradient_checkpointing, use more ranks, a higher ZeRO stage or offload", flush=True)
    return plan


def peak_bytes() -> int:
    """This process's peak so far: allocated GPU memory on a GPU, else the resident set size."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
