"""Ablations: a named, ordered list of steps, each a set of configuration changes (the ``--set PATH=VALUE`` paths),
applied to a base preset either cumulatively (a path from the base towards a target) or one at a time (each step
alone from the base). Every step is a preset run on the same paired replicates (burn-in seed x online seed) in its
own folder; burn-ins and finished runs are reused, also across steps (a run whose configuration another step
already finished is copied, not recomputed).

An ablation is a small TOML file (``reproduce.py --ablation FILE``), or the name of one shipped in
``utils/sweep/ablations/`` (``--ablation bridge``)::

    name = "my_eps"                      # the results folder: results/ablation_<name>
    base = "cpu"                         # a preset of reproduce.py
    mode = "one_at_a_time"               # or "cumulative"
    [base_set]                           # changes to the base itself (optional): rows kept, replicates, ...
    "preset.only" = ["ST_trigger_alone", "ST"]
    [[steps]]
    label = "ε 0.1"
    note = "how far this step still is from the target"  # optional
    set = { "attack.epsilon" = 0.1 }
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from utils.errors import UserError
from utils.io.results import FolderLock, copy_folder, ensure_dir, read_json, write_json
from utils.sweep.on_ray import RayOptions
from utils.sweep.overrides import check_value, parse_set, with_overrides
from utils.sweep.presets import PRESETS, Preset, Replicate, Row, smoke
from utils.sweep.reuse import config_diff
from utils.sweep.runs import run_presets

MODES = ("cumulative", "one_at_a_time")
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablations")
Changes = tuple[tuple[str, Any], ...]  # (PATH, value) in the order written


@dataclass(frozen=True)
class Step:
    """One step: a label, a folder slug, its own changes and (cumulative mode) all changes from the base."""

    label: str
    slug: str
    changes: Changes
    applied: Changes  # what the step's preset has beyond the base (cumulative: this step's and every earlier one's)
    note: str = ""


@dataclass(frozen=True)
class Ablation:
    name: str
    base: str
    mode: str
    steps: tuple[Step, ...]  # steps[0] is the base itself
    base_set: Changes = ()
    description: str = ""
    source: str = ""


def slugify(text: str) -> str:
    """An ASCII folder-name part of a label."""
    text = text.replace("ε", "eps").replace("γ", "gamma").replace("τ", "tau").replace("→", "to")
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:40] or "step"


def _as_text(value: Any) -> str:
    """A TOML value as the text of --set PATH=VALUE (lists: a,b,c; booleans: true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(v) for v in value)
    if isinstance(value, (int, float, str)):
        return str(value)
    raise UserError(f"{value!r} is not a number, string, boolean or list of them")


def parse_changes(table: Any, where: str) -> Changes:
    """A TOML table {PATH: value} as typed, checked (PATH, value) pairs, in the words of ``where``."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: write the changes as a table of PATH = value (e.g. \"attack.epsilon\" = 0.1)")
    out = []
    for path, value in table.items():
        try:
            path, typed = parse_set(f"{path}={_as_text(value)}")
            check_value(f"--set {path}", path, typed)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        out.append((path, typed))
    return tuple(out)


def parse_ablation(d: dict, source: str) -> Ablation:
    """An Ablation from the TOML's table; every malformed part is a UserError naming the file and the step."""
    unknown = set(d) - {"name", "base", "mode", "steps", "base_set", "description"}
    if unknown:
        raise UserError(f"{source}: unknown key(s) {sorted(unknown)}; known: name, base, mode, description, "
                        f"base_set, steps")
    name, base, mode = d.get("name"), d.get("base", "cpu"), d.get("mode", "cumulative")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UserError(f"{source}: name must be a folder-name word (letters, digits, _ . -), got {name!r}")
    if base not in PRESETS:
        raise UserError(f"{source}: base {base!r} is not a preset; use one of {', '.join(PRESETS)}")
    if mode not in MODES:
        raise UserError(f"{source}: mode {mode!r} must be one of {', '.join(MODES)}")
    raw = d.get("steps")
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{source}: no steps; add at least one [[steps]] with a label and a set table")
    steps, applied = [Step("base", "base", (), ())], ()
    for i, s in enumerate(raw, 1):
        where = f"{source}, step {i}"
        if not isinstance(s, dict) or not isinstance(s.get("label"), str) or "set" not in s:
            raise UserError(f"{where}: each step needs a label and a set table")
        extra = set(s) - {"label", "set", "note"}
        if extra:
            raise UserError(f"{where} ({s['label']}): unknown key(s) {sorted(extra)}; known: label, set, note")
        changes = parse_changes(s["set"], f"{where} ({s['label']})")
        if not changes:
            raise UserError(f"{where} ({s['label']}): the set table is empty")
        applied = (applied + changes) if mode == "cumulative" else changes
        steps.append(Step(s["label"], f"{i}_{slugify(s['label'])}", changes, applied, s.get("note", "")))
    return Ablation(name, base, mode, tuple(steps), parse_changes(d.get("base_set", {}), f"{source}, base_set"),
                    str(d.get("description", "")), source)


