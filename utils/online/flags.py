"""The command line of ``online_accu_train.py``, generated from the configuration's fields (``utils.fields``):
one flag per field, in a group per part, plus the authors' odd flags below (``ODD``: the fields they set).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from utils.detect.detectors import DETECTORS
from utils.errors import UserError
from utils.fields import add_flags, check_number, from_args
from utils.online.config import PARTS, OnlineConfig

NO_EFFECT = "accepted for the authors' command lines; no effect"
GROUPS = {"run": "files, machine and seed", "stream": "the stream", "learner": "the online learner",
          "attack": "the attack", "eval": "stop rule and evaluation", "at": "adversarial training (AT)",
          "dsc": "DSC", "measure": "Memorization Discrepancy and the detectors"}
# the fields the odd flags set (every other field has its own generated flag)
ODD = {"attack.objective": "--only_reg / --only_normal / --only_second", "run.norm": "--use_bn / --group_norm",
       "eval.threshold": "--threshold"}


def odd_flags(p: argparse.ArgumentParser) -> None:
    """The authors' flags that do not map onto one field, and the flags that only the script reads."""
    a = p.add_argument_group("the authors' odd flags")
    a.add_argument("--only_reg", action="store_true", help="objective γ·nrm(g_t) + nrm(s) (the default)")
    a.add_argument("--only_normal", action="store_true", help="objective γ·nrm(g_t) alone")
    a.add_argument("--only_second", action="store_true", help="objective nrm(s) alone")
    a.add_argument("--use_bn", action="store_true",
                   help="assert the checkpoint uses BatchNorm (the checkpoint decides the norm either way)")
    a.add_argument("--group_norm", default=None, type=int,
                   help="assert the checkpoint uses GroupNorm (the checkpoint decides the norm either way)")
    a.add_argument("--threshold", default=None, type=float, help="stop the accumulative phase once the "
                   "test error exceeds this (absolute; default 0.18 unless --threshold_delta is given)")
    a.add_argument("--beta", default=1.0, type=float, help=NO_EFFECT + " (unused in the authors' code too)")
    a.add_argument("--workers", default=0, type=int, help=NO_EFFECT)
    a.add_argument("--distance", default="linf", choices=["linf"], help="threat model (only linf)")
    a.add_argument("--debug", action="store_true", help="show Python tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of online_accu_train.py."""
    p = argparse.ArgumentParser(description="The online phase (SPEC \"Phase 2\", \"The attack\"): accumulative "
                                "poisoning of a learner, then the trigger.")
    add_flags(p.add_argument_group("the defence"), OnlineConfig)  # --med
    for part, cls in PARTS.items():
        add_flags(p.add_argument_group(GROUPS[part]), cls, part)
    odd_flags(p)
    return p


def odd_values(args: argparse.Namespace) -> dict[str, dict]:
    """The fields the odd flags set (their no-effect flags checked all the same)."""
    check_number("--beta", args.beta)
    check_number("--workers", args.workers, 0, integer=True)
    if args.group_norm is not None:
        check_number("--group_norm", args.group_norm, 0, 4096, integer=True)
    chosen = [o for o in ("reg", "normal", "second") if getattr(args, f"only_{o}")]
    if len(chosen) > 1:
        raise UserError("give at most one of --only_reg, --only_normal, --only_second")
    delta = getattr(args, "eval.threshold_delta")
    detectors = getattr(args, "measure.detectors")
    return {"attack": {"objective": chosen[0] if chosen else "reg"},
            "run": {"norm": "bn" if args.use_bn else ("gn" if args.group_norm else None)},
            "eval": {"threshold": 0.18 if args.threshold is None and delta is None else args.threshold},
            "measure": {"detectors": tuple(DETECTORS) if detectors == ["all"] else tuple(detectors)}}


def config_from_args(args: argparse.Namespace) -> OnlineConfig:
    """The typed configuration from the parsed flags: the one place flags become settings (validated there)."""
    odd = odd_values(args)
    parts = {part: from_args(args, cls, part, **odd.get(part, {})) for part, cls in PARTS.items()}
    return from_args(args, OnlineConfig, **parts)


def parse_config(argv: Sequence[str] | None = None) -> OnlineConfig:
    """Flags -> a validated OnlineConfig."""
    return config_from_args(build_parser().parse_args(argv))
