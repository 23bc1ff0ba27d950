#!/usr/bin/env bash
# The main job: the whole RLHF pipeline on the built-in tiny default, on CPU, in minutes.
#   tiny assets -> SFT -> reward model -> PPO (vLLM rollouts, DeepSpeed training), and DPO -> evaluation report
# Each stage is the same command a user runs on real models; only the recipe and accelerate config change.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# One torch thread per process: these tiny models gain nothing from more, and on 2 cores shared by several
# processes (vLLM engine, DeepSpeed ranks) the thread pools thrash (a tiny SFT step: 0.14 s -> 3 s).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LAUNCH=(accelerate launch --config_file "${ACCELERATE_CONFIG:-recipes/accelerate/cpu_single.yaml}")

alignment tiny --out outputs/tiny
"${LAUNCH[@]}" -m alignment sft recipes/tiny/sft.yaml
"${LAUNCH[@]}" -m alignment rm recipes/tiny/rm.yaml
"${LAUNCH[@]}" -m alignment ppo recipes/tiny/ppo.yaml
"${LAUNCH[@]}" -m alignment dpo recipes/tiny/dpo.yaml   # the offline road from the same preference pairs
"${LAUNCH[@]}" -m alignment eval recipes/tiny/eval.yaml
echo "report: outputs/tiny/eval/report.md"
