#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# One torch thread per process: these tiny models gain nothing from more, and on 2 cores shared by several
# processes (vLLM engine, DeepSpeed ranks) the thread pools thrash (a tiny SFT step: 0.14 s -> 3 s).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
