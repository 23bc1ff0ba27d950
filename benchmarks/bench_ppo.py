"""PPO step breakdown, the limits of its parts, and TRL's GRPOTrainer as a peer (issue 7, parts 1-3).

One invocation, for the tiny default (`--model tiny`) or a ~100M-parameter random Llama (`--model 100m`):

1. **Breakdown.** The real stage, `alignment.stages.ppo.run(recipe, engine=...)`, on recipes built from
   recipes/tiny/ppo_grpo.yaml (GRPO, no critic) and recipes/tiny/ppo.yaml (GAE, with a critic). Per step it
   logs time/generate, time/score, time/train, time/sync, time/step and perf/tokens_per_s to metrics.jsonl;
   we average them over the steps after `--warmup` warm-up steps ("other" = step - the four parts: advantages,
   NaN checks, the gold metric, metric reductions). A thin wrapper around the rollout engine records the last
   step's prompts and samples. Modes `grpo_async` / `gae_async` run the same recipes with
   `rollout.async_generation=true` and report step / max(generate, train).
2. **Limits**, on that last step's exact token batch:
   * generate: raw `vllm.LLM.generate` (the stage's engine) on the same prompts, one request per sample
     forced to that sample's completion length (min_tokens = max_tokens, ignore_eos), no logprobs, no seeds;
     also the same call with the engine's own SamplingParams (per-request seeds + logprobs);
   * score: plain `torch.no_grad` forwards of fresh HF copies of the policy, the reference (and critic and
     reward model when the recipe has them) over the same micro-batches;
   * train: plain forward + backward + `torch.optim.AdamW` of fresh HF copies of the policy (and critic),
     same epochs, minibatches and micro-batches, no DeepSpeed;
   * sync: one memcpy of all policy weights into a preallocated buffer (a memory-bandwidth floor).
   Reported: step time / sum(limits).
3. **Peer.** TRL 1.16 `GRPOTrainer` (transformers generation, `use_vllm=False`) on the same model, prompts,
   group size, max_new_tokens, rule reward (`alignment.tiny.task:gold_reward`), batch shape (prompts per
   step, minibatches, epochs as `num_iterations`) and KL coefficient (`beta`), in a subprocess; seconds per
   rollout batch (= per our PPO step) from its optimizer-step times.

Models: `tiny` is the tiny default's untrained policy; GRPO modes use the rule reward (as the TRL peer does), GAE
modes a random sequence-classification model of the same shape as reward model and critic (weights do not matter
for timing; the real recipes use the tiny SFT and RM checkpoints of the same shapes). `100m` is a random Llama
(hidden 1024, 8 layers, 16 heads of 64, the tiny tokenizer, float32) with the rule reward, 8 prompts x 4 samples
x 32 tokens per step.

    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
    python benchmarks/bench_ppo.py --model tiny --steps 6 --out tiny.json
    python benchmarks/bench_ppo.py --model 100m --steps 3 --out 100m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

PARTS = ["generate", "score", "train", "sync", "other"]
SIZE_100M = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 16, "head_dim": 64, "max_position_embeddings": 512}


# ------------------------------------------------------------------------------------------ models


def make_reward_model(base: Path, out: Path, seed: int = 1) -> Path:
    """A random 1-output sequence-classification Llama shaped like `base`, with its tokenizer and
    reward_stats.json (mean 0, std 1), usable as an RM (normalize: true) and as a critic initialisation."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(base)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(cfg).float()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    return out


def benchmark_policy(name: str, tiny, work: Path) -> Path:
    """The policy a benchmark's `--models` entry names: "tiny" (the built-in default) or "100m" (made once in `work`)."""
    return tiny.base if name == "tiny" else make_100m_policy(tiny.base, work / "policy_100m")[0]


