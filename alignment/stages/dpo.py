"""`alignment dpo recipe.yaml`: direct preference optimisation on preference pairs with TRL's DPOTrainer.

The offline road from preference pairs to a policy, with no reward model and no rollouts (Rafailov et al. 2023):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

(or another of TRL's losses: `dpo.loss`). Reads top to bottom: setup -> data (the reward-model stage's pairs: the
same formats, rendering, one-line errors and over-long counts) -> reference log-probs, computed once, every rank a
share -> train (resumable) -> held-out implicit-reward accuracy -> export to `<output.dir>/final` -> optional gold
metric before and after.

The pairs reach TRL already tokenized and with their reference log-probs: TRL's own tokenization would render them
apart from the reward model's, and its precompute of reference log-probs reads per-rank temporary files of in-memory
datasets (rank 1 fails on two ranks) and caches them by a hash that ZeRO-3's empty parameter placeholders make the
same for every model.
"""

from __future__ import annotations


import torch

from alignment import console, distributed, models
from alignment.config.dpo import DPORecipe
from alignment.stages import common


def run(recipe: DPORecipe) -> dict:
    from transformers import AutoModelForCausalLM, set_seed
    from trl import DPOConfig

    from alignment.data import load_stage_data
    from alignment.data.pairs import overlong_lines, tokenize_splits
    from reward.scoring import rendering_of

    # ---- setup: world, output layout, resume point (nothing written yet)
    start = common.start_stage(recipe)
    configured_state, layout, resume, tokenizer = start.configured_state, start.layout, start.resume, start.tokenizer

    # ---- data: the pairs as the reward-model stage tokenises them; only once they are usable does output.dir change
    data = load_stage_data(recipe.data, "preference", tokenizer)
    train, evald, overlong = tokenize_splits(data, tokenizer, recipe.train.max_length, recipe.dpo.overlong,
                                             with_prompt_len=True)
    logger = common.open_output(start, recipe, "dpo")
    summary: dict = {"resumed_from": str(resume) if resume else None, "overlong": overlong,
                     # how the pairs were rendered (the reward-model stage records the same for its pairs)
                     "rendering": rendering_of(tokenizer, data.format.conversational)}
    common.report_data(layout, data.report, overlong_lines(overlong, recipe.train.max_length), overlong=overlong)
    common.gold_before(recipe.gold_eval, recipe.model, "DPO", resume, summary, logger)

    # ---- reference log-probs, before the training arguments exist (under ZeRO-3 a model loaded after them is built
    # partitioned): every rank loads the reference whole and scores a share of the pairs
    reference = None if recipe.dpo.reference == "none" else (recipe.reference or recipe.model)
    batch = recipe.train.per_device_batch_size
    train = trl_pairs(train, reference_logps(reference, train, batch, tokenizer.pad_token_id))
    if evald is not None:
        evald = trl_pairs(evald, reference_logps(reference, evald, batch, tokenizer.pad_token_id))

    # ---- trainer (args first: under ZeRO-3 they must exist before the model is built)
    args = common.training_args(
        DPOConfig, recipe.train, recipe.output, layout, recipe.model, configured_state, evald is not None,
        beta=recipe.dpo.beta, loss_type=[recipe.dpo.loss], label_smoothing=recipe.dpo.label_smoothing,
        precompute_ref_log_probs=True,  # the log-probs are in the data: TRL keeps no reference model
    )
    set_seed(recipe.train.seed)
    model = models.load_model(recipe.model, AutoModelForCausalLM)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train, eval_dataset=evald, processing_class=tokenizer,
        peft_config=models.lora_config(recipe.model.lora, "CAUSAL_LM"),
        callbacks=common.stage_callbacks(layout, recipe.output, recipe.train, logger),
    )

    # ---- train, then the held-out pairs' implicit rewards from the model in memory
    common.train(trainer, resume)
    summary["steps"] = trainer.state.global_step
    if evald is not None:
        metrics = trainer.evaluate()
        summary["eval"] = {"accuracy": metrics["eval_rewards/accuracies"], "margin_mean": metrics["eval_rewards/margins"],
                           "loss": metrics["eval_loss"], "num_pairs": len(evald)}
        logger.log(summary["steps"], {f"eval/implicit_reward_{k}": v for k, v in summary["eval"].items()})
        pairs = evald.select(range(min(recipe.dpo.probe_pairs, len(evald))))
        common.write_probe(layout, {**pairs.to_dict(), "beta": recipe.dpo.beta,
                                    **implicit_rewards(trainer.model, pairs, recipe.dpo.beta, tokenizer.pad_token_id)})

    # ---- export, then the gold metric of the exported policy
    final = common.export_final(trainer, tokenizer, layout, recipe.model, recipe.dpo.merge_lora_on_export, AutoModelForCausalLM)
    common.unset_zero3_init()
    common.gold_after(recipe.gold_eval, layout, recipe.model, recipe.dpo.merge_lora_on_export, tokenizer,
                      summary["steps"], summary, logger)
    if distributed.is_main():
        _print_summary(summary, final)
    common.write_summary(layout, summary, start.plan)
    common.close_output(layout, logger)
    return summary


