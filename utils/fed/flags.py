"""The command line of ``feder_accu_train.py``, generated from the configuration's fields (``utils.fields``): one
flag per field, in a group per part, plus the authors' flags that this protocol reads nowhere (accepted, checked)."""
from __future__ import annotations

import argparse
from typing import Sequence

from utils.fed.config import PARTS, FedConfig
from utils.fields import add_flags, check_number, from_args

NO_EFFECT = "accepted for the authors' command lines; no effect"
GROUPS = {"run": "files, machine and seed", "clients": "the clients and their local SGD",
          "attack": "the attacker", "server": "the server: aggregation, stop rule, screening",
          "flower": "Flower (optional: pip install -r requirements-flower.txt)"}


def odd_flags(p: argparse.ArgumentParser) -> None:
    """The authors' flags with no effect here, and --debug."""
    a = p.add_argument_group("the authors' other flags")
    a.add_argument("--use_bn", action="store_true", help=NO_EFFECT + " (the checkpoint decides the norm)")
    a.add_argument("--workers", default=0, type=int, help=NO_EFFECT)
    a.add_argument("--debug", action="store_true", help="show Python tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of feder_accu_train.py."""
    p = argparse.ArgumentParser(description="Federated learning under the accumulative attack (SPEC \"Federated "
                                "learning\"): accumulative rounds, then the trigger round, with an aggregator; in "
                                "one process or on Flower.")
    for part, cls in PARTS.items():
        add_flags(p.add_argument_group(GROUPS[part]), cls, part)
    odd_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> FedConfig:
    """The typed configuration from the parsed flags (validated as it is built)."""
    check_number("--workers", args.workers, 0, integer=True)
    return FedConfig(**{part: from_args(args, cls, part) for part, cls in PARTS.items()})


def parse_config(argv: Sequence[str] | None = None) -> FedConfig:
    """Flags -> a validated FedConfig."""
    return config_from_args(build_parser().parse_args(argv))
