"""`alignment rm recipe.yaml`: a Bradley-Terry reward model on preference pairs with TRL's RewardTrainer.

loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin) [+ c * mean((r_chosen + r_rejected)^2)]

Reads top to bottom: setup -> data (tokenised here, so over-long pairs are counted, then dropped or
truncated by `rm.overlong`; TRL would drop them silently) -> train (resumable) -> held-out accuracy and
margins -> export to `<output.dir>/final` (+ reward_stats.json) -> optional gold agreement.

What comes after the export (reward statistics, held-out accuracy, gold agreement) scores the exported checkpoint in
the model's dtype on every rank, each rank a share of the sequences: on rank 0 alone, in fp32, it took tens of
minutes at 7B while the other ranks waited in a collective with a 10-minute timeout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from alignment import console, distributed, models
from alignment.config.rm import RMRecipe
from alignment.stages import common
from alignment.training import device


def run(recipe: RMRecipe) -> dict:
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from alignment.data import load_stage_data
    from alignment.data.pairs import overlong_lines, tokenize_splits
    from reward.scoring import STATS_FILE, RewardModelScorer, rendering_of

    # ---- setup: world, output layout, resume point (nothing written yet)
    start = common.start_stage(recipe)
    configured_state, layout, resume, tokenizer = start.configured_state, start.layout, start.resume, start.tokenizer

    # ---- data: tokenise pairs ourselves so that over-long pairs are counted before anything drops them;
    # only once the data is usable does the output directory change
    data = load_stage_data(recipe.data, "preference", tokenizer)
    train, evald, overlong = tokenize_splits(data, tokenizer, recipe.train.max_length, recipe.rm.overlong,
                                             keep_columns=("margin",) if recipe.rm.use_margin else ())
    logger = common.open_output(start, recipe, "rm")
    summary: dict = {"resumed_from": str(resume) if resume else None, "overlong": overlong}
    common.report_data(layout, data.report, overlong_lines(overlong, recipe.train.max_length), overlong=overlong)

    # ---- trainer (args first: under ZeRO-3 they must exist before the model is built)
    args = common.training_args(
        RewardConfig, recipe.train, recipe.output, layout, recipe.model, configured_state, evald is not None,
        center_rewards_coefficient=recipe.rm.center_rewards_coefficient,
    )
    # Seeded before the model exists: the Trainer seeds only later, so a new score head (or LoRA weights)
    # would otherwise start from whatever the process's RNG held, and runs would differ.
    set_seed(recipe.train.seed)
    model = models.load_model(recipe.model, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evald,
        processing_class=tokenizer,
        peft_config=models.lora_config(recipe.model.lora, "SEQ_CLS"),  # SEQ_CLS keeps the score head trained and saved
        callbacks=common.stage_callbacks(layout, recipe.output, recipe.train, logger),
    )

    # ---- train
    common.train(trainer, resume)
    summary["steps"] = trainer.state.global_step

    # ---- held-out evaluation with the in-memory (possibly sharded) model
    if evald is not None:
        metrics = trainer.evaluate()
        summary["trainer_eval"] = {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")}
        pairs = evald.select(range(min(recipe.rm.probe_pairs, len(evald))))
        probe = probe_rewards(trainer, pairs)  # all ranks: ZeRO-3 gathers each layer as it goes
        summary["probe_margin_mean"] = sum(c - r for c, r in zip(probe["chosen"], probe["rejected"])) / max(len(pairs), 1)
        common.write_probe(layout, {"chosen_ids": list(pairs["chosen_ids"]), "rejected_ids": list(pairs["rejected_ids"]), **probe})

    # ---- export, then statistics and evaluation from the exported checkpoint, shared by every rank
    final = common.export_final(trainer, tokenizer, layout, recipe.model, merge_lora=True, auto_cls=AutoModelForSequenceClassification)
    step = trainer.state.global_step
    common.release_trainer(trainer)  # the training state makes room for the exported model on every rank
    del trainer, model
    common.unset_zero3_init()
    scorer = RewardModelScorer(final, device=device(), batch_size=64, dtype=models.DTYPES[recipe.model.dtype])
    n = min(recipe.rm.stats_max_pairs, len(train))
    rewards = score_across_ranks(scorer, list(train[:n]["chosen_ids"]) + list(train[:n]["rejected_ids"]))
    stats = {"mean": rewards.mean().item(), "std": rewards.std().item(), "num_rewards": len(rewards),
             "max_length": recipe.train.max_length,
             # how pairs were rendered: every consumer (PPO, eval, labelers) must render the same way
             "rendering": rendering_of(tokenizer, data.format.conversational)}
    summary["reward_stats"] = stats
    if evald is not None:
        summary["eval"] = pairwise_eval(*score_across_ranks(scorer, list(evald["chosen_ids"]) + list(evald["rejected_ids"]))
                                        .chunk(2))
        logger.log(step, {f"eval/pairwise_{k}": v for k, v in summary["eval"].items()})
    if recipe.gold_agreement is not None:
        summary["gold_agreement"] = gold_agreement(recipe, scorer)
        logger.log(step, {"gold/agreement": summary["gold_agreement"]["agreement"]})
    if distributed.is_main():
        for target in [final] + ([layout.adapter] if layout.adapter.exists() else []):
            _write_json(target / STATS_FILE, stats)
        _print_summary(summary, final)
    distributed.barrier()
    common.write_summary(layout, summary, start.plan)
    common.close_output(layout, logger)
    return summary


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def probe_rewards(trainer, pairs) -> dict:
    """Rewards of a few held-out pairs from the model in memory (all ranks run it: ZeRO-3 gathers per layer)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = trainer.processing_class.pad_token_id
    out = {}
    for side in ("chosen_ids", "rejected_ids"):
        seqs = list(pairs[side])
        if not seqs:
            out[side.split("_")[0]] = []
            continue
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        out[side.split("_")[0]] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().tolist()
    model.train(was_training)
    return out


