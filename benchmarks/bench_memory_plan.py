"""The memory plan against measured peaks on CPU: for the tiny default and a ~100M-parameter random Llama, run the
real stages (`alignment sft` and `alignment ppo` with GAE: policy, critic, reference and reward model; colocated
vLLM) and compare the plan's per-rank total (printed at start, saved in summary.json) with the peak resident set
size of the stage process (rank 0; on GPUs the stages record peak allocated memory instead).

    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
    python benchmarks/bench_memory_plan.py --out memory_plan.json

The vLLM engine's own process (EngineCore) is not a training rank and is not in either number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def run(stage: str, recipe: str, overrides: list[str]) -> dict:
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.dir="))
    proc = subprocess.run([sys.executable, "-m", "alignment", stage, str(REPO / recipe), *overrides], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    plan = [line for line in proc.stdout.splitlines() if line.startswith(("memory plan", "  "))]
    memory = json.loads((Path(out) / "summary.json").read_text())["memory_gib"]
    return {"planned_gib": memory["planned_per_rank"], "peak_gib": memory["peak_rank0"],
            "planned_over_peak": memory["planned_per_rank"] / memory["peak_rank0"], "plan": "\n".join(plan[:20])}


def main() -> None:
    from bench_ppo import benchmark_policy, make_reward_model

    from alignment.tiny import build_tiny

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--models", nargs="+", default=["tiny", "100m"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    tiny = build_tiny(work / "tiny")
    results = {}
    for name in args.models:
        policy = benchmark_policy(name, tiny, work)
        rm = make_reward_model(policy, work / f"rm_{name}")
        sft = run("sft", "recipes/tiny/sft.yaml", [f"model.name_or_path={policy}", f"data.sources.0.path={tiny.sft}",
                                                   "gold_eval=null", "train.max_steps=4", f"output.dir={work / name / 'sft'}"])
        ppo = run("ppo", "recipes/tiny/ppo.yaml", [f"policy.name_or_path={policy}", f"value.name_or_path={rm}",
                                                   f"rewards.0.path={rm}", f"prompts.sources.0.path={tiny.prompts}",
                                                   "eval=null", "train.steps=3", "algorithm.critic_warmup_steps=0",
                                                   f"output.dir={work / name / 'ppo'}"])
        results[name] = {"sft": sft, "ppo": ppo}
        for stage, r in results[name].items():
            print(f"{name} {stage}: planned {r['planned_gib']:.2f} GiB per rank, measured peak RSS {r['peak_gib']:.2f} GiB "
                  f"(plan / peak = {r['planned_over_peak']:.2f})\n{r['plan']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
