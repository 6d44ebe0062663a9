"""Burn-in (SPEC phase 1): train a model on clean data, checkpoint every --save_freq epochs.

Paper scale:  python train_cifar.py                      (CIFAR-10, ResNet-18, 40 epochs)
CPU scale:    python train_cifar.py --dataset fashion-mnist --arch cnn --epochs 10 --save_freq 1
This script is the flags; the training is ``utils.burnin.run_burn_in(config)``.
"""
from __future__ import annotations

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

import argparse
from typing import Sequence

from utils.burnin import BurnInConfig, run_burn_in
from utils.config import check_number
from utils.data import DATASETS
from utils.errors import run_cli
from utils.models import ARCHS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--arch", default="resnet18", help=f"one of {', '.join(ARCHS)}")
    p.add_argument("--width", default=0, type=int, help="base width (0: the arch's default, resnet18 64, cnn 16)")
    p.add_argument("--group_norm", default=0, type=int,
                   help="0 (default): BatchNorm, as the authors' burn-in trains; N>0: GroupNorm with N groups")
    p.add_argument("--dataroot", default="data", help="dataset folder (torchvision layout)")
    p.add_argument("--no_download", action="store_true", help="never download; fail if files are missing")
    p.add_argument("--batch_size", default=256, type=int)
    p.add_argument("--test_batch_size", default=256, type=int, help="evaluation batch size (speed only)")
    p.add_argument("--workers", default=8, type=int, help="accepted for the authors' command lines; no effect "
                   "(data stays on the device, no worker processes)")
    p.add_argument("--epochs", default=40, type=int)
    p.add_argument("--start_epoch", default=1, type=int, help="accepted for the authors' command lines; no "
                   "effect (use --resume to continue a run)")
    p.add_argument("--save_freq", default=10, type=int, help="write epoch{N}.pth every N epochs")
    p.add_argument("--lr", default=0.1, type=float, help="initial LR; x0.1 every 50 epochs (the authors' schedule)")
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--weight_decay", default=1e-4, type=float)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue an interrupted run from the last checkpoint in DIR (default: --outf)")
    p.add_argument("--outf", default="checkpoints_base_bn", help="checkpoint and log folder")
    p.add_argument("--overwrite", action="store_true", help="replace a burn-in already in --outf")
    p.add_argument("--subset", default=0, type=int, help="train on the first N training samples only (0: all)")
    p.add_argument("--clip_gradnorm", action="store_true", help="clip the gradient's L2 norm to --clipvalue")
    p.add_argument("--clipvalue", default=1.0, type=float)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels only (slower on CUDA; "
                   "see utils/train.py)")
    p.add_argument("--threads", default=0, type=int, help="torch's CPU threads (0: torch's default, the cores); "
                   "results on the CPU depend on it")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def config_from_args(args: argparse.Namespace) -> BurnInConfig:
    """The typed configuration from the parsed flags (validated there; the no-effect flags checked here)."""
    check_number("--workers", args.workers, 0, integer=True)
    check_number("--start_epoch", args.start_epoch, 1, integer=True)
    keep = {k: v for k, v in vars(args).items() if k not in ("workers", "start_epoch", "debug", "no_download")}
    return BurnInConfig(**keep, download=not args.no_download)


def main(argv: Sequence[str] | None = None) -> int:
    run_burn_in(config_from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    run_cli(main)
