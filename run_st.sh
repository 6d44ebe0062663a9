#!/usr/bin/env bash
# Standard training under accumulative poisoning: the authors' run_st.sh command.
# CPU scale: CKPT=checkpoints/fashion-mnist_cnn MODEL=epoch10.pth DATASET=fashion-mnist ARCH=cnn bash run_st.sh
exec bash "$(dirname "$0")/scripts/run_online.sh" ST "$@"
