#!/usr/bin/env bash
# Create .venv and install cellvi with its test extras. Called by `make`; safe to re-run.
# torch: take the 2.13.0 wheel where one lies on disk (CPU build, fast), else whatever the index serves.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

quiet() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither" || true; }; }

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "cellvi needs Python >= 3.11, found " + sys.version' 
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
if ! "$PY" -c "import torch" 2>/dev/null; then
  quiet "$PY" -m pip install -q "torch==2.13.0" || quiet "$PY" -m pip install -q torch
fi
quiet "$PY" -m pip install -q -e ".[test]"
"$PY" -c "import cellvi, torch, scvi; print('cellvi', cellvi.__version__, '| torch', torch.__version__, '| scvi-tools', scvi.__version__)"
