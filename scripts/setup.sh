#!/usr/bin/env bash
# Install afpt (editable) into the current Python environment.
# torch: an existing install is kept; where none is present, the CPU build torch==2.13.0 is installed.
# Usage: scripts/setup.sh [--dev]   (--dev adds pytest, ruff and the Optuna sweeper)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: no torch found, installing the CPU build torch==2.13.0"
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".${extras}"
echo "setup: afpt installed ($("$PYTHON" -c 'import afpt; print(afpt.__version__)'))"