def score_across_ranks(scorer, sequences: list[list[int]]) -> torch.Tensor:
    """Rewards [N] of encoded sequences on every rank, each rank scoring a share (`distributed.map_shares`)."""
    return torch.tensor(distributed.map_shares(sequences, lambda share: scorer.score_ids(share).tolist()))


def pairwise_eval(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Held-out pairwise accuracy and reward-margin statistics (margin = r_chosen - r_rejected) of the pairs' rewards."""
    margin = chosen - rejected
    loss = torch.nn.functional.softplus(-margin).mean().item()  # -log sigmoid(margin)
    return {
        "accuracy": (margin > 0).float().mean().item(),
        "margin_mean": margin.mean().item(),
        "margin_std": margin.std().item() if len(margin) > 1 else 0.0,
        "margin_min": margin.min().item(),
        "margin_max": margin.max().item(),
        "loss": loss,
        "num_pairs": len(margin),
    }


def gold_agreement(recipe: RMRecipe, scorer) -> dict:
    """Fresh completions from the base policy, samples_per_prompt (at least two) per held-out prompt, compared in
    consecutive pairs; how often the RM orders a pair as the rule does. Every rank takes a share of the prompts (rank r:
    r, r + W, ...) and sees the whole result.

    Pairs whose two completions get the same gold score carry no preference and are skipped (counted).
    """
    from transformers import AutoModelForCausalLM

    from alignment.evaluation.gold import generate, load_prompts, score

    section = recipe.gold_agreement
    tokenizer = scorer.tokenizer
    world, rank = distributed.world_size(), distributed.rank()
    all_prompts, all_columns = load_prompts(section)
    prompts, columns = all_prompts[rank::world], {k: v[rank::world] for k, v in all_columns.items()}
    policy = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=models.DTYPES[recipe.model.dtype])
    temperature = section.temperature if section.temperature > 0 else 1.0  # different samples per prompt
    n = max(2, section.samples_per_prompt) // 2 * 2
    completions = generate(policy.to(device()), tokenizer, prompts, section.max_new_tokens, temperature,
                           num_return_sequences=n, seed=recipe.train.seed + rank) if prompts else []
    del policy
    a, b = completions[0::2], completions[1::2]  # completions come n per prompt: n / 2 pairs of each prompt
    prompts, columns = [p for p in prompts for _ in range(n // 2)], {k: [v for v in vs for _ in range(n // 2)]
                                                                     for k, vs in columns.items()}
    gold_a, gold_b = score(section.reward_function, prompts, a, columns), score(section.reward_function, prompts, b, columns)
    rm_a, rm_b = scorer.score(prompts, a).tolist(), scorer.score(prompts, b).tolist()
    shares = distributed.gather_objects(list(zip(gold_a, gold_b, rm_a, rm_b)))
    agree = decided = ties = 0
    for ga, gb, ra, rb in (pair for share in shares for pair in share):
        if math.isclose(ga, gb):
            ties += 1
            continue
        decided += 1
        agree += (ga > gb) == (ra > rb)
    return {"agreement": agree / decided if decided else float("nan"), "pairs": decided, "gold_ties_skipped": ties,
            "temperature": temperature, "prompts": len(all_prompts)}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _print_summary(summary: dict, final) -> None:
    lines = [f"RM done: {summary['steps']} steps; model written to {final}"]
    if "eval" in summary:
        e = summary["eval"]
        lines.append(f"  held-out pairwise accuracy {e['accuracy']:.4f} on {e['num_pairs']} pairs; "
                     f"margin mean {e['margin_mean']:.3f} (std {e['margin_std']:.3f})")
    s = summary["reward_stats"]
    lines.append(f"  reward stats over training pairs: mean {s['mean']:.3f}, std {s['std']:.3f}")
    if "gold_agreement" in summary:
        g = summary["gold_agreement"]
        lines.append(f"  gold agreement {g['agreement']:.4f} on {g['pairs']} fresh pairs ({g['gold_ties_skipped']} gold ties skipped)")
    console.say(*lines)
