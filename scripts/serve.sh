#!/usr/bin/env bash
# Set up, train the default model on the bundled digits if there is none yet, and serve it.
#   scripts/serve.sh [vae-serve options]     e.g. --host 0.0.0.0 --port 8080
# MODEL (default models/vae.ts) picks the artifact; every VAE_* environment variable is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${MODEL:-models/vae.ts}"

scripts/setup.sh train
if [ ! -f "$model" ]; then
    echo "serve: no model at $model; training the default digits model first (about a minute on 2 cores)"
    .venv/bin/python -m training --data digits --out "$model"
fi
exec .venv/bin/python -m service --model "$model" "$@"
