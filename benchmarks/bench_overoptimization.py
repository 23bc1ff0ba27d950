"""Gold against the proxy reward over PPO steps (Gao et al. 2023's picture), and what moves the curve: the KL
coefficient, reward clipping, an ensemble of reward models.

On the tiny task, from a policy already pushed towards what the learned reward model over-rates: the tiny SFT policy
and two reward models (`recipes/tiny/rm.yaml`, seeds 0 and 1) are built through the real CLI; then the real PPO stage
(`recipes/tiny/ppo_grpo.yaml`: GRPO, the reward model as reward, the gold rule only watched) runs each variant for
`--steps` steps in this process on one shared vLLM engine, recording ppo/reward (proxy), ppo/gold, ppo/kl and
ppo/overoptimization per step.

    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
    python benchmarks/bench_overoptimization.py --steps 40 --out overoptimization.json

Prints, per variant: the proxy's gain, the gold's peak (and its step), the final gold, and the first step the watch
reported reward up while gold down; writes the per-step series and a plot of gold against proxy reward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

RM_TERM = "{{kind: model, path: {path}, normalize: true, weight: {weight}}}"
VARIANTS = {  # name -> recipe overrides on recipes/tiny/ppo_grpo.yaml (its leash: k3 in the loss, coef 0.3)
    "no_leash": ["algorithm.kl.coef=0.0"],
    "kl_0.05": ["algorithm.kl.coef=0.05"],
    "kl_0.3 (shipped)": [],
    "no_leash, reward_clip 0.5": ["algorithm.kl.coef=0.0", "algorithm.reward_clip=0.5"],
    "no_leash, 2-RM ensemble": ["algorithm.kl.coef=0.0", "rewards=[{rm0}, {rm1}]"],
}


def main() -> None:
    from conftest import run_stage, tiny_rm_overrides, tiny_sft_overrides

    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages.ppo import run
    from alignment.tiny import build_tiny
    from rollout.vllm_engine import VLLMEngine

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--window", type=int, default=5, help="overoptimization.window")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_overopt_"))
    tiny = build_tiny(work / "tiny")
    sft = work / "sft"
    run_stage("sft", REPO / "recipes/tiny/sft.yaml", [*tiny_sft_overrides(tiny, sft), "gold_eval=null"])
    rms = []
    for seed in (0, 1):
        rm = work / f"rm{seed}"
        run_stage("rm", REPO / "recipes/tiny/rm.yaml", [*tiny_rm_overrides(tiny, sft / "final", rm), "gold_agreement=null",
                                                        f"train.seed={seed}", f"data.seed={seed}"])
        rms.append(rm / "final")
    ensemble = {"rm0": RM_TERM.format(path=rms[0], weight=0.5), "rm1": RM_TERM.format(path=rms[1], weight=0.5)}

    engine = VLLMEngine(str(tiny.base), dtype="float32", seed=0, max_model_len=256)
    results = {}
    try:
        for name, overrides in VARIANTS.items():
            out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            recipe = load_recipe(REPO / "recipes/tiny/ppo_grpo.yaml", PPORecipe, [
                f"policy.name_or_path={sft / 'final'}", f"rewards.0.path={rms[0]}", f"prompts.sources.0.path={tiny.prompts}",
                f"eval.prompts={tiny.eval_prompts}", f"output.dir={out}", f"train.steps={args.steps}", "eval_every=1000",
                f"output.save_steps={args.steps}", f"overoptimization.window={args.window}",
                *[o.format(**ensemble) for o in overrides]])
            run(recipe, engine=engine)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            series = {k: [r[k] for r in rows] for k in ("ppo/reward", "ppo/gold", "ppo/kl", "ppo/overoptimization")}
            gold = series["ppo/gold"]
            peak = max(range(len(gold)), key=gold.__getitem__)
            flagged = next((r["step"] for r in rows if r["ppo/overoptimization"]), None)
            results[name] = {"series": series, "eval_gold_final": rows[-1].get("eval/gold"),
                             "reward_gain": series["ppo/reward"][-1] - series["ppo/reward"][0],
                             "gold_start": gold[0], "gold_peak": gold[peak], "gold_peak_step": rows[peak]["step"],
                             "gold_final": gold[-1], "first_overoptimization_step": flagged}
            r = results[name]
            print(f"{name:<28} reward +{r['reward_gain']:.2f}  gold {r['gold_start']:.2f} -> peak {r['gold_peak']:.2f} "
                  f"(step {r['gold_peak_step']}) -> {r['gold_final']:.2f} (eval {r['eval_gold_final']:.2f}); "
                  f"over-optimisation flagged at step {flagged}", flush=True)
    finally:
        engine.close()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        _plot(results, Path(args.out).with_suffix(".png"))


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        left.plot(r["series"]["ppo/reward"], r["series"]["ppo/gold"], marker=".", label=name)
        right.plot(r["series"]["ppo/kl"], r["series"]["ppo/gold"], marker=".", label=name)
    left.set(xlabel="proxy reward (learned RM)", ylabel="gold (rule)", title="gold against proxy reward")
    right.set(xlabel="KL to the reference (per sequence)", ylabel="gold (rule)", title="gold against KL")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
