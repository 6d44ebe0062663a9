"""Reuse of finished work: a finished run or burn-in is reused only when its configuration is the one asked for
(another is refused, or replaced with ``fresh``); an interrupted burn-in is resumed; what is missing is run.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Sequence

from utils.burnin.config import SAME_ON_RESUME, BurnInConfig, checkpoint_args
from utils.burnin.run import run_burn_in
from utils.core.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.fields import with_defaults_for_missing
from utils.io.results import FolderLock, read_json
from utils.online.config import OnlineConfig, replace
from utils.online.run import run_online

IGNORED = ("run.overwrite",)  # fields that do not change a run's results
PATHS = ("run.resume", "run.dataroot", "run.out", "run.memorized_model", "measure.md_curve")  # compared resolved


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples compare alike."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def absolute_path(value: Any) -> Any:
    """A path (or list of paths) made absolute from this process's folder; anything else unchanged."""
    if isinstance(value, list):
        return [absolute_path(v) for v in value]
    return os.path.abspath(value) if isinstance(value, str) else value


def resolved(flat: dict[str, Any]) -> dict[str, Any]:
    """The path fields made absolute: a relative and an absolute path to the same file are the same
    configuration (Ray tasks get absolute paths)."""
    return {k: absolute_path(v) if k in PATHS else v for k, v in flat.items()}


def config_diff(saved: dict, wanted: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The fields where two configurations differ, as 'name: saved -> wanted' (ignoring IGNORED and ``ignore``)."""
    a, b = resolved(flatten(saved)), resolved(flatten(wanted))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in IGNORED + ignore and a.get(k) != b.get(k)]


def with_new_defaults(saved: dict, cfg: Any) -> dict:
    """A saved configuration with the fields added since it was written at their defaults (a new field's default
    keeps the behaviour it had before the field existed), so those runs are still reused."""
    flat = flatten(saved)
    return with_defaults_for_missing(flat, flatten(type(cfg)().to_dict())) if flat else saved


def finished_summary(cfg: OnlineConfig, fresh: bool) -> dict | None:
    """The summary of a finished run of exactly this configuration in cfg.run.out; None when there is none.

    A finished run of another configuration is refused (``fresh``: it will be replaced)."""
    out = cfg.run.out
    if out is None or not os.path.isfile(os.path.join(out, "summary.json")):
        return None
    saved = read_json(os.path.join(out, "config.json")).get("config", {}) if os.path.isfile(
        os.path.join(out, "config.json")) else {}
    diff = config_diff(with_new_defaults(saved, cfg), cfg.to_dict())
    if not diff:
        return read_json(os.path.join(out, "summary.json"))
    if fresh:
        return None
    raise UserError(f"{out!r} holds a finished run of another configuration ({'; '.join(diff[:3])}"
                    f"{' ...' if len(diff) > 3 else ''}); pass --fresh to replace it, or choose another --out")


def ensure_online(cfg: OnlineConfig, fresh: bool = False) -> dict:
    """The summary of this run: reused when finished with this configuration, else run (replacing)."""
    summary = finished_summary(cfg, fresh)
    if summary is not None:
        return summary
    return run_online(replace(cfg, run={"overwrite": True}))


def burn_in_matches(cfg: BurnInConfig, path: str) -> list[str]:
    """The settings that decide a checkpoint's weights and differ between ``cfg`` and the run that wrote it."""
    args = checkpoint_args(load_checkpoint(path))
    return [f"--{k} {args.get(k)!r} -> {getattr(cfg, k)!r}" for k in SAME_ON_RESUME
            if k in args and args[k] != getattr(cfg, k)]


def refuse_other_burn_in(cfg: BurnInConfig, fresh: bool) -> bool:
    """Whether ``cfg.outf`` holds a burn-in of this configuration; one of another configuration is refused
    (``fresh``: it will be replaced, so False)."""
    probe = next(iter(sorted(glob.glob(os.path.join(glob.escape(cfg.outf), "*.pth")))), None)
    diff = burn_in_matches(cfg, probe) if probe else []
    if diff and not fresh:
        raise UserError(f"{cfg.outf!r} holds a burn-in of another configuration ({'; '.join(diff)}); pass --fresh "
                        f"to replace it, or --ckpt another folder")
    return probe is not None and not diff


def ensure_burn_in(cfg: BurnInConfig, epochs: Sequence[int], fresh: bool = False) -> None:
    """The burn-in checkpoints of these epochs: reused when a run of this configuration wrote them, an
    interrupted run resumed, a missing one trained; another configuration's is refused (``fresh``: replaced)."""
    need = [os.path.join(cfg.outf, f"epoch{e}.pth") for e in epochs]
    last = os.path.join(cfg.outf, "last.pth")
    ours = refuse_other_burn_in(cfg, fresh)
    if ours and all(os.path.isfile(p) for p in need):
        with FolderLock(cfg.outf, "--ckpt"):  # refused while another process writes it; a killed writer's
            pass  # temporary files and lock file are removed
        print(f"burn-in: reusing {', '.join(need)}")
        return
    if ours and os.path.isfile(last) and load_checkpoint(last)["epoch"] < max(epochs):
        run_burn_in(dataclasses.replace(cfg, resume="", epochs=max(cfg.epochs, max(epochs))))
        return
    if ours and not fresh:
        missing = [p for p in need if not os.path.isfile(p)]
        raise UserError(f"the burn-in in {cfg.outf!r} has finished without saving {', '.join(missing)} "
                        f"(its --save_freq differs); pass --fresh to train it again with this preset's")
    run_burn_in(dataclasses.replace(cfg, overwrite=True))
