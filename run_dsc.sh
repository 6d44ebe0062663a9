#!/usr/bin/env bash
# DSC (the authors' --med OURS) under accumulative poisoning: their run_dsc.sh command (see scripts/run_online.sh).
# CPU scale (the cpu preset's burn-in, written by `python reproduce.py --preset cpu` or `make demo`):
#   CKPT=checkpoints/fashion-mnist_cnn_b0 MODEL=epoch5.pth MEMORIZED=checkpoints/fashion-mnist_cnn_b0/epoch2.pth bash run_dsc.sh
exec bash "$(dirname "$0")/scripts/run_online.sh" OURS "$@"
