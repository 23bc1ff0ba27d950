"""`alignment eval recipe.yaml`: compare N policies on one held-out prompt set.

Reads top to bottom:
  1. prompts (file order, stable ids) and policies (paths, hub ids, or every checkpoint of a run)
  2. generation: every policy samples with the same sampling parameters and seeds, through one engine
     (policies swapped in by weight sync); per sample: text, token count, finish reason
  3. KL to the reference on each policy's own samples: mean over samples of
     sum_t log pi(x_t | x_<t) - log pi_ref(x_t | x_<t)   (transformers forward of both, temperature 1)
  4. optional LLM judge over every pair of policies (both orders)
  5. scoring: gold metric, rule functions, reward models; one score per sample
  6. statistics: mean score per policy and scorer with bootstrap CIs, pairwise win rates (ties count
     half) with bootstrap CIs over prompts, length, truncation rate
  7. outputs: results.json (every number), samples.jsonl (every sample with its scores), report.md,
     report.html and plots/*.png
Nothing here depends on wall-clock time: the same recipe and seed give the same results.json.
"""

from __future__ import annotations

import json
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from alignment import console
from alignment.config.eval import EvalRecipe
from alignment.config.schema import save_resolved
from alignment.errors import UserError
from alignment.evaluation import stats
from alignment.evaluation.curves import training_runs
from alignment.evaluation.generation import (
    Policy,
    PolicyGenerator,
    completion_text,
    columns_of,
    default_name,
    load_policy,
    load_prompt_rows,
    resolve_policies,
    sequence_logprobs,
)
from alignment.evaluation.text_metrics import heldout_rows, heldout_texts, reference_scores
from rollout.multi_turn import multi_turn_rollouts
from rollout.turn_tokens import end_of_turn_tokens


