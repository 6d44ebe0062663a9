#!/usr/bin/env bash
# DSC (the authors' --med OURS) under accumulative poisoning: their run_dsc.sh command (see scripts/run_online.sh).
# CPU scale: CKPT=checkpoints/fashion-mnist_cnn MODEL=epoch10.pth MEMORIZED=checkpoints/fashion-mnist_cnn/epoch5.pth bash run_dsc.sh
exec bash "$(dirname "$0")/scripts/run_online.sh" OURS "$@"
