#!/usr/bin/env bash
# Adversarial training under accumulative poisoning: the authors' run_at.sh command (see scripts/run_online.sh).
# CPU scale (the cpu preset's burn-in, written by `python reproduce.py --preset cpu` or `make demo`):
#   CKPT=checkpoints/fashion-mnist_cnn_b0 MODEL=epoch5.pth DATASET=fashion-mnist ARCH=cnn bash run_at.sh
exec bash "$(dirname "$0")/scripts/run_online.sh" AT "$@"
