#!/usr/bin/env bash
# Standard training under accumulative poisoning: the authors' run_st.sh command.
# CPU scale (the cpu preset's burn-in, written by `python reproduce.py --preset cpu` or `make demo`):
#   CKPT=checkpoints/fashion-mnist_cnn_b0 MODEL=epoch5.pth DATASET=fashion-mnist ARCH=cnn bash run_st.sh
exec bash "$(dirname "$0")/scripts/run_online.sh" ST "$@"
