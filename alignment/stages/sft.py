"""`alignment sft recipe.yaml`: supervised fine-tuning on demonstrations with TRL's SFTTrainer.

Reads top to bottom: setup -> data (tokenised here by TRL's own code, so that over-long rows are counted, then
dropped or truncated by `sft.overlong`; TRL would cut them silently: see alignment/data/sft_rows.py) -> baseline
-> train (resuming from the latest complete checkpoint) -> final evaluation -> export to `<output.dir>/final`
-> gold metric on held-out prompts.
Outputs under `<output.dir>`: recipe.yaml, data_report.json, checkpoints/checkpoint-<step>, final/,
adapter/ (LoRA), metrics.jsonl, sft.log (the libraries' output), the trackers' stores (tensorboard/), summary.json.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from alignment import console, distributed, models
from alignment.config.sft import SFTRecipe
from alignment.data.pairs import overlong_lines
from alignment.errors import RecipeError
from alignment.stages import common
from reward.scoring import common_prefix_length


def run(recipe: SFTRecipe) -> dict:
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    # ---- setup: world, output layout, resume point (nothing written yet)
    start = common.start_stage(recipe)
    configured_state, layout, resume, tokenizer = start.configured_state, start.layout, start.resume, start.tokenizer

    # ---- data; only once it is usable does the output directory change
    data, loss_on, loss_flags, overlong = _training_data(recipe, tokenizer)
    logger = common.open_output(start, recipe, "sft")
    cut_away = {"loss_cut_away": f"with {LOSS_PART[loss_on]} cut away"} if loss_on in LOSS_PART else {}
    common.report_data(layout, data.report, [f"sft: loss on: {loss_on}",
                                             *overlong_lines(overlong, recipe.train.max_length, "rows", cut_away)],
                       overlong=overlong)
    summary: dict = {"resumed_from": str(resume) if resume else None, "train_rows": len(data.train),
                     "eval_rows": len(data.eval) if data.eval is not None else 0, "overlong": overlong}

    # ---- baseline gold metric of the untrained policy (fresh runs only)
    common.gold_before(recipe.gold_eval, recipe.model, "SFT", resume, summary, logger)

    # ---- trainer (args first: under ZeRO-3 they must exist before the model is built)
    args = common.training_args(
        SFTConfig, recipe.train, recipe.output, layout, recipe.model, configured_state, data.eval is not None,
        eval_on_start=resume is None,
        packing=recipe.sft.packing,
        **loss_flags,
    )
    # Seeded before the model exists: the Trainer seeds only later, so a new score head (or LoRA weights)
    # would otherwise start from whatever the process's RNG held, and runs would differ.
    set_seed(recipe.train.seed)
    model = models.load_model(recipe.model, AutoModelForCausalLM)
    callbacks = common.stage_callbacks(layout, recipe.output, recipe.train, logger)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=models.lora_config(recipe.model.lora, "CAUSAL_LM"),
        callbacks=callbacks,
    )

    # ---- train
    common.train(trainer, resume)
    summary["steps"] = trainer.state.global_step
    first_eval = callbacks[1].evaluations[0] if callbacks[1].evaluations else (None, {})
    if first_eval[0] == 0 and "eval_loss" in first_eval[1]:
        summary["eval_loss_before"] = first_eval[1]["eval_loss"]

    # ---- final evaluation and export
    if data.eval is not None:
        summary["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        probe = trainer.eval_dataset.select(range(min(recipe.sft.probe_examples, len(trainer.eval_dataset))))
        nll = completion_nll(trainer.model, probe)  # all ranks: ZeRO-3 gathers each layer as it goes
        summary["probe_nll_mean"] = sum(nll) / max(len(nll), 1)
        common.write_probe(layout, {"input_ids": list(probe["input_ids"]),
                                    "labels": list(probe["labels"]) if "labels" in probe.column_names else None, "nll": nll})
    final = common.export_final(trainer, tokenizer, layout, recipe.model, recipe.sft.merge_lora_on_export, AutoModelForCausalLM)

    # ---- gold metric of the trained policy, from the exported checkpoint
    common.unset_zero3_init()
    common.gold_after(recipe.gold_eval, layout, recipe.model, recipe.sft.merge_lora_on_export, tokenizer,
                      trainer.state.global_step, summary, logger)

    if distributed.is_main():
        _print_summary(summary, final)
    common.write_summary(layout, summary, start.plan)
    common.close_output(layout, logger)
    return summary


@torch.no_grad()
def completion_nll(model, examples) -> list[float]:
    """Per-example mean NLL of the tokens that carry loss (labels != -100), one example per forward.

    `examples`: rows of the trainer's tokenized dataset, or dicts with `input_ids` and `labels`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]], device=device)
        labels = torch.tensor(ex.get("labels") or ex["input_ids"], device=device)[1:]
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        out.append((nll / (labels != -100).sum().clamp(min=1)).item())
    model.train(was_training)
    return out


