#!/usr/bin/env bash
# Create the virtual environment and install the project into it.
#   scripts/setup.sh [EXTRAS]       EXTRAS: dev (default: tests + training + the client), train, or "" (serving only)
# Torch is installed first from TORCH_SPEC (default: the pinned CPU wheel, torch==2.13.0) so that pip never
# resolves a bare "torch" to the multi-GB CUDA build. GPU users: TORCH_SPEC="torch==2.13.0" with
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" (or any wheel they trust).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1-dev}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

"$python" - <<'PY'
import sys
if not ((3, 10) <= sys.version_info[:2] < (3, 14)):
    sys.exit(f"Python 3.10-3.13 is required, found {sys.version.split()[0]}")
PY
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip options
    "${pip[@]}" ${TORCH_PIP_ARGS:-} "$torch_spec"
fi
if [ "$extras" = dev ]; then  # the client is its own distribution (client/); the tests and the bench use it
    "${pip[@]}" --editable ./client
fi
"${pip[@]}" --editable ".${extras:+[$extras]}"
echo "setup: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")') in $venv"