def make_100m_policy(base: Path, out: Path, seed: int = 0) -> tuple[Path, int]:
    """A random ~100M-parameter Llama with the tiny tokenizer (float32, safetensors)."""
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from alignment.tiny.model import make_config

    cfg = LlamaConfig(**{**make_config().to_dict(), **SIZE_100M})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def n_params(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


# ------------------------------------------------------------------------------------------ recipes


def build_recipes(model: str, tiny, policy: Path, rm: Path | None, work: Path, steps: int, modes: list[str]) -> dict:
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe

    common = [f"policy.name_or_path={policy}", f"prompts.sources.0.path={tiny.prompts}", "eval=null",
              f"train.steps={steps}", f"output.save_steps={steps}", "output.logging_steps=1"]
    rule_reward = "rewards=[{kind: function, function: 'alignment.tiny.task:gold_reward'}]"  # TRL's reward too
    if model == "100m":
        common += [rule_reward, "train.prompts_per_step=8", "rollout.sampling.max_new_tokens=32", "algorithm.micro_batch_size=16",
                   "train.learning_rate=1e-6", "train.critic_learning_rate=1e-6"]
    recipes = {}
    for mode in modes:
        out = [f"output.dir={work / ('run_' + mode)}", f"rollout.async_generation={mode.endswith('_async')}"]
        if model == "tiny":  # GRPO: the rule, as the TRL peer gets; GAE: the RM, which also initialises the critic
            out.append(rule_reward if mode.startswith("grpo") else f"rewards.0.path={rm}")
        if mode.startswith("grpo"):
            recipes[mode] = load_recipe(REPO / "recipes/tiny/ppo_grpo.yaml", PPORecipe, [*common, *out])
        else:  # GAE; the critic starts from the RM (tiny) or from the policy with a fresh head (100m)
            critic = rm if model == "tiny" else policy
            # steady state from step 1: no critic-only warm-up steps (those skip the actor update)
            recipes[mode] = load_recipe(REPO / "recipes/tiny" / ("ppo_async.yaml" if mode == "gae_async" else "ppo.yaml"), PPORecipe,
                                        [*common, *out, f"value.name_or_path={critic}", "algorithm.critic_warmup_steps=0"])
    return recipes


# ------------------------------------------------------------------------------------------ stage


class RecordingEngine:
    """Delegates to a rollout engine; keeps the last `generate` call's prompts, sampling and samples."""

    def __init__(self, engine):
        self.inner = engine
        self.last = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, prompts, sampling):
        samples = self.inner.generate(prompts, sampling)
        self.last = (prompts, sampling, samples)
        return samples

    def update_weights(self, named, version):
        return self.inner.update_weights(named, version)

    def close(self):
        pass  # the benchmark owns the engine


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def run_stage(recipe, engine, warmup: int) -> dict:
    from alignment.stages.ppo import run

    rec = RecordingEngine(engine)
    t = time.perf_counter()
    run(recipe, engine=rec)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (Path(recipe.output.dir) / "metrics.jsonl").read_text().splitlines()]
    kept = rows[warmup:] if len(rows) > warmup else rows[-1:]
    res = {p: mean([r[f"time/{p}"] for r in kept]) for p in ["generate", "score", "train", "sync", "step"]}
    # Async mode: the loop waits for rollouts twice (step start, before the sync); "generate" is both waits,
    # "generate_engine" the engine's own generation time, most of it hidden behind score + train.
    res["generate"] += mean([r.get("time/generate_wait", 0.0) for r in kept])
    res["generate_engine"] = mean([r["rollout/generate_seconds"] for r in kept])
    res["other"] = res["step"] - sum(res[p] for p in ["generate", "score", "train", "sync"])
    res["step_over_max_generate_train"] = res["step"] / max(res["generate_engine"], res["train"])
    res["step_over_max_generate_score_train"] = res["step"] / max(res["generate_engine"], res["score"] + res["train"])
    res["staleness"] = mean([r["rollout/staleness"] for r in kept])
    res["tokens_per_s"] = mean([r["perf/tokens_per_s"] for r in kept])
    res["response_length"] = mean([r["ppo/response_length"] for r in kept])
    res["steps_measured"] = len(kept)
    res["stage_wall_s"] = wall
    res["per_step"] = [{k: r[k] for k in r if k.startswith("time/")} for r in rows]
    return res, rec.last


