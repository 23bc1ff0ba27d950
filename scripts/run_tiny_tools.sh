#!/usr/bin/env bash
# Multi-turn tool use on CPU, end to end, in minutes: the tiny tool-use task (alignment/tiny/lookup.py), whose answer
# only a tool call can give.
#   task assets -> SFT (demonstrations that call the tool half the time) and a no-tool baseline -> GRPO with
#   multi-turn rollouts (vLLM, the lookup tool, a verifiable reward) -> evaluation of whole episodes
# It ends with the report's success rate per policy (with CIs), turns and tool calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # see scripts/run_tiny_pipeline.sh
LAUNCH=(accelerate launch --config_file "${ACCELERATE_CONFIG:-recipes/accelerate/cpu_single.yaml}")

alignment tiny --task lookup --out outputs/tiny_lookup
"${LAUNCH[@]}" -m alignment sft recipes/tiny_tools/sft_no_tool.yaml   # the baseline that never calls the tool
"${LAUNCH[@]}" -m alignment sft recipes/tiny_tools/sft.yaml
"${LAUNCH[@]}" -m alignment ppo recipes/tiny_tools/grpo.yaml
"${LAUNCH[@]}" -m alignment eval recipes/tiny_tools/eval.yaml
echo
sed -n '/^## Multi-turn episodes/,/^Success is/p' outputs/tiny_lookup/eval/report.md
echo "report: outputs/tiny_lookup/eval/report.md"
