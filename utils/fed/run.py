"""A federated run (SPEC "Federated learning"): ``run_federated(config) -> summary`` writes config.json,
rounds.jsonl (one line per round) and summary.json in a locked results folder, as an online run writes its files:
atomically, refusing to overwrite finished results, keeping the finished rounds on Ctrl-C. The rounds run in this
process, or on Flower: its simulation engine (--flower, ``utils.fed.flower``), or its deployment runtime, where this
process submits the run to a SuperLink (--flower_superlink, ``utils.fed.deploy``) whose ServerApp calls
``run_federated`` with its Grid."""
from __future__ import annotations

import os
import time
from typing import Any

from utils.core.data import Data
from utils.core.train import environment
from utils.errors import UserError
from utils.fed.config import FedConfig
from utils.fed.context import FedContext, build_context
from utils.fed.rounds import FederatedRun, InProcessClients, in_process_exchange
from utils.fed.server import Server
from utils.io.results import refuse_existing, run_in_folder

RESULTS = ("rounds.jsonl", "summary.json")  # a run's files besides config.json


def default_out(cfg: FedConfig, ctx: FedContext) -> str:
    """A new results folder name: ASCII, no spaces, unique per process."""
    return os.path.join("runs", f"fed_{ctx.spec.dataset}_{ctx.spec.arch}_{cfg.server.aggregator}_s{cfg.run.seed}_"
                                f"{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}")


def runtime(cfg: FedConfig, grid: Any) -> str:
    """Where the rounds run (config.json's "runtime")."""
    return "flower deployment" if grid is not None else "flower simulation" if cfg.flower.enabled else "in-process"


def run_config(ctx: FedContext, out: str, grid: Any = None) -> dict:
    """config.json: the configuration, what the run drew and loaded, where it ran, and the environment."""
    return {"config": ctx.cfg.to_dict(), "runtime": runtime(ctx.cfg, grid), "out": out, "checkpoint": ctx.checkpoint,
            "model": ctx.spec.to_dict(), "device": str(ctx.device), "threshold": ctx.threshold,
            "malicious": ctx.malicious, "shard_sizes": [len(s) for s in ctx.shards.clients],
            "root_indices": ctx.shards.root.tolist(), "val_indices": ctx.val_indices.tolist(),
            "environment": environment(ctx.device)}


def run_rounds(ctx: FedContext, out: str, grid: Any = None) -> dict:
    """Every round, in this process or on Flower (``grid``: a deployed ServerApp's, whose SuperNodes are the
    clients)."""
    server = Server(ctx.cfg, ctx.model, ctx.root)
    if grid is not None or ctx.cfg.flower.enabled:
        from utils.fed.flower import flower_rounds, run_on_flower  # flwr is optional: imported only when asked for

        return flower_rounds(ctx, server, out, grid, deployed=True) if grid is not None else run_on_flower(
            ctx, server, out)
    return FederatedRun(ctx, server, in_process_exchange(server, InProcessClients(ctx)), out).run()


def report_line(cfg: FedConfig, s: dict, out: str) -> str:
    flower = ", flower" if cfg.flower.enabled or cfg.flower.superlink else ""
    return (f"[{cfg.server.aggregator}{flower}] start err {s['err_start']:.4f} | "
            f"after {s['rounds']} rounds ({s['stop_reason']}) {s['err_before_trigger']:.4f} | after trigger "
            f"{s['err_after_trigger']:.4f} | delta {s['delta']:+.4f} | {s['total_seconds']:.1f} s | results in {out}")


def run_federated(cfg: FedConfig, data: Data | None = None, grid: Any = None) -> dict:
    """Run one federated experiment as configured; returns the summary (``data``: the dataset, already loaded on
    the run's device by a sweep; ``grid``: a deployed ServerApp's Flower Grid)."""
    refuse_existing(cfg.run.out, RESULTS, cfg.run.overwrite)  # before the data are loaded: fail fast
    submit = cfg.flower.superlink is not None and grid is None  # this process submits it to a SuperLink
    if cfg.flower.enabled or submit:
        from utils.fed.flower import require_flower

        require_flower(simulation=cfg.flower.enabled)
    if submit:
        from utils.fed.deploy import check_superlink

        check_superlink(cfg.flower)
    ctx = build_context(cfg, data)
    out = cfg.run.out or default_out(cfg, ctx)
    if submit:
        from utils.fed.deploy import run_deployed

        summary = run_deployed(ctx, out)
        print(report_line(cfg, summary, out))
        return summary
    return run_in_folder(out, RESULTS, cfg.run.overwrite, run_config(ctx, out, grid),
                         lambda: run_rounds(ctx, out, grid), lambda summary: report_line(cfg, summary, out),
                         cfg.run.log_name, "rounds.jsonl")