# ------------------------------------------------------------------------------------------ limits


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def limit_generate(llm, prompts, sampling, samples, repeats: int) -> dict:
    from vllm import SamplingParams

    from rollout.vllm_engine import to_sampling_params, to_vllm_prompt

    exact_inputs = [{"prompt_token_ids": list(s.prompt_ids)} for s in samples]
    exact_params = [SamplingParams(n=1, temperature=sampling.temperature or 1.0, top_p=sampling.top_p,
                                   max_tokens=max(1, len(s.completion_ids)), min_tokens=max(1, len(s.completion_ids)),
                                   ignore_eos=True, detokenize=False) for s in samples]
    same_inputs = [to_vllm_prompt(p) for p in prompts]
    same_params = [to_sampling_params(sampling, i) for i in range(len(prompts))]
    llm.generate(exact_inputs[:2], exact_params[:2], use_tqdm=False)  # warm-up
    return {
        "raw_exact_lengths": best_of(lambda: llm.generate(exact_inputs, exact_params, use_tqdm=False), repeats),
        "raw_engine_params": best_of(lambda: llm.generate(same_inputs, same_params, use_tqdm=False), repeats),
    }


def _batch(samples):
    from alignment.ppo.batch import RolloutBatch

    return RolloutBatch.from_samples(samples, list(range(len(samples))))


def _logits(model, inputs):
    return model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                 use_cache=False).logits


def _values(seq_cls, inputs):
    backbone = getattr(seq_cls, seq_cls.base_model_prefix)
    hidden = backbone(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                      position_ids=inputs.position_ids, use_cache=False).last_hidden_state
    return seq_cls.score(hidden).squeeze(-1)


