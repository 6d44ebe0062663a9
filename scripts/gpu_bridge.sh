#!/usr/bin/env bash
# The bridge's last steps at the authors' scale, on one GPU (H200-class: meant to finish in under 8 minutes; not
# yet run on one): CIFAR-10, ResNet-18 width 64 without input normalisation, one 40-epoch burn-in (memorized model:
# epoch 20), the authors' stream of 100 batches, ε 0.2, their stop (test error > 0.18), on 2 seeds, with the rows
# the claims need (trigger alone, clean stream + trigger, ST, DSC). Writes results/gpu_bridge/ (claims.md, table.md,
# fingerprint.json, ...). CIFAR-10 is downloaded by torchvision into data/ (or pass --dataroot DIR, --no_download).
#
#   bash scripts/gpu_bridge.sh                 # on the GPU
#   bash scripts/gpu_bridge.sh --smoke         # every stage tiny, on the CPU (CIFAR-10-format files needed)
#   bash scripts/gpu_bridge.sh --set preset.seeds=20,21,22 --out results/gpu_bridge_3  # more seeds (a later --set wins)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" reproduce.py --preset paper --out results/gpu_bridge \
    --set burn_in.normalize=false \
    --set preset.only=ST_trigger_alone,ST_clean_stream,ST,DSC \
    --set preset.seeds=20,21 \
    --set preset.md_curve=false --set preset.adaptive= \
    "$@"