def load_ablation(name_or_file: str) -> Ablation:
    """A shipped ablation by name, or a TOML file."""
    path = name_or_file if os.path.isfile(name_or_file) else os.path.join(SHIPPED, f"{name_or_file}.toml")
    if not os.path.isfile(path):
        shipped = sorted(f[:-5] for f in os.listdir(SHIPPED) if f.endswith(".toml"))
        raise UserError(f"--ablation {name_or_file}: no such file, and no shipped ablation of that name (shipped: "
                        f"{', '.join(shipped)}); write one as a TOML file (utils/sweep/ablation.py says how)")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UserError("reading an ablation file needs Python 3.11+ (tomllib) or `pip install tomli`") from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    return parse_ablation(data, os.path.relpath(path))


def step_presets(ab: Ablation, overrides: dict[str, Any], smoke_it: bool) -> list[Preset]:
    """Each step's preset: the base preset, the base_set changes, the step's changes, the command line's overrides
    (``--smoke`` last)."""
    presets = []
    for step in ab.steps:
        try:
            preset = with_overrides(PRESETS[ab.base](), {**dict(ab.base_set), **dict(step.applied), **overrides})
        except UserError as e:
            raise UserError(f"{ab.source}, step {step.label!r}: {e}") from None
        preset = dataclasses.replace(preset, name=f"{ab.name}/{step.slug}")
        presets.append(smoke(preset) if smoke_it else preset)
    return presets


def _finished(run: str) -> bool:
    return os.path.isfile(os.path.join(run, "summary.json")) and os.path.isfile(os.path.join(run, "config.json"))


def _runs(preset: Preset, out: str) -> Iterator[tuple[str, Row, Replicate, str]]:
    """(run name, row, replicate, run folder) of every run of a preset in ``out``."""
    for row in preset.rows():
        for rep in preset.replicates():
            name = preset.run_name(row, rep)
            yield name, row, rep, os.path.join(out, "runs", name)


def reuse_across_steps(presets: list[tuple[Preset, str]], elsewhere: tuple[str, ...] = ()) -> int:
    """Copy into each step's folder the finished runs another step (or a results folder ``elsewhere``, e.g. the base
    preset's own) already made with the same configuration (all but the results folder); returns how many."""
    done: dict[str, list[str]] = {}
    for preset, out in [*presets, *((presets[0][0], e) for e in elsewhere)]:
        for name, _, _, run in _runs(preset, out):
            if _finished(run):
                done.setdefault(name, []).append(run)
    copied = 0
    for preset, out in presets:
        for name, row, rep, run in _runs(preset, out):
            if _finished(run):
                continue
            wanted = preset.run_config(row, rep, out).to_dict()
            for source in done.get(name, []):
                saved = read_json(os.path.join(source, "config.json"))
                if not config_diff(saved.get("config", {}), wanted, ignore=("run.out",)):
                    copy_run(source, run, saved, wanted)
                    done[name].append(run)
                    copied += 1
                    break
    return copied


def copy_run(source: str, run: str, saved: dict, wanted: dict) -> None:
    """A finished run copied to another folder (whole or not at all), its configuration's results folder set to the
    new one."""
    saved = copy.deepcopy(saved)
    saved["config"]["run"]["out"] = wanted["run"]["out"]
    saved["out"], saved["copied_from"] = wanted["run"]["out"], source
    copy_folder(source, run, lambda tmp: write_json(os.path.join(tmp, "config.json"), saved))


def run_ablation(ab: Ablation, out: str, overrides: dict[str, Any], smoke_it: bool, fresh: bool,
                 ray: RayOptions | None = None) -> tuple[list[tuple[Step, Preset, str]], list[dict]]:
    """Every step in turn (in <out>/<step slug>): the finished runs of identical configuration that an earlier
    step made are copied, the rest run or reused as the presets do; per step (step, preset, folder) and
    {row label: {replicate: summary}}."""
    steps = [(step, preset, os.path.join(out, step.slug))
             for step, preset in zip(ab.steps, step_presets(ab, overrides, smoke_it))]
    groups, copied = [], 0
    own = os.path.join("results", PRESETS[ab.base]().name + ("_smoke" if smoke_it else ""))  # the base's own runs
    for i, (_, preset, folder) in enumerate(steps):
        with FolderLock(ensure_dir(folder)):
            copied += reuse_across_steps([(p, f) for _, p, f in steps[:i + 1]], (own,))
        groups += run_presets([(preset, folder)], fresh, ray)
    if copied:
        print(f"ablation {ab.name}: {copied} finished run(s) of identical configuration copied across steps")
    return steps, groups
