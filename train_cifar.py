"""Burn-in (SPEC phase 1): train a model on clean data, checkpoint every --save_freq epochs.

Paper scale:  python train_cifar.py                      (CIFAR-10, ResNet-18, 40 epochs)
CPU scale:    python train_cifar.py --dataset fashion-mnist --arch cnn --epochs 10 --save_freq 1
This script is the flags (``utils.burnin.flags``, generated from ``BurnInConfig``); the training is
``utils.burnin.run.run_burn_in(config)``.
"""
from __future__ import annotations

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

from typing import Sequence

from utils.burnin.flags import build_parser, parse_config
from utils.burnin.run import run_burn_in
from utils.errors import run_cli

__all__ = ["build_parser", "parse_config", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    run_burn_in(parse_config(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
