"""Running many runs (reproduce.py, experiments/grid.py): every burn-in, then every online run, reusing what is
finished; in this process, or as Ray tasks."""
from __future__ import annotations

from utils.burnin.config import BurnInConfig
from utils.online.config import OnlineConfig
from utils.sweep.on_ray import RayOptions, run_on_ray
from utils.sweep.reuse import ensure_burn_in, ensure_online


def run_sweep(burn_ins: list[tuple[BurnInConfig, list[int]]], runs: list[tuple[OnlineConfig, int]], fresh: bool,
              ray: RayOptions | None = None) -> list[dict]:
    """Every burn-in (the epochs it must have saved), then every run (with the index of the burn-in it needs, -1
    for none); their summaries in the order of ``runs``. In this process, or as Ray tasks."""
    if ray is not None:
        return run_on_ray(burn_ins, runs, fresh, ray)
    for cfg, epochs in burn_ins:
        ensure_burn_in(cfg, epochs, fresh)
    return [ensure_online(cfg, fresh) for cfg, _ in runs]
