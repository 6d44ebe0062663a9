"""Running many runs: reuse finished ones (only when their configuration is the one asked for), resume an
interrupted burn-in, run what is missing. Used by reproduce.py and experiments/grid.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

from utils.burnin import SAME_ON_RESUME, BurnInConfig, run_burn_in
from utils.checkpoint import load_checkpoint
from utils.config import OnlineConfig, check_number, replace
from utils.errors import UserError
from utils.online import run_online
from utils.results import read_json
from utils.train import set_threads

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


def _absolute(value: Any) -> Any:
    """A path (or list of paths) made absolute from this process's folder; anything else unchanged."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return os.path.abspath(value) if isinstance(value, str) else value


def resolved(flat: dict[str, Any]) -> dict[str, Any]:
    """The path fields made absolute: a relative and an absolute path to the same file are the same
    configuration (Ray tasks get absolute paths)."""
    return {k: _absolute(v) if k in PATHS else v for k, v in flat.items()}


def config_diff(saved: dict, wanted: dict) -> list[str]:
    """The fields where two configurations differ, as 'name: saved -> wanted' (ignoring IGNORED)."""
    a, b = resolved(flatten(saved)), resolved(flatten(wanted))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in IGNORED and a.get(k) != b.get(k)]


def finished_summary(cfg: OnlineConfig, fresh: bool) -> dict | None:
    """The summary of a finished run of exactly this configuration in cfg.run.out; None when there is none.

    A finished run of another configuration is refused (``fresh``: it will be replaced)."""
    out = cfg.run.out
    if out is None or not os.path.isfile(os.path.join(out, "summary.json")):
        return None
    saved = read_json(os.path.join(out, "config.json")).get("config", {}) if os.path.isfile(
        os.path.join(out, "config.json")) else {}
    diff = config_diff(saved, cfg.to_dict())
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
    args = load_checkpoint(path).get("args", {})
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
    return replace(cfg, run={k: _absolute(getattr(run, k)) for k in ("resume", "dataroot", "out", "memorized_model")},
                   measure={"md_curve": tuple(_absolute(list(cfg.measure.md_curve)))})


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


def run_sweep(burn_ins: list[tuple[BurnInConfig, list[int]]], runs: list[tuple[OnlineConfig, int]], fresh: bool,
              ray: RayOptions | None = None) -> list[dict]:
    """Every burn-in (the epochs it must have saved), then every run (with the index of the burn-in it needs, -1
    for none); their summaries in the order of ``runs``. In this process, or as Ray tasks."""
    if ray is not None:
        return run_on_ray(burn_ins, runs, fresh, ray)
    for cfg, epochs in burn_ins:
        ensure_burn_in(cfg, epochs, fresh)
    return [ensure_online(cfg, fresh) for cfg, _ in runs]


def start_ray(options: RayOptions) -> Any:
    """The ray module, connected to the cluster (or a new local instance) with this repository importable."""
    try:
        import ray
    except ImportError as e:
        raise UserError("--ray needs Ray: pip install -r requirements-ray.txt into the project's .venv") from e
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