def run(recipe: EvalRecipe, engine=None) -> dict:
    """Run the evaluation; `engine` optionally reuses a running rollout engine (its weights get replaced)."""
    from alignment.evaluation.report import write_report
    from alignment.models import render_prompt

    t0 = time.perf_counter()
    out = Path(recipe.output_dir)

    # ---- 1. prompts and policies; the output directory is written only once they are usable
    rows = load_prompt_rows(recipe.prompts)
    heldout = heldout_rows(recipe.perplexity) if recipe.perplexity is not None else None
    policies = resolve_policies(recipe.policies, recipe.run)
    reference = _reference(recipe, policies)
    save_resolved(recipe, out, "eval")
    console.keep_log_in(out)
    n, P = recipe.sampling.samples_per_prompt, len(rows)
    sampling = recipe.sampling.to_config()
    console.say(f"eval: {len(policies)} policies x {P} prompts x {n} samples; KL reference: {reference.name}")

    # ---- 2-4. generation, KL, judge (models are loaded one at a time)
    generator = PolicyGenerator(recipe.rollout, seed=recipe.sampling.seed, engine=engine)
    generated: dict[str, dict] = {}
    perplexity: dict[str, dict] = {}
    notes: list[str] = []
    judge_out = None
    try:
        ref_model, ref_tok = load_policy(reference.path, recipe.rollout.dtype) if recipe.kl else (None, None)
        for policy in policies:
            model, tokenizer = load_policy(policy.path, recipe.rollout.dtype)
            if recipe.multi_turn is None:
                prompt_ids = [render_prompt(tokenizer, r.prompt) for r in rows]
                samples = generator.generate(policy, model, tokenizer, prompt_ids, sampling)
            else:  # the policy's own chat template renders its tools and the environment's turns
                episodes = multi_turn_rollouts(recipe.multi_turn, tokenizer, end_of_turn_tokens(policy.path, tokenizer),
                                               recipe.rollout.max_model_len)
                samples = episodes.generate(generator.engine_for(policy, model, tokenizer),
                                            [episodes.prompt_ids(r.prompt) for r in rows], [r.columns for r in rows],
                                            sampling)
            if len(samples) != P * n:
                raise UserError(f"policy '{policy.name}': engine returned {len(samples)} samples, expected {P * n}")
            kl = None
            if ref_model is not None:
                if tokenizer.get_vocab() != ref_tok.get_vocab():
                    notes.append(f"KL of '{policy.name}' not computed: its tokenizer differs from the reference's")
                else:
                    p_ids, c_ids = [s.prompt_ids for s in samples], [s.completion_ids for s in samples]
                    masks = [s.completion_mask for s in samples] if recipe.multi_turn is not None else None
                    lp = sequence_logprobs(model, p_ids, c_ids, recipe.rollout.batch_size, masks)
                    lr = sequence_logprobs(ref_model, p_ids, c_ids, recipe.rollout.batch_size, masks)
                    kl = [a - b for a, b in zip(lp, lr)]
            if heldout is not None:
                perplexity[policy.name] = _perplexity(heldout, recipe, model, tokenizer)
            generated[policy.name] = {
                "texts": [completion_text(s) for s in samples],
                "lengths": [_model_tokens(s) for s in samples],
                "episodes": [s.episode for s in samples] if recipe.multi_turn is not None else None,
                "finish": [s.finish_reason for s in samples],
                "kl": kl,
                "weight_version": samples[0].weight_version if samples else None,
            }
            console.say(f"  generated {policy.name}")
            del model
        del ref_model
        if recipe.judge is not None and len(policies) >= 2:
            judge_out = _judge(recipe, generator, rows, policies, generated)
    finally:
        generator.close()

    # ---- 5. scoring
    prompts_rep = [r.prompt for r in rows for _ in range(n)]
    columns = columns_of(rows, n)

    def columns_for(name: str) -> dict[str, list]:  # multi-turn: each episode's environment reward too
        episodes = generated[name]["episodes"]
        return columns if episodes is None else {**columns, "env_reward": [e["env_reward"] for e in episodes]}

    scores: dict[str, dict[str, list[float]]] = {}
    if recipe.gold_metric:
        scores["gold"] = {p.name: _function_scores(recipe.gold_metric, prompts_rep, generated[p.name]["texts"],
                                                   columns_for(p.name)) for p in policies}
    if rows[0].columns.get(recipe.reference_column) is not None:
        references = columns[recipe.reference_column]
        for metric in recipe.reference_metrics:
            scores[metric] = {p.name: reference_scores(metric, generated[p.name]["texts"], references) for p in policies}
    for spec in recipe.scorers:
        if spec.kind == "function":
            scores[spec.label()] = {p.name: _function_scores(spec.function, prompts_rep, generated[p.name]["texts"],
                                                             columns_for(p.name)) for p in policies}
        else:
            from reward.scoring import RewardModelScorer

            scorer = RewardModelScorer(spec.path, normalize=spec.normalize, batch_size=recipe.rollout.batch_size)
            scores[spec.label()] = {p.name: scorer.score(prompts_rep, generated[p.name]["texts"]).tolist() for p in policies}
            del scorer

    # ---- 6. statistics
    st = recipe.stats
    boot = dict(samples=st.bootstrap_samples, confidence=st.confidence, seed=st.seed)
    per_policy = {}
    for p in policies:
        g = generated[p.name]
        per_policy[p.name] = {
            "scores": {s: stats.mean_score(np.reshape(scores[s][p.name], (P, n)), **boot).to_dict() for s in scores},
            "kl": stats.mean_score(np.reshape(g["kl"], (P, n)), **boot).to_dict() if g["kl"] is not None else None,
            "length": stats.mean_score(np.reshape(g["lengths"], (P, n)), **boot).to_dict(),
            "truncation_rate": stats.truncation_rate(g["finish"]),
            "samples": P * n,
        }
        if g["episodes"] is not None:
            per_policy[p.name]["episodes"] = stats.episode_summary(g["episodes"], P, n, **boot)
        if p.name in perplexity:
            ppl = perplexity[p.name]
            per_policy[p.name]["perplexity"] = stats.perplexity(ppl["nll"], ppl["tokens"], **boot).to_dict()
            per_policy[p.name]["perplexity_texts_cut"] = ppl["cut"]
    win_rates = {
        s: [{"a": a.name, "b": b.name, **stats.win_rate(np.reshape(scores[s][a.name], (P, n)), np.reshape(scores[s][b.name], (P, n)), **boot).to_dict()}
            for a, b in combinations(policies, 2)]
        for s in scores
    }
    if judge_out is not None:
        for entry in judge_out["pairs"]:
            est = stats.bootstrap_mean(entry.pop("values"), **boot)
            entry.update(est.to_dict())
    primary = recipe.primary_scorer() if scores else None
    curve = None
    stepped = [p for p in policies if p.step is not None and per_policy[p.name]["kl"] is not None]
    if len(stepped) >= 2 and primary is not None:
        curve = [{"name": p.name, "step": p.step, "kl": per_policy[p.name]["kl"]["value"],
                  "score": per_policy[p.name]["scores"][primary]["value"]} for p in sorted(stepped, key=lambda p: p.step)]

    policy_rows = [p.to_dict() for p in policies]
    results = {
        "prompts": {"path": recipe.prompts.path, "count": P, "ids": [r.id for r in rows]},
        "sampling": sampling.to_dict(),
        "engine": recipe.rollout.engine,
        "reference": reference.to_dict(),
        "policies": policy_rows,
        "runs": training_runs(policy_rows),
        "perplexity_texts": recipe.perplexity.path if recipe.perplexity is not None else None,
        "scorers": list(scores),
        "primary": primary,
        "per_policy": per_policy,
        "win_rates": win_rates,
        "judge": judge_out,
        "curve": curve,
        "stats": {"bootstrap_samples": st.bootstrap_samples, "confidence": st.confidence, "seed": st.seed, "resampling_unit": "prompt"},
        "notes": notes,
    }

    # ---- 7. outputs
    _write_samples(out / "samples.jsonl", rows, n, policies, generated, scores)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    files = write_report(results, scores, out)
    elapsed = time.perf_counter() - t0
    (out / "timings.json").write_text(json.dumps({"seconds": round(elapsed, 2), "engine_restarts": generator.restarts}) + "\n")
    _print_summary(results, out, files, elapsed)
    return results