def _training_data(recipe: SFTRecipe, tokenizer):
    """The stage's data as the trainer takes it (token ids and labels, over-long rows handled by `sft.overlong`),
    `sft.loss_on` resolved, TRL's loss flags for it, and the over-long counts by split."""
    from alignment.data import load_stage_data
    from alignment.data.sft_rows import tokenize_splits

    data = load_stage_data(recipe.data, "sft", tokenizer)
    loss_on, loss_flags = _loss_setup(recipe, data.format.layout)
    if loss_on == "assistant":  # turn boundaries rendered here, so any chat template works
        data = replace(data, train=assistant_masked(data.train, tokenizer),
                       eval=assistant_masked(data.eval, tokenizer) if data.eval is not None else None)
    train, evald, overlong = tokenize_splits(data, tokenizer, recipe.train.max_length, recipe.sft.overlong,
                                             loss_flags["completion_only_loss"])
    return replace(data, train=train, eval=evald), loss_on, loss_flags, overlong


LOSS_ON_BY_FORMAT = {"prompt_completion": "completion", "messages": "assistant", "text": "all"}
# What truncation cuts away from a row that then trains nothing, by `sft.loss_on` (with "all" nothing can be).
LOSS_PART = {"completion": "their whole completion", "assistant": "every assistant turn"}


def _loss_setup(recipe: SFTRecipe, layout: str) -> tuple[str, dict]:
    """`sft.loss_on` resolved against the data's format, and TRL's loss-masking flags for it."""
    loss_on = LOSS_ON_BY_FORMAT[layout] if recipe.sft.loss_on == "auto" else recipe.sft.loss_on
    needs = {"completion": "prompt_completion", "assistant": "messages"}.get(loss_on)
    if needs is not None and layout != needs:
        names = {"prompt_completion": "prompt/completion", "messages": "chat messages", "text": "plain text"}
        raise RecipeError(f"sft.loss_on: '{loss_on}' needs {names[needs]} data, but the data is {names[layout]}; "
                          f"use '{LOSS_ON_BY_FORMAT[layout]}' (or 'auto')")
    # Assistant masks come with the tokenized data (`assistant_masked`), which TRL applies as given.
    return loss_on, {"completion_only_loss": loss_on == "completion", "assistant_only_loss": False}


def assistant_masked(dataset, tokenizer):
    """Tokenize conversations with `assistant_masks` = 1 on the tokens of every assistant turn (its end-of-turn
    tokens included), found by rendering each turn's prefix, as TRL's prompt/completion path does: the tokens of
    messages[:i] + the assistant header are followed, in the whole rendering, by turn i's tokens up to where the
    rendering of messages[:i+1] ends. No `{% generation %}` markers are needed in the chat template."""

    def encode(row):
        messages = row["messages"]
        ids = _render(tokenizer, messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = common_prefix_length(ids, _render(tokenizer, messages[:i], add_generation_prompt=True))
            end = common_prefix_length(ids, _render(tokenizer, messages[: i + 1]))
            mask[start:end] = [1] * (end - start)
        return {"input_ids": ids, "assistant_masks": mask}

    return dataset.map(encode, remove_columns=dataset.column_names, desc="rendering assistant turns")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    if not messages:
        return []
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                              return_dict=True)["input_ids"])


def _print_summary(summary: dict, final) -> None:
    lines = [f"SFT done: {summary['steps']} steps; model written to {final}"]
    if "eval_loss_after" in summary:
        before = summary.get("eval_loss_before")
        lines.append(f"  eval loss: {before:.4f} -> {summary['eval_loss_after']:.4f}" if before is not None
                     else f"  eval loss: {summary['eval_loss_after']:.4f}")
    if "gold_after" in summary:
        lines.append(common.gold_line(summary))
    console.say(*lines)


def eval_loss(model_dir: str | Path, recipe: SFTRecipe) -> float:
    """Eval loss of a saved checkpoint on the recipe's held-out split, in this process (same batching as the stage)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data, _, loss_flags, _ = _training_data(recipe, tokenizer)
    if data.eval is None:
        raise RecipeError("data: no held-out split to evaluate on (set data.eval_fraction or data.eval_sources)")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=models.DTYPES[recipe.model.dtype])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_eval_batch_size=recipe.train.per_device_batch_size, max_length=recipe.train.max_length,
                         bf16=recipe.model.dtype == "bfloat16", fp16=recipe.model.dtype == "float16", report_to=[], disable_tqdm=True,
                         **loss_flags)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data.train.select(range(1)), eval_dataset=data.eval,
                             processing_class=tokenizer)
        return trainer.evaluate()["eval_loss"]
