"""GRPO with and without DAPO's dynamic sampling (algorithm.dynamic_sampling): held-out gold against the tokens
trained on, and what the refills cost in generation.

On the tiny task with the gold rule as the reward (a rule reward, as in DAPO): the tiny SFT policy is built through
the real CLI, then the real PPO stage (`recipes/tiny/ppo_grpo.yaml`, reward = `alignment.tiny.task:gold_reward`) runs
each variant for `--steps` steps and each seed in this process on one shared vLLM engine. As the policy improves,
more and more groups of 4 answers are all perfect (gold 1) and add no gradient; dynamic sampling replaces them with
groups that vary. Every step trains on the same number of groups (prompts_per_step) either way, so the question is
whether each trained token teaches more.

    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
    python benchmarks/bench_dynamic_sampling.py --steps 30 --seeds 0,1,2 --out dynamic_sampling.json

Prints, per variant and seed: held-out gold (eval/gold: 128 prompts x 4 samples at temperature 1, every
`--eval-every` steps) against the completion tokens trained on so far (each step's samples x mean length, counted
once whatever the epochs) and the tokens generated so far (refills included); then the tokens each variant needed to
first reach `--target` gold, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

VARIANTS = {  # name -> recipe overrides on recipes/tiny/ppo_grpo.yaml
    "grpo": [],
    "grpo + dynamic sampling": ["algorithm.dynamic_sampling.enabled=true"],
}


class CountingEngine:
    """The shared engine, counting the completion tokens of the rollouts the stage asks for: not the sync check's
    probe (other sample counts) nor the evaluation's (`counting` is off while the stage evaluates)."""

    def __init__(self, inner, samples_per_prompt: int):
        self.inner, self.n, self.tokens, self.counting = inner, samples_per_prompt, 0, True

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, prompts, sampling):
        samples = self.inner.generate(prompts, sampling)
        if self.counting and sampling.n == self.n:
            self.tokens += sum(len(s.completion_ids) for s in samples)
        return samples

    def update_weights(self, weights, version):
        return self.inner.update_weights(weights, version)

    def close(self):
        pass


def main() -> None:
    from conftest import run_stage, tiny_sft_overrides

    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    import alignment.stages.ppo as stage
    from alignment.tiny import build_tiny
    from rollout.vllm_engine import VLLMEngine

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2", help="train.seed of each run (prompt order, sampling, init)")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.7, help="eval/gold whose first crossing is reported")
    ap.add_argument("--max-rounds", type=int, default=3, help="algorithm.dynamic_sampling.max_rounds")
    ap.add_argument("--set", nargs="*", default=[], help="more recipe overrides for both variants, e.g. algorithm.kl.coef=0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_dynamic_sampling_"))
    tiny = build_tiny(work / "tiny")
    sft = work / "sft"
    run_stage("sft", REPO / "recipes/tiny/sft.yaml", [*tiny_sft_overrides(tiny, sft), "gold_eval=null"])

    evaluate = stage._evaluate

    def uncounted_evaluate(recipe, engine, tokenizer):
        engine.counting = False
        try:
            return evaluate(recipe, engine, tokenizer)
        finally:
            engine.counting = True

    stage._evaluate = uncounted_evaluate
    engine = VLLMEngine(str(tiny.base), dtype="float32", seed=0, max_model_len=256)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name, overrides in VARIANTS.items():
                out = work / f"{name.replace(' ', '').replace('+', '_')}_{seed}"
                recipe = load_recipe(REPO / "recipes/tiny/ppo_grpo.yaml", PPORecipe, [
                    f"policy.name_or_path={sft / 'final'}", f"prompts.sources.0.path={tiny.prompts}",
                    "rewards=[{kind: function, function: 'alignment.tiny.task:gold_reward'}]",
                    f"eval.prompts={tiny.eval_prompts}", f"output.dir={out}", f"train.steps={args.steps}",
                    f"train.seed={seed}", f"eval_every={args.eval_every}", f"output.save_steps={args.steps}",
                    f"algorithm.dynamic_sampling.max_rounds={args.max_rounds}", *args.set, *overrides])
                counting = CountingEngine(engine, recipe.rollout.sampling.samples_per_prompt)
                start = time.perf_counter()
                stage.run(recipe, engine=counting)
                seconds = time.perf_counter() - start
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                samples = recipe.train.prompts_per_step * recipe.rollout.sampling.samples_per_prompt
                trained = 0.0
                curve = []  # (step, trained tokens so far, eval/gold)
                for r in rows:
                    groups = r.get("dynamic/kept_groups", recipe.train.prompts_per_step)
                    trained += r["ppo/response_length"] * groups * recipe.rollout.sampling.samples_per_prompt
                    if "eval/gold" in r:
                        curve.append((r["step"], trained, r["eval/gold"]))
                reached = next(((s, t) for s, t, g in curve if g >= args.target), None)
                result = {
                    "seed": seed, "curve": curve, "final_eval_gold": curve[-1][2], "trained_tokens": trained,
                    "generated_tokens": counting.tokens, "seconds": seconds, "reached_target": reached,
                    "steps_logged": len(rows), "samples_per_full_step": samples,
                    "dropped_groups": sum(r.get("dynamic/dropped_groups", 0.0) for r in rows),
                    "extra_rounds": sum(r.get("dynamic/extra_rounds", 0.0) for r in rows),
                    "short_steps": sum(1 for r in rows if r.get("dynamic/kept_groups", 1e9) < recipe.train.prompts_per_step),
                }
                results[name].append(result)
                print(f"{name:<26} seed {seed}: eval gold " + " ".join(f"{g:.3f}@{s}" for s, _, g in curve)
                      + f" | trained {trained / 1e3:.1f}k tok, generated {counting.tokens / 1e3:.1f}k tok, "
                      f"{seconds:.0f} s | gold >= {args.target} at "
                      + (f"step {reached[0]} ({reached[1] / 1e3:.1f}k trained tok)" if reached else "never")
                      + (f" | {result['dropped_groups']:.0f} groups dropped, {result['extra_rounds']:.0f} extra rounds, "
                         f"{result['short_steps']} short steps" if "dynamic" in name else ""), flush=True)
    finally:
        engine.close()
    print("\nmeans over seeds:")
    for name, runs in results.items():
        mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        reached = [r["reached_target"][1] for r in runs if r["reached_target"]]
        print(f"{name:<26} final eval gold {mean('final_eval_gold'):.3f}, trained {mean('trained_tokens') / 1e3:.1f}k tok, "
              f"generated {mean('generated_tokens') / 1e3:.1f}k tok, {mean('seconds'):.0f} s; gold >= {args.target} "
              f"reached in {len(reached)}/{len(runs)} runs"
              + (f", after {sum(reached) / len(reached) / 1e3:.1f}k trained tok on average" if reached else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        _plot(results, Path(args.out).with_suffix(".png"))


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for color, (name, runs) in zip(("tab:blue", "tab:orange"), results.items()):
        for i, r in enumerate(runs):
            ax.plot([t / 1e3 for _, t, _ in r["curve"]], [g for _, _, g in r["curve"]], marker=".", color=color,
                    alpha=0.8, label=name if i == 0 else None)
    ax.set(xlabel="completion tokens trained on (thousands)", ylabel="held-out gold (eval/gold)",
           title="GRPO on the tiny task, gold reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
