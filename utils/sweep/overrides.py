"""reproduce.py's overrides of a preset, from the same source as every flag (``utils.fields``): a named override
sets one or more fields (``OVERRIDES``), and ``--set PATH=VALUE`` sets any field. PATH is ``burn_in.<field>`` (the
burn-in), ``preset.<field>`` (the preset: seeds, epochs used, DSC's calibrated row) or ``<part>.<field>`` of the
base online configuration (``attack.epsilon``, ``learner.lr``, ...). Each value is typed and checked by its field.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from utils.burnin.config import BurnInConfig
from utils.errors import UserError
from utils.fields import check_choice, check_number, field_types, metavar_of
from utils.online.config import PARTS, replace
from utils.sweep.presets import Preset, checkpoint_folder

# flag -> the fields it sets, in order; the first one gives its type, help and range
OVERRIDES: dict[str, tuple[str, ...]] = {
    "dataset": ("burn_in.dataset",), "arch": ("burn_in.arch",), "width": ("burn_in.width",),
    "device": ("burn_in.device", "run.device"), "ckpt": ("burn_in.outf",),
    "dataroot": ("burn_in.dataroot", "run.dataroot"), "burnin_epochs": ("burn_in.epochs",),
    "save_freq": ("burn_in.save_freq",), "online_epoch": ("preset.online_epoch",),
    "memorized_epoch": ("preset.memorized_epoch",), "epochs": ("stream.steps",), "eval_subset": ("eval.eval_subset",),
    "lr": ("learner.lr",), "epsilon": ("attack.epsilon",), "threshold": ("eval.threshold",),
    "threshold_delta": ("eval.threshold_delta",), "dsc_calibrate": ("preset.dsc_calibrate",),
    "threads": ("burn_in.threads", "run.threads"), "seeds": ("preset.seeds",)}
STREAMS = {"distinct": False, "reuse": True}  # --stream: stream.reuse_first_batch


def target_field(path: str) -> tuple[type, dataclasses.Field]:
    """The dataclass and field a PATH names; a UserError listing the known names otherwise."""
    owner, _, name = path.partition(".")
    classes = {"burn_in": BurnInConfig, "preset": Preset, **PARTS}
    if owner not in classes:
        raise UserError(f"--set {path}: the part must be one of {', '.join(classes)} (e.g. attack.epsilon)")
    fields = {f.name: f for f in dataclasses.fields(classes[owner])}
    if name not in fields or (owner == "preset" and name in ("name", "burn_in", "base")):
        raise UserError(f"--set {path}: {owner} has no field {name!r}; known: {', '.join(fields)}")
    return classes[owner], fields[name]


def check_value(flag: str, path: str, value: Any) -> None:
    """The value against the range or choices of the field PATH names, in the words of ``flag``."""
    cls, f = target_field(path)
    kind, optional, many = field_types(cls)[f.name]
    o = f.metadata.get("opt")
    if o is None or (value is None and optional):
        return
    for v in (value if many else (value,)):
        if kind in (int, float):
            check_number(flag, v, o.low, o.high, integer=kind is int, low_open=o.low_open, note=o.note)
        elif o.choices:
            check_choice(flag, v, o.choices)


def parse_set(item: str) -> tuple[str, Any]:
    """``PATH=VALUE`` -> (PATH, the value typed as its field: numbers, true/false, none, a,b,c for tuples)."""
    path, eq, text = item.partition("=")
    if not eq:
        raise UserError(f"--set {item!r}: write PATH=VALUE, e.g. --set attack.epsilon=0.05")
    cls, f = target_field(path)
    kind, optional, many = field_types(cls)[f.name]

    def one(t: str) -> Any:
        if optional and t.lower() == "none":
            return None
        if kind is bool:
            if t.lower() not in ("true", "false"):
                raise UserError(f"--set {path}: write true or false, got {t!r}")
            return t.lower() == "true"
        try:
            return kind(t)
        except ValueError:
            raise UserError(f"--set {path}: {t!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None

    return path, tuple(one(t) for t in text.split(",") if t) if many else one(text)


def add_override_flags(p: argparse.ArgumentParser) -> None:
    """The named overrides (typed and described by their first field) and --set."""
    o = p.add_argument_group("overrides of the preset's values (they reach the burn-in and every run)")
    for flag, paths in OVERRIDES.items():
        cls, f = target_field(paths[0])
        kind, _, many = field_types(cls)[f.name]
        opt_ = f.metadata.get("opt")
        o.add_argument(f"--{flag}", default=None, type=kind, nargs="+" if many else None,
                       metavar=metavar_of(f, opt_, kind) if opt_ else flag.upper(),
                       help=f"{opt_.help if opt_ else ''} (sets {', '.join(paths)})".strip())
    o.add_argument("--stream", default=None, choices=list(STREAMS),
                   help="distinct batches (SPEC default) or the authors' reuse of the first batch")
    o.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="set any field: burn_in.<field>, preset.<field> or <part>.<field> of the online "
                   "configuration (e.g. attack.gamma=2, burn_in.lr=0.05, preset.seeds=1,2,3)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """{PATH: value} from the named overrides, --stream and --set (a later --set wins), each value checked."""
    changes: dict[str, Any] = {}
    for flag, paths in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            value = tuple(value) if isinstance(value, list) else value
            check_value(f"--{flag}", paths[0], value)
            changes.update({path: value for path in paths})
    if args.stream is not None:
        changes["stream.reuse_first_batch"] = STREAMS[args.stream]
    for item in args.set:
        path, value = parse_set(item)
        check_value(f"--set {path}", path, value)
        changes[path] = value
    return changes


def with_overrides(preset: Preset, changes: dict[str, Any]) -> Preset:
    """The preset with ``changes`` ({PATH: value}, or {flag name: value} for the named overrides; None: not given)
    applied to the burn-in, the base configuration and the preset."""
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        if value is not None:
            flat.update({path: value for path in OVERRIDES.get(key, (key,))})
    by_owner: dict[str, dict[str, Any]] = {}
    for path, value in flat.items():
        owner, _, name = path.partition(".")
        by_owner.setdefault(owner, {})[name] = value
    b = by_owner.pop("burn_in", {})
    if "outf" not in b and b.keys() & {"dataset", "arch", "width", "normalize"}:  # another model: its own folder
        merged = dataclasses.replace(preset.burn_in, **b)
        b["outf"] = checkpoint_folder(merged.dataset, merged.arch, merged.width, merged.normalize)
    top = by_owner.pop("preset", {})
    ev = by_owner.get("eval", {})
    if ev.keys() & {"threshold", "threshold_delta"}:  # one stop rule replaces the other
        ev.setdefault("threshold", None)
        ev.setdefault("threshold_delta", None)
    base = replace(preset.base, **by_owner)
    return dataclasses.replace(preset, burn_in=dataclasses.replace(preset.burn_in, **b), base=base, **top)
