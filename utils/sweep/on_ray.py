"""Sweeps as Ray tasks (reproduce.py / experiments/grid.py --ray): a task per missing burn-in and per unfinished
run, on a local Ray instance or a cluster; finished runs are reused as in the sequential path."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from utils.burnin.config import BurnInConfig
from utils.core.train import set_threads
from utils.errors import UserError
from utils.fields import check_number
from utils.online.config import OnlineConfig, replace
from utils.sweep.reuse import absolute_path, ensure_burn_in, ensure_online, finished_summary


@dataclass(frozen=True)
class RayOptions:
    """Where and how runs become Ray tasks (reproduce.py / experiments/grid.py --ray)."""

    address: str | None = None  # None: a local Ray instance; else an existing cluster ("auto", "host:6379")
    task_gpus: float | None = None  # per task; None: 1 when the cluster has GPUs, else 0
    task_cpus: float = 1.0  # per task (also the task's torch threads, unless the configuration pins them)
    local_cpus: int | None = None  # the size of a local instance (None: the machine's)

    def __post_init__(self) -> None:
        check_number("--ray_task_cpus", self.task_cpus, 0, 1024, low_open=True)
        if self.task_gpus is not None:
            check_number("--ray_task_gpus", self.task_gpus, 0, 64)
        if self.local_cpus is not None:
            check_number("--ray_local_cpus", self.local_cpus, 1, 4096, integer=True)


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    """The --ray flags of the drivers."""
    g = p.add_argument_group("running on Ray (pip install -r requirements-ray.txt)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run every missing burn-in and online run as a Ray task: on a local Ray instance, or on the "
                   "cluster at ADDRESS (e.g. auto, or host:6379 of `ray start --head`)")
    g.add_argument("--ray_task_gpus", type=float, default=None, help="GPUs per task (default: 1 when the "
                   "cluster has GPUs, else 0; a fraction shares a GPU)")
    g.add_argument("--ray_task_cpus", type=float, default=1.0, help="CPUs per task (and its torch threads); "
                   "a configuration that pins --threads N (the cpu presets) reserves max(this, N) and uses N threads")
    g.add_argument("--ray_local_cpus", type=int, default=None, help="CPUs of a local Ray instance")


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    if args.ray is None:
        return None
    return RayOptions(None if args.ray == "local" else args.ray, args.ray_task_gpus, args.ray_task_cpus,
                      args.ray_local_cpus)


def absolute(cfg: OnlineConfig) -> OnlineConfig:
    """The configuration with its paths absolute, so a Ray worker (another working folder) finds them."""
    run = cfg.run
    return replace(cfg, run={k: absolute_path(getattr(run, k)) for k in ("resume", "dataroot", "out", "memorized_model")},
                   measure={"md_curve": tuple(absolute_path(list(cfg.measure.md_curve)))})


def task_threads(options: RayOptions, pinned: int) -> tuple[float, int]:
    """A task's CPUs to reserve and its torch threads: the configuration's pinned thread count (results on the
    CPU depend on it), reserved as at least as many CPUs; else --ray_task_cpus for both."""
    return max(options.task_cpus, pinned), pinned or max(1, int(options.task_cpus))


def _burn_in_task(cfg: BurnInConfig, epochs: list[int], fresh: bool, threads: int) -> str:
    set_threads(threads)
    ensure_burn_in(cfg, epochs, fresh)
    return cfg.outf


def _online_task(cfg: OnlineConfig, fresh: bool, threads: int, *burn_in_done: str) -> dict:
    set_threads(threads)
    return ensure_online(cfg, fresh)


def start_ray(options: RayOptions) -> Any:
    """The ray module, connected to the cluster (or a new local instance) with this repository importable."""
    try:
        import ray
    except ImportError as e:
        raise UserError("--ray needs Ray: pip install -r requirements-ray.txt into the project's .venv") from e
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # utils/<pkg>/<file>
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    ray.init(address=options.address, num_cpus=options.local_cpus if options.address is None else None,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False, ignore_reinit_error=True,
             logging_level=logging.WARNING)
    return ray


def run_on_ray(burn_ins: list[tuple[BurnInConfig, list[int]]], runs: list[tuple[OnlineConfig, int]], fresh: bool,
               options: RayOptions) -> list[dict]:
    """The sweep as Ray tasks: a task per missing burn-in, a task per unfinished run (after its burn-in), each
    retried once; finished runs are reused here; failures are reported together, never dropped."""
    ray = start_ray(options)
    gpus = options.task_gpus if options.task_gpus is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
    opts = dict(num_gpus=gpus, max_retries=1, retry_exceptions=True)
    done = [finished_summary(absolute(cfg), fresh) for cfg, _ in runs]
    needed = {i for (_, i), d in zip(runs, done) if d is None}
    burn = {}
    for i, (b, epochs) in enumerate(burn_ins):
        if i in needed:
            cpus, threads = task_threads(options, b.threads)
            b = dataclasses.replace(b, outf=os.path.abspath(b.outf), dataroot=os.path.abspath(b.dataroot))
            burn[i] = ray.remote(_burn_in_task).options(num_cpus=cpus, **opts).remote(b, epochs, fresh, threads)
    refs = []
    for (cfg, i), d in zip(runs, done):
        cpus, threads = task_threads(options, cfg.run.threads)
        refs.append(None if d is not None else ray.remote(_online_task).options(num_cpus=cpus, **opts).remote(
            absolute(cfg), fresh, threads, burn.get(i)))
    results, failures = [], []
    for (cfg, _), d, ref in zip(runs, done, refs):
        try:
            results.append(d if ref is None else ray.get(ref))
        except ray.exceptions.RayError as e:
            failures.append(f"{cfg.run.out}: {getattr(e, 'cause', None) or e}")
    if failures:
        raise UserError(f"{len(failures)} of {len(runs)} runs failed on Ray (each tried twice); the others' results "
                        f"are kept, and the same command runs the failed ones again: " + " | ".join(failures[:3]))
    return results
