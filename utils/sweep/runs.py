"""Running many runs (reproduce.py, experiments/grid.py): every burn-in, then every online run, reusing what is
finished; in this process, or as Ray tasks."""
from __future__ import annotations

import contextlib
import dataclasses
import os

from utils.burnin.config import BurnInConfig
from utils.io.results import FolderLock, ensure_dir, write_json
from utils.online.config import OnlineConfig
from utils.sweep.on_ray import RayOptions, run_on_ray
from utils.sweep.presets import Preset, Replicate
from utils.sweep.reuse import ensure_burn_in, ensure_online, refuse_other_burn_in


def run_sweep(burn_ins: list[tuple[BurnInConfig, list[int]]], runs: list[tuple[OnlineConfig, int]], fresh: bool,
              ray: RayOptions | None = None) -> list[dict]:
    """Every burn-in (the epochs it must have saved), then every run (with the index of the burn-in it needs, -1
    for none); their summaries in the order of ``runs``. In this process, or as Ray tasks."""
    if ray is not None:
        return run_on_ray(burn_ins, runs, fresh, ray)
    for cfg, epochs in burn_ins:
        ensure_burn_in(cfg, epochs, fresh)
    return [ensure_online(cfg, fresh) for cfg, _ in runs]


def run_presets(presets: list[tuple[Preset, str]], fresh: bool,
                ray: RayOptions | None) -> list[dict[str, dict[Replicate, dict]]]:
    """Every preset's burn-ins and runs, each preset into its results folder (locked while it runs); per preset
    {row label: {replicate: summary}}."""
    burn_ins, runs = [], []  # runs: (preset's index, row label, replicate, configuration, burn-in's index)
    for i, (preset, out) in enumerate(presets):
        first = len(burn_ins)
        for cfg in map(preset.burn_in_for, preset.burn_in_seeds):
            refuse_other_burn_in(cfg, fresh)  # before anything is written
            burn_ins.append((cfg, sorted({preset.online_epoch, preset.memorized_epoch})))
        runs += [(i, row.label, rep, preset.run_config(row, rep, out), first + preset.burn_in_seeds.index(rep[0]))
                 for rep in preset.replicates() for row in preset.rows()]
    with contextlib.ExitStack() as stack:
        for _, out in presets:
            stack.enter_context(FolderLock(ensure_dir(out)))
        summaries = run_sweep(burn_ins, [(cfg, b) for *_, cfg, b in runs], fresh, ray)
        for preset, out in presets:
            write_json(os.path.join(out, "preset.json"), dataclasses.asdict(preset))
    groups: list[dict[str, dict[Replicate, dict]]] = [{} for _ in presets]
    for (i, label, rep, _, _), summary in zip(runs, summaries):
        groups[i].setdefault(label, {})[rep] = summary
    return groups
