"""The command line of ``train_cifar.py``, generated from ``BurnInConfig``'s fields, plus the authors' flags that
have no effect here (checked all the same)."""
from __future__ import annotations

import argparse
from typing import Sequence

from utils.burnin.config import BurnInConfig
from utils.fields import add_flags, check_number, from_args


def build_parser() -> argparse.ArgumentParser:
    """Every flag of train_cifar.py."""
    p = argparse.ArgumentParser(description="Burn-in (SPEC \"Phase 1\"): train a model on clean data, checkpoint "
                                "every --save_freq epochs.")
    g = p.add_argument_group("the burn-in")
    add_flags(g, BurnInConfig)
    g.add_argument("--debug", action="store_true", help="show Python tracebacks")
    a = p.add_argument_group("the authors' flags with no effect here")
    a.add_argument("--workers", default=8, type=int, help="accepted for the authors' command lines; no effect "
                   "(data stays on the device, no worker processes)")
    a.add_argument("--start_epoch", default=1, type=int, help="accepted for the authors' command lines; no "
                   "effect (use --resume to continue a run)")
    return p


def config_from_args(args: argparse.Namespace) -> BurnInConfig:
    """The typed configuration from the parsed flags (validated there; the no-effect flags checked here)."""
    check_number("--workers", args.workers, 0, integer=True)
    check_number("--start_epoch", args.start_epoch, 1, integer=True)
    return from_args(args, BurnInConfig)


def parse_config(argv: Sequence[str] | None = None) -> BurnInConfig:
    """Flags -> a validated BurnInConfig."""
    return config_from_args(build_parser().parse_args(argv))
