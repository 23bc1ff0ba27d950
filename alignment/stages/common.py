"""Plumbing shared by the stages built on TRL trainers (SFT, reward model).

- `setup_distributed()`: makes the HF Trainer see the real world under CPU + DeepSpeed launches.
- `training_args(...)`: TRL config (SFTConfig / RewardConfig) from our TrainSection / OutputSection.
- `RunLayout`: where a stage writes: `<output.dir>/{checkpoints,final,metrics.jsonl,<stage>.log,recipe.yaml}` and the
  trackers' stores (`tensorboard/` by default).
- `CheckpointCallback`: HF writes each checkpoint non-atomically into a staging dir; once every rank has
  finished writing, rank 0 renames it into `checkpoints/checkpoint-<step>` (so a `checkpoint-*` dir is
  always complete) and prunes old ones. `resume_checkpoint()` finds the latest complete one.
- `MetricsCallback`: HF logs -> `MetricsLogger` (metrics.jsonl + `output.report_to`), namespaced `train/`, `eval/`.
- `export_final(...)`: gathered full weights (ZeRO-3 included) in HF safetensors, LoRA merged on request.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment import console, distributed, memory_plan, models
from alignment.checkpoint import atomic_directory, latest_checkpoint, prune, publish
from alignment.config.sections import ModelSection, OutputSection, TrainSection
from alignment.config.schema import save_resolved
from alignment.metrics import MetricsLogger
from alignment.run_lock import claim_output_dir, unlock_output_dir



# ----------------------------------------------------------------------------- distributed


def under_deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and "LOCAL_RANK" in os.environ


def setup_distributed() -> bool:
    """Fix accelerate's view of the world under `accelerate launch` + DeepSpeed on CPU; True if we did.

    There accelerate finds no GPU backend, so `PartialState` keeps `backend=None` and reports
    `num_processes=1, process_index=0` on every rank although DeepSpeed joined a real gloo world: the HF
    Trainer then feeds every rank the same batches (and DeepSpeed rejects the batch size). Creating the
    `PartialState` ourselves with `backend="gloo"` gives it the true rank and world size; the trainer
    reuses it through `accelerator_config={"use_configured_state": True}` (see `training_args`).
    On GPUs (nccl) accelerate is right; we only have it join the process group at once, before the trainer would.
    """
    from accelerate import PartialState

    if not under_deepspeed_launch() or torch.cuda.is_available():
        if "RANK" in os.environ:
            PartialState()  # join the launch's process group now (the trainer would later): the resume decision is sent
        return False
    state = PartialState(backend="gloo")
    assert state.num_processes == torch.distributed.get_world_size(), "accelerate still misreports the world size"
    return True


@dataclass
class StageStart:
    """What every TRL-based stage sets up before its data, without writing anything: world, output layout, resume
    point, tokenizer. `open_output` then prepares the directory, once the data has proven usable."""

    configured_state: bool  # we configured accelerate's state ourselves (CPU + DeepSpeed): see setup_distributed
    layout: RunLayout
    resume: Path | None  # checkpoint to resume from; None for a fresh start
    tokenizer: object
    plan: memory_plan.MemoryPlan | None = None  # the memory plan, printed by open_output (rank 0)


def start_stage(recipe) -> StageStart:
    """Fix accelerate's world view, find the resume point and load the tokenizer. Writes nothing: a start that fails
    on bad data or a bad model leaves `output.dir` as it was (absent, or another run's files untouched)."""
    configured_state = setup_distributed()
    layout = RunLayout(Path(recipe.output.dir))
    # Rank 0 decides: a rank that looked on its own disk could pick another checkpoint (or none) and hang the others.
    resume = distributed.broadcast_from_main(
        latest_checkpoint(layout.checkpoints) if recipe.output.resume and distributed.is_main() else None)
    return StageStart(configured_state, layout, resume, models.load_tokenizer(recipe.model))


def open_output(start: StageStart, recipe, stage: str) -> MetricsLogger:
    """After the data is validated: take the directory's run lock (a second run there stops), clean leftovers of a
    killed run, save the resolved recipe, open the metrics logger. `close_output` ends it."""
    claim_output_dir(start.layout.root)
    console.keep_log_in(start.layout.root)
    prepare_output(start.layout, recipe.output, start.resume)
    if distributed.is_main():
        save_resolved(recipe, start.layout.root, stage)
        start.plan = memory_plan.announce(stage, recipe)
    return make_logger(start.layout, recipe.output.report_to, resumed=start.resume is not None)


def close_output(layout: RunLayout, logger: MetricsLogger) -> None:
    logger.close()
    unlock_output_dir(layout.root)


# ----------------------------------------------------------------------------- layout and resume


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def staging(self) -> Path:  # HF Trainer's output_dir: checkpoints are written here, then published
        return self.root / ".staging"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def prepare_output(layout: RunLayout, output: OutputSection, resume: Path | None) -> None:
    """Clean leftovers of a killed run before resuming from `resume` (None: a fresh start).

    Rank 0 removes the staging dir (half-written checkpoints never reach `checkpoints/`) and cuts
    metrics.jsonl back to the resumed step, so the logged curve continues without duplicates.
    """
    if distributed.is_main():
        shutil.rmtree(layout.staging, ignore_errors=True)
        for p in layout.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        if resume is None and layout.checkpoints.exists():
            if output.resume is False:
                shutil.rmtree(layout.checkpoints)
        if layout.metrics.exists():
            step = _checkpoint_step(resume) if resume is not None else 0
            _truncate_metrics(layout.metrics, step, keep_step_zero=resume is not None)
    distributed.barrier()


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _truncate_metrics(path: Path, step: int, keep_step_zero: bool) -> None:
    """Keep rows logged at or before `step` (a fresh run keeps nothing)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if keep_step_zero and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


# ----------------------------------------------------------------------------- model and tokenizer


# ----------------------------------------------------------------------------- TRL arguments


def training_args(config_cls, train: TrainSection, output: OutputSection, layout: RunLayout, model: ModelSection,
                  configured_state: bool, has_eval: bool, eval_on_start: bool = False, **extra):
    """A TRL config (SFTConfig / RewardConfig) from our sections; the stage adds its own keys in `extra`."""
    eval_every = train.eval_steps if has_eval else None
    return config_cls(
        output_dir=str(layout.staging),
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_batch_size,
        per_device_eval_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=min(float(train.warmup_ratio), 0.999),  # a float in [0, 1) is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        gradient_checkpointing=train.gradient_checkpointing,
        seed=train.seed,
        data_seed=train.seed,
        max_length=train.max_length,
        bf16=model.dtype == "bfloat16",  # TRL defaults bf16=True; on CPU we train in fp32
        fp16=model.dtype == "float16",
        # evaluating before `train()` breaks DeepSpeed (it builds an inference engine); eval_on_start runs inside
        eval_on_start=eval_on_start and has_eval,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=output.save_steps,
        save_total_limit=None,  # CheckpointCallback prunes published checkpoints itself
        logging_steps=output.logging_steps,
        logging_first_step=True,
        report_to=[],  # MetricsCallback feeds metrics.jsonl and the trackers of output.report_to
        disable_tqdm=True,  # ConsoleProgress draws the bar on the console; HF's log dicts then go to the stage's log
        dataloader_num_workers=0,
        accelerator_config={"use_configured_state": True} if configured_state else None,
        **extra,
    )


def train(trainer, resume: Path | None) -> None:
    """Train a TRL trainer from `resume` (or from scratch), saving full (gathered) weights, recording batches if asked."""
    force_full_weights_on_save(trainer)
    maybe_record_batches(trainer)
    if resume is not None and distributed.is_main():
        console.say(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)


def force_full_weights_on_save(trainer) -> None:
    """Under ZeRO-3, make `save_model` gather full weights (not only DeepSpeed shards) whatever the config says."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        plugin.deepspeed_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


# ----------------------------------------------------------------------------- callbacks


def _callbacks():
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        """Publish each checkpoint atomically once all ranks wrote their part; keep the last `keep_last`."""

        def __init__(self, layout: RunLayout, keep_last: int):
            self.layout, self.keep_last = layout, keep_last

        def on_save(self, args, state, control, **kwargs):
            distributed.barrier()  # every rank has written its shards / RNG state
            name = f"checkpoint-{state.global_step}"
            if distributed.is_main():
                staged = self.layout.staging / name
                if staged.is_dir():
                    self.layout.checkpoints.mkdir(parents=True, exist_ok=True)
                    publish(staged, self.layout.checkpoints / name)
                    prune(self.layout.checkpoints, self.keep_last)
            distributed.barrier()

    class MetricsCallback(TrainerCallback):
        """HF log dicts -> metrics.jsonl and the trackers as `train/<key>` and `eval/<key>` at the global step."""

        def __init__(self, logger: MetricsLogger):
            self.logger = logger
            self.evaluations: list[tuple[int, dict]] = []  # (step, eval metrics) of every evaluation

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evaluations.append((state.global_step, dict(metrics or {})))

        def on_log(self, args, state, control, logs=None, **kwargs):
            out = {}
            for key, value in (logs or {}).items():
                if not isinstance(value, (int, float)) or key in ("total_flos",):
                    continue
                out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = value
            if out:
                self.logger.log(state.global_step, out)

    class EarlyStoppingOnEvalLoss(TrainerCallback):
        """Stop after `patience` evaluations without a lower eval loss (no best-model reload needed)."""

        def __init__(self, patience: int):
            self.patience, self.best, self.bad = patience, float("inf"), 0

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            if loss < self.best:
                self.best, self.bad = loss, 0
            else:
                self.bad += 1
                if self.bad >= self.patience:
                    control.should_training_stop = True

    class ConsoleProgress(TrainerCallback):
        """One bar on the console for the whole training (rank 0), the latest loss beside it."""

        def __init__(self, desc: str):
            self.desc, self.bar = desc, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = console.progress(state.max_steps, self.desc, initial=state.global_step,
                                        disable=not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and "loss" in (logs or {}):
                self.bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return CheckpointCallback, MetricsCallback, EarlyStoppingOnEvalLoss, ConsoleProgress


def stage_callbacks(layout: RunLayout, output: OutputSection, train: TrainSection, logger: MetricsLogger) -> list:
    """[CheckpointCallback, MetricsCallback, ConsoleProgress, (EarlyStopping)]; MetricsCallback.evaluations keeps every
    evaluation."""
    CheckpointCallback, MetricsCallback, EarlyStopping, ConsoleProgress = _callbacks()
    callbacks = [CheckpointCallback(layout, output.save_total_limit), MetricsCallback(logger),
                 ConsoleProgress(layout.root.name)]
    if train.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(train.early_stopping_patience))
    return callbacks


def make_logger(layout: RunLayout, report_to: list[str], resumed: bool) -> MetricsLogger:
    return MetricsLogger(layout.root, console_every=None,  # the stage's progress bar shows the loss
                         report_to=report_to, resumed=resumed)


# ----------------------------------------------------------------------------- export


def export_final(trainer, tokenizer, layout: RunLayout, model: ModelSection, merge_lora: bool, auto_cls) -> Path:
    """Write `<output.dir>/final` (atomic): HF safetensors + tokenizer, loadable by transformers and vLLM.

    Every rank must call this (ZeRO-3 gathers the weights collectively); rank 0 writes. With LoRA the
    adapter (plus saved modules such as the RM's score head) goes to `<output.dir>/adapter`, and `final`
    holds the merged model (or a copy of the adapter when merge_lora is False).
    """
    from peft import PeftModel

    is_lora = isinstance(trainer.model, PeftModel) or model.lora is not None
    force_full_weights_on_save(trainer)
    staging = layout.root / ".tmp-export"
    if distributed.is_main():
        shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()
    trainer.save_model(str(staging))  # collective under ZeRO-3; writes on rank 0 only
    distributed.barrier()
    if distributed.is_main():
        if is_lora:
            with atomic_directory(layout.adapter) as tmp:
                _copy_tree(staging, tmp)
                tokenizer.save_pretrained(str(tmp))
            with atomic_directory(layout.final) as tmp:
                if merge_lora:
                    merged = merge_adapter(layout.adapter, auto_cls, models.DTYPES[model.dtype])
                    merged.save_pretrained(str(tmp), safe_serialization=True)
                else:
                    _copy_tree(layout.adapter, tmp)
                tokenizer.save_pretrained(str(tmp))
        else:
            with atomic_directory(layout.final) as tmp:
                _copy_tree(staging, tmp)
                tokenizer.save_pretrained(str(tmp))
        for junk in ("training_args.bin",):
            for d in (layout.final, layout.adapter):
                (d / junk).unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(layout.staging, ignore_errors=True)  # only TRL's model card is left there by now
    distributed.barrier()
    return layout.final


def merge_adapter(adapter_dir: str | Path, auto_cls, dtype: torch.dtype = torch.float32):
    """Load the base model named in the adapter config in `dtype`, apply the adapter, merge it into the weights."""
    from peft import PeftConfig, PeftModel

    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    kwargs = {"num_labels": 1} if "SequenceClassification" in auto_cls.__name__ else {}
    base = auto_cls.from_pretrained(cfg.base_model_name_or_path, dtype=dtype, **kwargs)
    if kwargs:
        base.config.pad_token_id = _pad_id_from(adapter_dir, base)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged


def _pad_id_from(adapter_dir, base) -> int | None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(adapter_dir))
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    except OSError:
        return base.config.pad_token_id