def _model_tokens(sample) -> int:
    """The tokens the policy wrote: the whole completion, or a multi-turn episode's model turns."""
    return len(sample.completion_ids) if sample.completion_mask is None else sum(sample.completion_mask)


def _reference(recipe: EvalRecipe, policies: list[Policy]) -> Policy:
    if recipe.reference is None:
        return policies[0]
    for p in policies:
        if recipe.reference in (p.name, p.path, p.source):
            return p
    if Path(recipe.reference).exists() or "/" in recipe.reference:
        return Policy(default_name(recipe.reference), recipe.reference, None, recipe.reference)
    names = ", ".join(p.name for p in policies)
    raise UserError(f"reference: '{recipe.reference}' is neither a policy name ({names}) nor a checkpoint path")


def _perplexity(heldout: list[dict], recipe: EvalRecipe, model, tokenizer) -> dict:
    """Per-text NLL sums and scored-token counts of one policy on the held-out texts (rows with no scored token left
    out), and how many texts were cut to perplexity.max_length."""
    texts = heldout_texts(heldout, tokenizer, recipe.perplexity.max_length)
    kept = [i for i, ids in enumerate(texts.scored_ids) if ids]
    prompt_ids, scored_ids = [texts.prompt_ids[i] for i in kept], [texts.scored_ids[i] for i in kept]
    logps = sequence_logprobs(model, prompt_ids, scored_ids, recipe.rollout.batch_size)
    return {"nll": [-lp for lp in logps], "tokens": [len(ids) for ids in scored_ids], "cut": texts.cut}


def _function_scores(spec: str, prompts: list, completions: list[str], columns: dict) -> list[float]:
    from alignment.evaluation.gold import score

    try:
        values = score(spec, prompts, completions, columns)
    except TypeError as exc:
        raise UserError(f"reward function '{spec}' failed on the prompt set's columns ({', '.join(columns) or 'none'}): {exc}") from None
    if len(values) != len(completions):
        raise UserError(f"reward function '{spec}' returned {len(values)} scores for {len(completions)} completions")
    return values


def _judge(recipe: EvalRecipe, generator, rows, policies, generated) -> dict:
    """Every pair of policies, first sample of each prompt, judged in both orders."""
    from reward.labeling.judge import load_judge

    judge = load_judge(recipe.judge, generator, recipe.sampling.seed)
    n = recipe.sampling.samples_per_prompt
    limit = min(len(rows), recipe.judge.max_prompts or len(rows))
    prompts = [r.prompt for r in rows[:limit]]
    pairs = []
    for a, b in combinations(policies, 2):
        first = [generated[a.name]["texts"][i * n] for i in range(limit)]
        second = [generated[b.name]["texts"][i * n] for i in range(limit)]
        res = judge.compare(prompts, first, second)
        choices = res.choices()
        pairs.append({"a": a.name, "b": b.name, "values": res.values, "wins": choices.count("A"), "ties": choices.count("tie"),
                      "losses": choices.count("B"), **res.counts})
    return {"model": recipe.judge.model, "prompts": limit, "pairs": pairs}


def _write_samples(path: Path, rows, n: int, policies, generated, scores) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for p in policies:
            g = generated[p.name]
            for k in range(len(rows) * n):
                row = {"policy": p.name, "prompt_id": rows[k // n].id, "sample_index": k % n, "text": g["texts"][k],
                       "num_tokens": g["lengths"][k], "finish_reason": g["finish"][k],
                       "kl": g["kl"][k] if g["kl"] is not None else None,
                       "scores": {s: scores[s][p.name][k] for s in scores}}
                if g["episodes"] is not None:
                    row["episode"] = g["episodes"][k]
                fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _print_summary(results: dict, out: Path, files: dict, elapsed: float) -> None:
    primary = results["primary"]
    conf = f"{results['stats']['confidence']:.0%}"
    lines = [f"eval done in {elapsed:.1f} s; report: {files['markdown']} and {files['html']}"]
    for name, r in results["per_policy"].items():
        score = f"{primary} {stats.Estimate(**r['scores'][primary]).fmt()}" if primary else ""
        kl = f"  KL {r['kl']['value']:.3f}" if r["kl"] else ""
        ppl = f"  perplexity {r['perplexity']['value']:.2f}" if r.get("perplexity") else ""
        e = r.get("episodes")
        turns = (f"  turns {e['turns']['value']:.2f}  tool calls {e['tool_calls']['value']:.2f}  "
                 f"episodes with an error {e['error_rate']['value']:.1%}") if e else ""
        lines.append(f"  {name}: {score}{kl}  length {r['length']['value']:.1f}  truncated {r['truncation_rate']:.1%}"
                     f"{ppl}{turns}")
    pairs = results["win_rates"].get(primary) or []
    if pairs:  # each later policy over each earlier one: a pipeline's policies come in training order
        lines.append(f"win rates by {primary} ({conf} CI; a tie counts half):")
        width = max(len(p["b"]) for p in pairs)
        lines += [f"  {p['b']:>{width}} over {p['a']}: {stats.Estimate(1 - p['value'], 1 - p['high'], 1 - p['low'], p['n']).fmt()}"
                  for p in pairs]
    console.say(*lines)
