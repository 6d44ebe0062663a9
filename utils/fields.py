"""Typed configuration with one source per flag: a dataclass field carries its command-line flag, help text and
allowed range (``opt``). The values are checked once, when the dataclass is built (``check_fields``, called by
``__post_init__``), and the command line is generated from the same fields (``add_flags``, ``from_args``), so a
new flag is its field and its consumer, nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from utils.errors import UserError


@dataclass(frozen=True)
class Opt:
    """A field's command line and range. ``flag``: its name (default ``--<field>``); ``negate``: a bool field that
    is True by default and whose flag turns it off; ``low``/``high``: the numeric range (``low_open``: low
    excluded); ``choices``: the allowed names (``parse_choices``: let argparse refuse others, exit 2)."""

    help: str = ""
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    note: str = ""
    choices: tuple[str, ...] = ()
    parse_choices: bool = False
    negate: bool = False
    metavar: str | None = None
    nargs: str | None = None  # e.g. "?" with ``const``: a flag whose value may be left out
    const: Any = None
    by_hand: bool = False  # its flag is written by hand (a script's odd flags), not generated


def opt(default: Any, help: str = "", **kw: Any) -> Any:
    """A dataclass field with its flag and range (``Opt``'s keywords)."""
    return field(default=default, metadata={"opt": Opt(help=help, **kw)})


def check_number(flag: str, value: Any, low: float | None = None, high: float | None = None, *,
                 integer: bool = False, low_open: bool = False, note: str = "") -> None:
    """One range check: a finite number (an integer if asked) within [low, high] (``low_open``: low excluded)."""
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise UserError(f"{flag} must be {kind}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        if low is not None and high is not None:
            rule = f"lie in {'(' if low_open else '['}{_num(low)}, {_num(high)}]"
        else:
            rule = f"be {'>' if low_open else '>='} {_num(low)}" if low is not None else f"be <= {_num(high)}"
        raise UserError(f"{flag} must {rule}{f' ({note})' if note else ''}, got {_num(value)}")


def _num(v: float) -> str:
    """An integer in full (seeds), anything else as %g."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"


def check_choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of a fixed set of names."""
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, tuple[type, bool, bool]]:
    """Per field: (its base type, whether it may be None, whether it is a tuple of that type)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args, optional, many = typing.get_args(hint), False, False
        if type(None) in args:
            optional, hint = True, next(a for a in args if a is not type(None))
            args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:
            many, hint = True, args[0]
        out[name] = (hint, optional, many)
    return out


def flag_of(f: dataclasses.Field) -> str:
    """The command-line name of a field."""
    o = f.metadata.get("opt")
    return (o.flag if o is not None and o.flag else None) or f"--{f.name}"


def options(cls: type, generated: bool = False) -> list[tuple[dataclasses.Field, Opt]]:
    """The fields of a configuration dataclass that have an ``Opt``, in order (``generated``: only those whose flag
    is generated)."""
    return [(f, f.metadata["opt"]) for f in dataclasses.fields(cls)
            if "opt" in f.metadata and not (generated and f.metadata["opt"].by_hand)]


def check_fields(obj: Any) -> None:
    """Check every field's value against its ``Opt`` range or choices (a UserError naming the flag)."""
    types = field_types(type(obj))
    for f, o in options(type(obj)):
        value, (kind, optional, many) = getattr(obj, f.name), types[f.name]
        if value is None and optional:
            continue
        for v in (value if many else (value,)):
            if kind in (int, float):
                check_number(flag_of(f), v, o.low, o.high, integer=kind is int, low_open=o.low_open, note=o.note)
            elif o.choices:
                check_choice(flag_of(f), v, o.choices)


def help_text(o: Opt) -> str:
    """The help of a flag, with its range when it has one."""
    if o.low is None and o.high is None:
        return o.help
    low = "-inf" if o.low is None else _num(o.low)
    high = "inf" if o.high is None else _num(o.high)
    return f"{o.help} {'(' if o.low_open else '['}{low}, {high}]"


def metavar_of(f: dataclasses.Field, o: Opt, kind: type) -> str | None:
    """What --help shows for a flag's value: the field's own (DIR, FILE, ...), N for a count, the choices, else the
    field's name (never the namespace path such as RUN.RESUME)."""
    if o.metavar is not None or (o.parse_choices and o.choices):
        return o.metavar
    return "N" if kind is int else f.name.upper()


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, part: str = "") -> None:
    """One flag per field of ``cls`` that has an ``Opt``; its value lands in ``<part>.<field>`` of the namespace."""
    types = field_types(cls)
    for f, o in options(cls, generated=True):
        kind, _, many = types[f.name]
        kw: dict[str, Any] = {"dest": f"{part}.{f.name}" if part else f.name, "help": help_text(o) or None}
        if kind is bool:
            kw.update(action="store_false" if o.negate else "store_true")
        else:
            kw.update(type=kind, default=list(f.default) if many else f.default, metavar=metavar_of(f, o, kind))
            if many or o.nargs:
                kw.update(nargs="*" if many else o.nargs)
            if o.nargs == "?":
                kw["const"] = o.const
            if o.parse_choices:
                kw["choices"] = list(o.choices)
        parser.add_argument(flag_of(f), *o.aliases, **kw)


def from_args(args: argparse.Namespace, cls: type, part: str = "", **extra: Any) -> Any:
    """The dataclass ``cls`` from the flags ``add_flags`` made (``extra``: fields set from other flags)."""
    types = field_types(cls)
    values = {}
    for f, _ in options(cls, generated=True):
        value = getattr(args, f"{part}.{f.name}" if part else f.name)
        values[f.name] = tuple(value) if types[f.name][2] else value
    return cls(**{**values, **extra})


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` one level down, for a configuration made of parts:
    ``replace(cfg, attack={"epsilon": 0.05}, defence="AT")`` (a dict changes fields of that part)."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) if isinstance(v, dict) else v
                                      for k, v in changes.items()})


class Composite:
    """A configuration made of parts (frozen dataclasses as fields), as plain JSON data and back (config.json)."""

    def to_dict(self) -> dict:
        """The whole configuration as plain JSON data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        """The inverse of ``to_dict`` (keys that are not fields are ignored)."""
        hints = typing.get_type_hints(cls)
        return cls(**{k: hints[k](**v) if dataclasses.is_dataclass(hints[k]) else v for k, v in d.items()
                      if k in hints})


def with_defaults_for_missing(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration ({dotted.field: value}) with every field it lacks at its default: a field added later
    keeps, at its default, the behaviour it had before it existed, so the saved one equals today's at it."""
    return {**{k: v for k, v in defaults.items() if k not in flat}, **flat}