def _copy_tree(src: Path, dst: Path) -> None:
    for item in Path(src).iterdir():
        target = Path(dst) / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)


def report_data(layout: RunLayout, report, lines: list[str] = (), **extra) -> None:
    """Print the data report (and the stage's own `lines` about its data) and write it, with `extra`, to
    `<output.dir>/data_report.json` (rank 0)."""
    if distributed.is_main():
        console.say(*[report.summary(), *lines])
        (layout.root / "data_report.json").write_text(json.dumps(report.to_dict() | extra, indent=2, default=str))


def gold_before(section, model: ModelSection, stage: str, resume, summary: dict, logger: MetricsLogger) -> None:
    """The gold metric of the starting policy (fresh runs only), into `summary["gold_before"]` and the metrics at step
    0 (rank 0, a plain single-process model; the others wait)."""
    from alignment.evaluation.gold import gold_eval_path

    if section is None or resume is not None:
        return
    if distributed.is_main():
        before = gold_eval_path(model.name_or_path, section, models.DTYPES[model.dtype])
        summary["gold_before"] = before.mean
        logger.log(0, {"gold/mean": before.mean})
        console.say(f"gold metric before {stage}: {before.mean:.4f} on {len(before.scores)} prompts")
    distributed.barrier()


def gold_after(section, layout: RunLayout, model: ModelSection, merged: bool, tokenizer, step: int, summary: dict,
               logger: MetricsLogger) -> None:
    """The gold metric of the exported policy (base + adapter merged in memory when `final` holds an adapter), into
    `summary["gold_after"]` with a few examples (rank 0)."""
    from transformers import AutoModelForCausalLM

    from alignment.evaluation.gold import gold_eval, gold_eval_path

    if section is not None and distributed.is_main():
        if model.lora is None or merged:
            after = gold_eval_path(layout.final, section, models.DTYPES[model.dtype])
        else:
            after = gold_eval(merge_adapter(layout.adapter, AutoModelForCausalLM, models.DTYPES[model.dtype]), tokenizer,
                              section)
        summary["gold_after"] = after.mean
        logger.log(step, {"gold/mean": after.mean})
        summary["gold_examples"] = [{"prompt": p, "completion": c, "gold": s}
                                    for p, c, s in zip(after.prompts[:5], after.completions[:5], after.scores[:5])]
    distributed.barrier()