# ----------------------------------------------------------------------------- pairs for TRL


def trl_pairs(pairs, ref_logps: dict[str, list[float]]):
    """Our tokenized pairs (whole sequences + where the answer starts) as TRL's DPO collator takes them: prompt ids,
    each answer's ids, and the reference log-probs of both answers."""
    def split(row):
        cut = row["prompt_len"]
        return {"prompt_ids": row["chosen_ids"][:cut], "chosen_ids": row["chosen_ids"][cut:],
                "rejected_ids": row["rejected_ids"][cut:]}

    pairs = pairs.map(split, remove_columns=["prompt_len"], desc="splitting prompts and answers")
    return pairs.add_column("ref_chosen_logps", ref_logps["chosen"]).add_column("ref_rejected_logps", ref_logps["rejected"])


def reference_logps(reference, pairs, batch_size: int, pad_id: int) -> dict[str, list[float]]:
    """Sum of the reference's log-probs over each answer's tokens, for both sides of every pair; zeros when the
    recipe is reference-free. Every rank loads the reference whole and scores a share (`distributed.map_shares`)."""
    if reference is None:
        return {"chosen": [0.0] * len(pairs), "rejected": [0.0] * len(pairs)}
    from transformers import AutoModelForCausalLM

    from alignment.training import device

    model = models.load_model(reference, AutoModelForCausalLM).to(device()).eval()
    cuts = list(pairs["prompt_len"])
    logps = {}
    for side in ("chosen", "rejected"):
        rows = list(zip(cuts, pairs[f"{side}_ids"]))
        logps[side] = distributed.map_shares(rows, lambda share: answer_logps(model, share, batch_size, pad_id))
    return logps  # the reference goes with this frame, before the trainer loads the policy


@torch.no_grad()
def answer_logps(model, rows: list[tuple[int, list[int]]], batch_size: int, pad_id: int) -> list[float]:
    """For (answer start, token ids) rows: the sum of log p(token | tokens before) over the answer's tokens, in float32
    (the chunked log-softmax PPO uses: no [B, T, V] float32 copy of the logits)."""
    from alignment.ppo.logprobs import token_logprobs

    dev = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        ids = torch.tensor([seq + [pad_id] * (width - len(seq)) for _, seq in chunk], device=dev)
        attention = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for _, seq in chunk], device=dev)
        logp = token_logprobs(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])[0]
        positions = torch.arange(width - 1, device=dev)
        answer = torch.stack([(positions >= cut - 1) & (positions < len(seq) - 1) for cut, seq in chunk])
        out += (logp.float() * answer).sum(1).tolist()
    return out


def implicit_rewards(model, pairs, beta: float, pad_id: int) -> dict[str, list[float]]:
    """beta * (log pi - log ref) of each answer, summed over its tokens, from `model` (TRL's collator layout: prompt ids
    + answer ids). Every rank runs every pair (ZeRO-3 gathers each layer as it goes)."""
    was_training = model.training
    model.eval()
    rewards = {}
    for side in ("chosen", "rejected"):
        rows = [(len(p), p + a) for p, a in zip(pairs["prompt_ids"], pairs[f"{side}_ids"])]
        logps = answer_logps(model, rows, batch_size=len(rows) or 1, pad_id=pad_id)
        rewards[side] = [beta * (lp - ref) for lp, ref in zip(logps, pairs[f"ref_{side}_logps"])]
    model.train(was_training)
    return rewards


def _trainer_class():
    from trl import DPOTrainer

    class PairsDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on pairs we tokenized, with reference log-probs we computed (see the module docstring)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    return PairsDPOTrainer


def _print_summary(summary: dict, final) -> None:
    lines = [f"DPO done: {summary['steps']} steps; model written to {final}"]
    if "eval" in summary:
        e = summary["eval"]
        lines.append(f"  held-out pairs ranked by the implicit reward: accuracy {e['accuracy']:.4f} on {e['num_pairs']} "
                     f"pairs; margin mean {e['margin_mean']:.3f}")
    if "gold_after" in summary:
        lines.append(common.gold_line(summary))
    console.say(*lines)
