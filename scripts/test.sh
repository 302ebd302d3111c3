#!/usr/bin/env bash
# Set up (dev extras) and run the test suite. Arguments go to pytest: scripts/test.sh -m slow, -k batching ...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
