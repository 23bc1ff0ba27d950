"""Variable-length answers: padding in the PPO micro-batches, and row micro-batches against token-budget ones.

A task where the answer's length is part of the policy's choice, run through the real stage
(`alignment.stages.ppo.run`, recipes/tiny/ppo_grpo.yaml with overrides) twice on the same rollout engine:

* **rows**: today's `algorithm.micro_batch_size` (M sequences per forward, sorted by length);
* **tokens**: `algorithm.micro_batch_tokens=N` (sequences grouped by length into forwards of at most N padded tokens,
  at most `--token-rows` of them; `RolloutBatch.micro_batches(indices, micro_batch_size, max_tokens)`). By default N
  = longest prompt + max_new_tokens, the longest possible sequence: the long tail goes alone to a forward, short
  answers share forwards up to N tokens (the rows run's worst case is M such sequences). A larger budget packs more
  rows per forward but pads short answers to mid-length ones (the greedy grouping fills each forward to the budget),
  and packed it makes the attention's block-diagonal mask larger (sdpa on CPU computes the whole N x N product): see
  the options table the script prints; 2N measured slower than N in both runs;
* **packed**: the same budget with `algorithm.packing=true`: each forward is its sequences back to back in one row,
  no padding (transformers' packed-sequence attention from the position ids; sdpa with a block-diagonal mask here).

The task. A prompt of the tiny review task with a target answer length per prompt row, drawn from a long-tailed
(log-normal) distribution; the rule reward (`varlen_reward`, in this file) is half content (the tiny gold rule: name
the item, use positive adjectives) and half length (exp(-|log((words + 1) / (target + 1))|)). The policy is a random
Llama (tiny tokenizer, built locally, no hub) whose weights make it exactly a bigram chain over the vocabulary: the
embeddings are orthonormal, the attention and MLP outputs start at zero (o_proj, down_proj; every layer still runs its
full forward and backward) and the LM head holds a chosen next-token table. After `<|assistant|>` the first word picks
one of K regimes (`--length-means`, `--length-weights`); each regime keeps to its own words and ends (EOS) with
probability 1/mean per token. Answer lengths are therefore a mixture of geometric distributions: from 2 tokens to the
512 of max_new_tokens with a long tail (defaults: means 4, 16, 64, 256 words with weights 0.4, 0.3, 0.2, 0.1; mean
about 42 tokens, about 1% cut at 512). The learning rate is 1e-6, so the length distribution stays put over the
steps and both runs see (nearly) the same rollouts.

Per run: completion lengths; seconds per phase (median, p10, p90, ...; bench_ppo's table); padded / real tokens of
the micro-batches the stage fed its scoring and training forwards (counted in `RolloutBatch.model_inputs`); the
limits on the last step's batch in the run's own micro-batches and step / limits (bench_ppo's `measure_limits`);
what runs outside the phases. Then the padding and forward count of other settings on that batch (no timing), and the
comparison. "speedup over row micro-batches" = seconds of score + train per real token, rows run over the other run
(summed over the measured steps; generation does the same work in both and is left out); the step time ratio is
printed beside it. The last line reads `varlen: padded/real X.XX, speedup over row micro-batches Y.YY` for the packed
run (the token-budget run's figures are on the lines above). Without `algorithm.micro_batch_tokens` or
`algorithm.packing` in the checkout the script says so and measures the runs it can; the last line then reports the
last of them (nan for the speedup of the rows run alone).

    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
    python benchmarks/bench_varlen.py                                   # ~2 min on 2 cores
    python benchmarks/bench_varlen.py --steps 2 --warmup 1 --prompts-per-step 8 --no-limits   # smoke run, ~1 min
    python benchmarks/bench_varlen.py --hidden 512 --layers 8 --prompts-per-step 32 --steps 5 --out varlen.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))

import numpy as np
import torch

MAX_NEW_TOKENS = 512
MAX_MODEL_LEN = 1024


# ------------------------------------------------------------------------------------------ task


def varlen_reward(prompts: list, completions: list, item: list[str], target_len: list[int], **unused) -> list[float]:
    """Half content (the tiny gold rule), half length: exp(-|log((words + 1) / (target + 1))|) (1 at the target)."""
    from alignment.tiny.task import gold_score

    out = []
    for it, text, target in zip(item, completions, target_len):
        words = len(text.split())
        out.append(0.5 * gold_score(it, text) + 0.5 * math.exp(-abs(math.log((words + 1) / (int(target) + 1)))))
    return out


def write_prompts(tiny_prompts: Path, out: Path, seed: int = 0, median: float = 24.0, sigma: float = 1.2) -> Path:
    """The tiny prompts with a `target_len` column per row: log-normal (median 24 words, sigma 1.2), 2..500."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in tiny_prompts.read_text().splitlines() if line.strip()]
    with out.open("w") as f:
        for row in rows:
            target = int(min(500, max(2, round(rng.lognormvariate(math.log(median), sigma)))))
            f.write(json.dumps({**row, "target_len": target}) + "\n")
    return out