def gold_line(summary: dict) -> str:
    """The summary's gold metric, before -> after (`gold_before` / `gold_after`), for a stage's closing lines."""
    before = summary.get("gold_before")
    return (f"  gold metric: {before:.4f} -> {summary['gold_after']:.4f}" if before is not None
            else f"  gold metric: {summary['gold_after']:.4f}")


def release_trainer(trainer) -> None:
    """Free what a finished trainer holds on this rank (DeepSpeed engine, optimizer states, gradients, the model), so
    that what follows (scoring the exported model) has the memory training had. Only `trainer.state` stays usable."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = trainer.lr_scheduler = None
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unset_zero3_init() -> None:
    """After training, let rank 0 load models normally (HF's ZeRO-3 hook would partition them collectively)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:
        pass


def write_probe(layout: RunLayout, probe: dict) -> None:
    """`<output.dir>/probe.json`: a few held-out inputs and what the in-memory trained model computed for them,
    so anyone can check that the exported checkpoint reproduces them (tests do, for ZeRO-3 gathers and LoRA merges)."""
    if distributed.is_main():
        tmp = layout.root / ".probe.json.tmp"
        tmp.write_text(json.dumps(probe))
        os.replace(tmp, layout.root / "probe.json")


def write_summary(layout: RunLayout, summary: dict, plan: memory_plan.MemoryPlan | None = None) -> None:
    """`<output.dir>/summary.json` with the memory plan's per-rank total and rank 0's measured peak."""
    if distributed.is_main():
        summary = {**summary, "memory_gib": {"planned_per_rank": plan.per_rank / memory_plan.GiB if plan else None,
                                             "peak_rank0": memory_plan.peak_bytes() / memory_plan.GiB}}
        tmp = layout.summary.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, layout.summary)


# ----------------------------------------------------------------------------- test hook


RECORD_ENV = "ALIGNMENT_RECORD_BATCHES"


def maybe_record_batches(trainer) -> None:
    """With $ALIGNMENT_RECORD_BATCHES=<dir>, append a hash of every training example this rank is fed to
    `<dir>/rank<r>.jsonl` (tests check that ranks see different data). Only the train dataloader records."""
    out_dir = os.environ.get(RECORD_ENV)
    if not out_dir:
        return
    import hashlib

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    sink = open(Path(out_dir) / f"rank{distributed.rank()}.jsonl", "a", buffering=1)
    build_train_dataloader = trainer.get_train_dataloader

    def recording(collate):
        def collate_and_record(features):
            for f in features:
                key = {k: list(f[k]) for k in ("input_ids", "chosen_ids", "rejected_ids") if k in f}
                sink.write(json.dumps({"hash": hashlib.sha1(json.dumps(key).encode()).hexdigest()}) + "\n")
            return collate(features)

        return collate_and_record

    def get_train_dataloader():
        collate = trainer.data_collator
        trainer.data_collator = recording(collate)
        try:
            return build_train_dataloader()
        finally:
            trainer.data_collator = collate

    trainer.get_train_dataloader = get_train_dataloader