def limit_score_train(recipe, samples, pad_id: int, repeats: int) -> dict:
    """Plain HF forwards (scoring) and forward+backward+AdamW (training) on the step's token batch."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    algo = recipe.algorithm
    batch = _batch(samples)
    micro = [batch.model_inputs(idx, pad_id, torch.device("cpu"))
             for idx in batch.micro_batches(torch.arange(len(batch)), algo.micro_batch_size)]
    policy = AutoModelForCausalLM.from_pretrained(recipe.policy.name_or_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(recipe.policy.name_or_path, dtype=torch.float32).eval()
    critic = (AutoModelForSequenceClassification.from_pretrained(recipe.value.name_or_path, num_labels=1, dtype=torch.float32)
              if recipe.value is not None and algo.advantage == "gae" else None)
    rms = [AutoModelForSequenceClassification.from_pretrained(r.path, dtype=torch.float32).eval()
           for r in recipe.rewards if r.kind == "model"]
    fns = [r for r in recipe.rewards if r.kind == "function"]
    res: dict = {}

    @torch.no_grad()
    def score():
        for inputs in micro:
            _logits(policy, inputs)
            _logits(reference, inputs)
            if critic is not None:
                _values(critic, inputs)
            for rm in rms:
                rm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)

    policy.eval()
    score()  # warm-up
    res["score"] = best_of(score, repeats)
    if fns:
        from reward.functions import load_reward_function

        fn = load_reward_function(fns[0].function)
        items = ["headphones"] * len(samples)
        texts = [s.text for s in samples]
        res["score_reward_fn"] = best_of(lambda: fn(prompts=[""] * len(texts), completions=texts, item=items), repeats)
        res["score"] += res["score_reward_fn"]

    models = [policy] + ([critic] if critic is not None else [])
    for m in models:
        m.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-7) for m in models]
    comp = [batch.mask[inp.indices, : inp.completion_len] for inp in micro]

    def micro_step(k):
        inputs, mask = micro[k], comp[k]
        P = inputs.completion_start
        logits = _logits(policy, inputs)[:, P - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, inputs.input_ids[:, P:, None]).squeeze(-1)
        (-(logp * mask).sum() / mask.sum().clamp(min=1)).backward()
        if critic is not None:
            v = _values(critic, inputs)[:, P - 1 : -1]
            ((v * mask) ** 2).sum().div(mask.sum().clamp(min=1)).backward()

    def optimizer_step():
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    micro_step(0)  # warm-up: allocates gradients and AdamW states
    optimizer_step()
    # one PPO step: `epochs` x `minibatches` optimizer steps over all micro-batches (same count as the stage)
    per_minibatch = max(1, len(micro) // algo.minibatches)

    def train():
        for _ in range(algo.epochs):
            for m0 in range(0, len(micro), per_minibatch):
                for k in range(m0, min(len(micro), m0 + per_minibatch)):
                    micro_step(k)
                optimizer_step()

    res["train"] = best_of(train, 1)

    flat = torch.empty(sum(p.numel() for p in policy.parameters()))

    def memcpy():
        off = 0
        for p in policy.parameters():
            flat[off : off + p.numel()].copy_(p.detach().reshape(-1))
            off += p.numel()

    memcpy()
    res["sync"] = best_of(memcpy, repeats)
    res["micro_batches"] = len(micro)
    res["tokens_in_batch"] = int(sum(i.input_ids.numel() for i in micro))
    res["real_tokens_in_batch"] = int(sum(int(i.attention_mask.sum()) for i in micro))
    return res


# ------------------------------------------------------------------------------------------ TRL peer


def trl_worker(cfg: dict) -> dict:
    """TRL GRPOTrainer with the stage's batch shape; runs in its own process (see run_trl)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignment.tiny.task import gold_reward

    tok = AutoTokenizer.from_pretrained(cfg["model"])
    ds = load_dataset("json", data_files=cfg["prompts"], split="train")
    group, per_step = cfg["group"], cfg["prompts_per_step"]
    completions = per_step * group
    per_device = completions // cfg["minibatches"]  # one optimizer step per minibatch, as the stage does
    opt_steps_per_round = cfg["minibatches"] * cfg["epochs"]
    args = GRPOConfig(
        output_dir=cfg["out"], use_vllm=False, per_device_train_batch_size=per_device, gradient_accumulation_steps=1,
        steps_per_generation=cfg["minibatches"], num_generations=group, max_completion_length=cfg["max_new_tokens"],
        num_iterations=cfg["epochs"], beta=cfg["beta"], temperature=cfg["temperature"], learning_rate=cfg["lr"],
        max_steps=cfg["rounds"] * opt_steps_per_round, logging_steps=1, save_strategy="no", report_to=[],
        bf16=False, use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=cfg["model"], reward_funcs=gold_reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Stamp()])
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    # seconds per rollout batch: the time of each round of `opt_steps_per_round` optimizer steps
    ends = [t1] + stamps
    rounds = [ends[(i + 1) * opt_steps_per_round] - ends[i * opt_steps_per_round]
              for i in range(len(stamps) // opt_steps_per_round)]
    return {"setup_s": setup, "round_s": rounds, "opt_steps_per_round": opt_steps_per_round,
            "per_device_train_batch_size": per_device, "steps_per_generation": cfg["minibatches"],
            "num_iterations": cfg["epochs"], "beta": cfg["beta"]}


def run_trl(recipe, prompts_path: Path, work: Path, rounds: int, warmup: int) -> dict:
    algo, s = recipe.algorithm, recipe.rollout.sampling
    cfg = {"model": recipe.policy.name_or_path, "prompts": str(prompts_path), "group": s.samples_per_prompt,
           "prompts_per_step": recipe.train.prompts_per_step, "minibatches": algo.minibatches, "epochs": algo.epochs,
           "max_new_tokens": s.max_new_tokens, "temperature": s.temperature or 1.0, "lr": recipe.train.learning_rate,
           "beta": algo.kl.coef if algo.kl.placement == "loss" else 0.0, "rounds": rounds, "out": str(work / "trl")}
    cfg_file, res_file = work / "trl_cfg.json", work / "trl_result.json"
    cfg_file.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--trl-worker", str(cfg_file), "--trl-result", str(res_file)],
                          check=False, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stdout[-1500:] + proc.stderr[-3000:])}
    res = json.loads(res_file.read_text())
    kept = res["round_s"][warmup:] or res["round_s"][-1:]
    res["step_s"] = mean(kept)
    return res


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "100m"], default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="PPO steps per mode (default: tiny 6, 100m 3)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of the averages (default: tiny 2, 100m 1)")
    ap.add_argument("--modes", default=None, help="comma list of grpo,gae,grpo_async,gae_async "
                    "(default: tiny all four; 100m grpo,grpo_async)")
    ap.add_argument("--trl-rounds", type=int, default=None, help="TRL rollout batches (default: steps); 0 skips TRL")
    ap.add_argument("--repeats", type=int, default=3, help="best-of repeats for the raw generate/score limits")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trl-result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        Path(args.trl_result).write_text(json.dumps(trl_worker(json.loads(Path(args.trl_worker).read_text()))))
        return

    tiny_model = args.model == "tiny"
    steps = args.steps or (6 if tiny_model else 3)
    warmup = args.warmup if args.warmup is not None else (2 if tiny_model else 1)
    modes = (args.modes or ("grpo,gae,grpo_async,gae_async" if tiny_model else "grpo,grpo_async")).split(",")
    trl_rounds = steps if args.trl_rounds is None else args.trl_rounds
    t_start = time.perf_counter()
    result: dict = {"model": args.model, "steps": steps, "warmup": warmup, "host_cores": os.cpu_count(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS"), "modes": {}}

    from alignment.tiny import build_tiny
    from rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        work = Path(tmp)
        tiny = build_tiny(work / "tiny")
        if tiny_model:
            policy, rm = tiny.base, make_reward_model(tiny.base, work / "rm")
            result["params"] = n_params(policy)
        else:
            (policy, result["params"]), rm = make_100m_policy(tiny.base, work / "policy100m"), None
        recipes = build_recipes(args.model, tiny, policy, rm, work, steps, modes)
        r0 = next(iter(recipes.values()))
        t = time.perf_counter()
        engine = VLLMEngine(str(policy), dtype="float32", seed=0, max_model_len=r0.rollout.max_model_len)
        result["engine_start_s"] = time.perf_counter() - t
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(policy).pad_token_id
        try:
            for mode, recipe in recipes.items():
                if mode.endswith("_async"):  # same batches as the synchronous mode: only the stage is timed
                    print(f"== {args.model} {mode}: stage, {steps} steps", flush=True)
                    result["modes"][mode] = {"stage": run_stage(recipe, engine, warmup)[0]}
                    continue
                s = recipe.rollout.sampling
                row: dict = {"prompts_per_step": recipe.train.prompts_per_step, "samples_per_prompt": s.samples_per_prompt,
                             "max_new_tokens": s.max_new_tokens, "micro_batch_size": recipe.algorithm.micro_batch_size,
                             "minibatches": recipe.algorithm.minibatches, "epochs": recipe.algorithm.epochs}
                print(f"== {args.model} {mode}: stage, {steps} steps", flush=True)
                row["stage"], (prompts, sampling, samples) = run_stage(recipe, engine, warmup)
                print(f"== {args.model} {mode}: limits", flush=True)
                limits = limit_generate(engine.llm, prompts, sampling, samples, args.repeats)
                limits.update(limit_score_train(recipe, samples, pad_id, args.repeats))
                limits["generate"] = limits["raw_exact_lengths"]
                limits["sum"] = sum(limits[p] for p in ["generate", "score", "train", "sync"])
                row["limits"] = limits
                row["step_over_limits"] = row["stage"]["step"] / limits["sum"]
                row["tokens_last_step"] = sum(len(x.completion_ids) for x in samples)
                result["modes"][mode] = row
        finally:
            engine.close()
        if trl_rounds > 0 and "grpo" in recipes:
            print(f"== {args.model}: TRL GRPOTrainer, {trl_rounds} rollout batches", flush=True)
            trl = run_trl(recipes["grpo"], tiny.prompts, work, trl_rounds, warmup)
            result["trl"] = trl
            if "step_s" in trl:
                result["ours_over_trl"] = result["modes"]["grpo"]["stage"]["step"] / trl["step_s"]
                if "grpo_async" in result["modes"]:
                    result["ours_async_over_trl"] = result["modes"]["grpo_async"]["stage"]["step"] / trl["step_s"]
    result["wall_s"] = time.perf_counter() - t_start
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def print_table(r: dict) -> None:
    print(f"\nmodel {r['model']} ({r['params'] / 1e6:.2f}M params), {r['steps']} steps, first {r['warmup']} left out; "
          f"vLLM start {r['engine_start_s']:.0f} s; wall {r['wall_s']:.0f} s")
    for mode, row in r["modes"].items():
        st = row["stage"]
        if "limits" not in row:  # async
            print(f"\n[{mode}] step {st['step']:.3f} s: engine generate {st['generate_engine']:.3f} s (waited {st['generate']:.3f}), "
                  f"score {st['score']:.3f}, train {st['train']:.3f}, sync {st['sync']:.3f}, other {st['other']:.3f}; "
                  f"step/max(generate, train) {st['step_over_max_generate_train']:.2f}, "
                  f"step/max(generate, score + train) {st['step_over_max_generate_score_train']:.2f}; "
                  f"staleness {st['staleness']:.2f}; tokens/s {st['tokens_per_s']:.0f}")
            continue
        lim = row["limits"]
        print(f"\n[{mode}] {row['prompts_per_step']} prompts x {row['samples_per_prompt']} samples x <= {row['max_new_tokens']} tokens "
              f"(mean length {st['response_length']:.1f}), micro {row['micro_batch_size']}, {row['minibatches']} minibatches x "
              f"{row['epochs']} epochs")
        print(f"{'part':<10} {'stage s':>9} {'share':>6} {'limit s':>9} {'stage/limit':>11}")
        for p in PARTS:
            lv = lim.get(p)
            ratio = f"{st[p] / lv:>11.1f}" if lv else f"{'':>11}"
            print(f"{p:<10} {st[p]:>9.3f} {st[p] / st['step']:>6.0%} {lv if lv is not None else float('nan'):>9.3f} {ratio}")
        print(f"{'step':<10} {st['step']:>9.3f} {'':>6} {lim['sum']:>9.3f} {row['step_over_limits']:>11.1f}")
        print(f"tokens/s end to end {st['tokens_per_s']:.0f}; engine.generate {st['generate_engine']:.3f} s; "
              f"raw vLLM with the engine's params (seeds, logprobs) {lim['raw_engine_params']:.3f} s; "
              f"padded/real tokens in forwards {lim['tokens_in_batch']}/{lim['real_tokens_in_batch']}")
    if "trl" in r:
        t = r["trl"]
        if "error" in t:
            print(f"\nTRL: failed: {t['error'][-800:]}")
        else:
            print(f"\nTRL GRPOTrainer (transformers generate): {t['step_s']:.3f} s per rollout batch "
                  f"({t['opt_steps_per_round']} optimizer steps; rounds {[round(x, 2) for x in t['round_s']]}); "
                  f"ours/TRL (GRPO) = {r['ours_over_trl']:.2f}"
                  + (f", async ours/TRL = {r['ours_async_over_trl']:.2f}" if "ours_async_over_trl" in r else ""))


if __name__ == "__main__":
    main()