def make_bigram_policy(base: Path, out: Path, hidden: int, layers: int, means: list[float], weights: list[float],
                       seed: int = 0) -> tuple[Path, int]:
    """A random Llama (tiny tokenizer) that samples exactly from a bigram table: answers in K regimes of geometric
    lengths (see the module docstring). Needs hidden >= vocabulary size (orthonormal embeddings)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from alignment.tiny.model import make_config
    from alignment.tiny.task import ASSISTANT_TOKEN, EOS_TOKEN, SPECIAL_TOKENS, vocabulary

    vocab = vocabulary()
    V = len(vocab)
    if hidden < V:
        raise SystemExit(f"--hidden must be at least the vocabulary size ({V}) for the bigram construction")
    if hidden % 64:
        raise SystemExit("--hidden must be a multiple of 64 (heads of 64, as vLLM's CPU backend needs)")
    cfg = LlamaConfig(**{**make_config().to_dict(), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                         "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
                         "head_dim": 64, "max_position_embeddings": MAX_MODEL_LEN})
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float()
    eos, assistant = vocab.index(EOS_TOKEN), vocab.index(ASSISTANT_TOKEN)
    words = [i for i, t in enumerate(vocab) if t not in SPECIAL_TOKENS]
    perm = torch.randperm(len(words), generator=gen).tolist()
    K = len(means)
    groups = [[words[perm[j]] for j in range(k, len(words), K)] for k in range(K)]  # K interleaved word sets
    NEG = -30.0
    table = torch.full((V, V), NEG)  # table[cur, next]: next-token logits
    total = sum(weights)
    for k, g in enumerate(groups):
        table[assistant, g] = math.log(weights[k] / total / len(g))
        h = 1.0 / means[k]
        for t in g:
            table[t, eos] = math.log(h)
            table[t, g] = math.log((1 - h) / len(g))
    for t in range(V):  # other tokens (the specials, EOS itself): end at once
        if t != assistant and all(t not in g for g in groups):
            table[t, eos] = 0.0
    q, _ = torch.linalg.qr(torch.randn(hidden, V, generator=gen))  # [hidden, V], orthonormal columns
    emb = q.T.contiguous()  # [V, hidden], orthonormal rows
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # final RMSNorm(e_cur) = e_cur * sqrt(hidden): logits = W e_cur sqrt(hidden) = table[cur]
        model.lm_head.weight.copy_(table.T @ emb / math.sqrt(hidden))
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(base)
    tok.model_max_length = MAX_MODEL_LEN
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ runs


def token_budget_missing() -> str | None:
    """Why this checkout cannot run token-budget micro-batches, or None when it can."""
    import inspect

    from alignment.config.ppo import PPOAlgorithmSection
    from alignment.ppo.batch import RolloutBatch

    if not hasattr(PPOAlgorithmSection(), "micro_batch_tokens"):
        return "the recipe key algorithm.micro_batch_tokens does not exist (alignment/config/ppo.py)"
    if "max_tokens" not in inspect.signature(RolloutBatch.micro_batches).parameters:
        return "RolloutBatch.micro_batches has no max_tokens argument (alignment/ppo/batch.py)"
    return None


def packing_missing() -> str | None:
    """Why this checkout cannot pack micro-batches, or None when it can."""
    from alignment.config.ppo import PPOAlgorithmSection

    return None if hasattr(PPOAlgorithmSection(), "packing") else "the recipe key algorithm.packing does not exist"


def build_recipe(policy: Path, prompts: Path, work: Path, name: str, args, extra: list[str]):
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe

    overrides = [
        f"policy.name_or_path={policy}", f"prompts.sources.0.path={prompts}", "eval=null", "gold_metric=null",
        f"rewards=[{{kind: function, function: '{HERE}:varlen_reward'}}]",
        f"rollout.max_model_len={MAX_MODEL_LEN}", f"rollout.sampling.max_new_tokens={MAX_NEW_TOKENS}",
        f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts_per_step}", "train.learning_rate=1e-6",
        f"algorithm.minibatches={args.minibatches}", f"algorithm.epochs={args.epochs}",
        f"output.dir={work / ('run_' + name)}", f"output.save_steps={args.steps}", "output.logging_steps=1",
        *extra,
    ]
    return load_recipe(REPO / "recipes/tiny/ppo_grpo.yaml", PPORecipe, overrides)


def tokens_of(stage: dict, phases=("score", "train")) -> tuple[int, int, int]:
    """(padded, real) tokens the stage fed its forwards in `phases` over the measured steps, and the real tokens of
    scoring alone (every sample once: the work)."""
    measured = stage["per_step"][stage["first_measured_step"]:]
    padded = sum(p.get(f"tokens/{ph}", {}).get("padded", 0) for p in measured for ph in phases)
    real = sum(p.get(f"tokens/{ph}", {}).get("real", 0) for p in measured for ph in phases)
    work = sum(p.get("tokens/score", {}).get("real", 0) for p in measured)
    return padded, real, work


def options_table(samples, m: int, n_tokens: int, token_rows: int, with_tokens: bool, with_packing: bool) -> list[dict]:
    """Forwards and padded/real of the scoring micro-batches (all rows, sorted) for a few settings, on one batch."""
    from bench_ppo import _batch, padded_real

    batch = _batch(samples)
    idx = torch.arange(len(batch))
    rows = []
    for size in sorted({max(1, m // 2), m, 2 * m}):
        groups = batch.micro_batches(idx, size)
        padded, real = padded_real(batch, groups)
        rows.append({"setting": f"rows {size}", "forwards": len(groups), "padded_over_real": padded / real,
                     "largest_forward": max(padded_real(batch, [g])[0] for g in groups)})
    if with_tokens:
        for budget in sorted({max(1, n_tokens // 4), max(1, n_tokens // 2), n_tokens, 2 * n_tokens}):
            groups = batch.micro_batches(idx, token_rows, max_tokens=budget)
            padded, real = padded_real(batch, groups)
            rows.append({"setting": f"tokens {budget} (<= {token_rows} rows)", "forwards": len(groups),
                         "padded_over_real": padded / real, "largest_forward": max(padded_real(batch, [g])[0] for g in groups)})
    if with_packing:
        for budget in sorted({max(1, n_tokens // 2), n_tokens, 2 * n_tokens}):
            groups = batch.micro_batches(idx, token_rows, max_tokens=budget, packed=True)
            rows.append({"setting": f"packed {budget} (<= {token_rows} rows)", "forwards": len(groups),
                         "padded_over_real": 1.0, "largest_forward": max(padded_real(batch, [g], True)[0] for g in groups)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="PPO steps per run (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the statistics (default 1)")
    ap.add_argument("--prompts-per-step", type=int, default=16, help="prompts per step, 4 samples each (default 16)")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="rows run: algorithm.micro_batch_size (default 8)")
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="tokens run: algorithm.micro_batch_tokens "
                    "(default: longest prompt + 512, the longest possible sequence)")
    ap.add_argument("--token-rows", type=int, default=None, help="tokens run: algorithm.micro_batch_size, the row cap "
                    "of a token-budget micro-batch (default: the samples of a step, i.e. no cap beyond the budget)")
    ap.add_argument("--minibatches", type=int, default=2, help="algorithm.minibatches (default 2, as the tiny recipe)")
    ap.add_argument("--epochs", type=int, default=2, help="algorithm.epochs (default 2, as the tiny recipe)")
    ap.add_argument("--hidden", type=int, default=128, help="policy hidden size, >= 91 and a multiple of 64 (default 128)")
    ap.add_argument("--layers", type=int, default=2, help="policy layers (default 2)")
    ap.add_argument("--length-means", default="4,16,64,256", help="mean answer words of each regime")
    ap.add_argument("--length-weights", default="0.4,0.3,0.2,0.1", help="probability of each regime")
    ap.add_argument("--repeats", type=int, default=2, help="best-of repeats for the limits (default 2)")
    ap.add_argument("--no-limits", action="store_true", help="skip the limits (faster)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    means = [float(x) for x in args.length_means.split(",")]
    weights = [float(x) for x in args.length_weights.split(",")]
    if len(means) != len(weights):
        raise SystemExit("--length-means and --length-weights need as many entries")

    import bench_ppo
    from alignment.tiny import build_tiny
    from rollout.vllm_engine import VLLMEngine

    missing, no_packing = token_budget_missing(), packing_missing()
    if not missing and no_packing:
        print(f"bench_varlen: packed micro-batches are not available in this checkout: {no_packing}", flush=True)
    if missing:
        print(f"bench_varlen: token-budget micro-batches are not available in this checkout: {missing}. Measuring the "
              "rows run only; the speedup over row micro-batches reads nan until algorithm.micro_batch_tokens lands.",
              flush=True)
    t_start = time.perf_counter()
    samples_per_step = args.prompts_per_step * 4
    result: dict = {"args": vars(args), "host_cores": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                    "token_budget_missing": missing, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_varlen_") as tmp:
        work = Path(tmp)
        tiny = build_tiny(work / "tiny")
        prompts = write_prompts(tiny.prompts, work / "prompts_varlen.jsonl")
        policy, result["params"] = make_bigram_policy(tiny.base, work / "policy", args.hidden, args.layers, means, weights)
        from transformers import AutoTokenizer

        from alignment.models import render_prompt

        tok = AutoTokenizer.from_pretrained(policy)
        prompt_rows = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
        longest_prompt = max(len(render_prompt(tok, p)) for p in prompt_rows)
        budget = args.micro_batch_tokens or longest_prompt + MAX_NEW_TOKENS
        token_rows = args.token_rows or samples_per_step
        result.update(longest_prompt=longest_prompt, micro_batch_tokens=budget, token_rows=token_rows)
        variants = {"rows": [f"algorithm.micro_batch_size={args.micro_batch_size}"]}
        if not missing:
            variants["tokens"] = [f"algorithm.micro_batch_size={token_rows}", f"algorithm.micro_batch_tokens={budget}"]
            if not no_packing:
                variants["packed"] = [*variants["tokens"], "algorithm.packing=true"]
        recipes = {name: build_recipe(policy, prompts, work, name, args, extra) for name, extra in variants.items()}
        t = time.perf_counter()
        engine = VLLMEngine(str(policy), dtype="float32", seed=0, max_model_len=MAX_MODEL_LEN)
        result["engine_start_s"] = time.perf_counter() - t
        last_samples = None
        try:
            for name, recipe in recipes.items():
                print(f"== varlen {name}: stage, {args.steps} steps", flush=True)
                stage, rec = bench_ppo.run_stage(recipe, engine, args.warmup)
                run = {"stage": stage, "micro_batch_size": recipe.algorithm.micro_batch_size,
                       "micro_batch_tokens": getattr(recipe.algorithm, "micro_batch_tokens", None)}
                if rec.step_batch is not None:
                    lengths = [len(s.completion_ids) for s in rec.step_batch[2]]
                    last_samples = rec.step_batch[2]
                    run["last_batch_lengths"] = {**bench_ppo.spread(lengths), "p99": float(np.percentile(lengths, 99)),
                                                 "cut": sum(n >= MAX_NEW_TOKENS for n in lengths) / len(lengths)}
                if not args.no_limits:
                    print(f"== varlen {name}: limits on the last step's rollouts", flush=True)
                    run["limits"] = bench_ppo.measure_limits(engine, recipe, rec, tok.pad_token_id, args.repeats, step=rec.step_index,
                                                            train_repeats=args.repeats)
                    bench_ppo.add_ratios(run)
                result["runs"][name] = run
        finally:
            engine.close()
        if last_samples is not None:
            result["options"] = options_table(last_samples, args.micro_batch_size, budget, token_rows, not missing,
                                              not (missing or no_packing))
    result["wall_s"] = time.perf_counter() - t_start
    summarise(result)
    report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def summarise(r: dict) -> None:
    """Each run against the rows run: padded/real, seconds of score + train per real token and their ratio (the
    speedup), the median step time ratio. `r["headline"]`: the run the last line reports (packed, else tokens)."""
    rows = r["runs"]["rows"]["stage"]
    padded, real, work = tokens_of(rows)
    m_rows = rows["per_step"][rows["first_measured_step"]:]
    sec_rows = sum(p["score"] + p["train"] for p in m_rows)
    r["padded_over_real_rows"] = padded / real if real else float("nan")
    r["versus_rows"], r["headline"] = {}, "rows"
    for name in ("tokens", "packed"):
        if name not in r["runs"]:
            continue
        st = r["runs"][name]["stage"]
        padded_n, real_n, work_n = tokens_of(st)
        measured = st["per_step"][st["first_measured_step"]:]
        sec = sum(p["score"] + p["train"] for p in measured)
        r["versus_rows"][name] = {
            "padded_over_real": padded_n / real_n if real_n else float("nan"),
            "seconds_per_real_token": {"rows": sec_rows / work, name: sec / work_n},
            "speedup": (sec_rows / work) / (sec / work_n),
            "step_speedup_median": rows["spread"]["step"]["median"] / st["spread"]["step"]["median"],
            "score_train_tokens_per_step": {"rows": work / len(m_rows), name: work_n / len(measured)},
        }
        r["headline"] = name


def report(r: dict) -> None:
    import bench_ppo

    a = r["args"]
    print(f"\nvarlen: bigram policy {r['params'] / 1e6:.2f}M params ({a['hidden']} hidden, {a['layers']} layers), "
          f"{a['prompts_per_step']} prompts x 4 samples <= {MAX_NEW_TOKENS} tokens, {a['minibatches']} minibatches x "
          f"{a['epochs']} epochs, {a['steps']} steps (first {a['warmup']} left out); vLLM start {r['engine_start_s']:.0f} s; "
          f"wall {r['wall_s']:.0f} s")
    for name, run in r["runs"].items():
        st = run["stage"]
        setting = (f"micro_batch_size {run['micro_batch_size']}" if name == "rows" else
                   f"micro_batch_tokens {run['micro_batch_tokens']}, at most {run['micro_batch_size']} rows"
                   + (", packed" if name == "packed" else ""))
        print(f"\n[{name}] {setting}; seconds")
        if "last_batch_lengths" in run:
            q = run["last_batch_lengths"]
            print(f"answer lengths of the last step (tokens): min {q['min']:.0f}, p10 {q['p10']:.0f}, median {q['median']:.0f}, "
                  f"mean {q['mean']:.1f}, p90 {q['p90']:.0f}, p99 {q['p99']:.0f}, max {q['max']:.0f}; cut at "
                  f"{MAX_NEW_TOKENS}: {q['cut']:.1%}")
        padded, real, _ = tokens_of(st)
        sp, tp = tokens_of(st, ("score",)), tokens_of(st, ("train",))
        print(f"padded/real tokens of the micro-batches: score {sp[0] / max(sp[1], 1):.2f}, train {tp[0] / max(tp[1], 1):.2f}, "
              f"both {padded / max(real, 1):.2f} ({padded} padded for {real} real over the measured steps)")
        lim = run.get("limits")
        bench_ppo.print_spread_table(st, lim, run.get("step_over_limits_by_phase"))
        if lim:
            ratios = run["step_over_limits_by_phase"]
            print(f"step/limits: median {ratios['total']['median']:.2f}, step {st['limits_step']} "
                  f"{ratios['total']['limits_step']:.2f}; by phase (median): "
                  + ", ".join(f"{p} {ratios[p]['median']:.2f}" for p in ["generate", "score", "train", "sync"])
                  + f"; engine.generate / raw LLM.generate {lim['engine_over_raw']:.2f}")
        bench_ppo.print_profile(st)
    if r.get("options"):
        print("\nmicro-batching of the last batch's scoring forwards (no timing): setting, forwards, padded/real, largest forward")
        for o in r["options"]:
            print(f"  {o['setting']:<28} {o['forwards']:>4} {o['padded_over_real']:>6.2f} {o['largest_forward']:>7}")
    for name, v in r["versus_rows"].items():
        s = v["seconds_per_real_token"]
        print(f"\nscore + train per real token: rows {s['rows'] * 1e6:.1f} us, {name} {s[name] * 1e6:.1f} us "
              f"(real tokens per step {v['score_train_tokens_per_step']['rows']:.0f} / "
              f"{v['score_train_tokens_per_step'][name]:.0f}); padded/real rows {r['padded_over_real_rows']:.2f} -> "
              f"{name} {v['padded_over_real']:.2f}; speedup {v['speedup']:.2f}; step time (median) rows/{name} "
              f"{v['step_speedup_median']:.2f}")
    if not r["versus_rows"]:
        print(f"\ntoken-budget run not measured: {r['token_budget_missing']}")
    head = r["versus_rows"].get(r["headline"], {"padded_over_real": r["padded_over_real_rows"], "speedup": float("nan")})
    print(f"varlen: padded/real {head['padded_over_real']:.2f}, speedup over row micro-batches {head['speedup']:.2f}")


if __name__ == "__main__":
    main()
