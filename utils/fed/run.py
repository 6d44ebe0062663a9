"""A federated run (SPEC "Federated learning"): ``run_federated(config) -> summary`` writes config.json,
rounds.jsonl (one line per round) and summary.json in a locked results folder, as an online run writes its files:
atomically, refusing to overwrite finished results, keeping the finished rounds on Ctrl-C. The rounds run in this
process, or on Flower (--flower, ``utils.fed.flower``)."""
from __future__ import annotations

import os
import time

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


def run_config(ctx: FedContext, out: str) -> dict:
    """config.json: the configuration, what the run drew and loaded, and the environment."""
    return {"config": ctx.cfg.to_dict(), "out": out, "checkpoint": ctx.checkpoint, "model": ctx.spec.to_dict(),
            "device": str(ctx.device), "threshold": ctx.threshold, "malicious": ctx.malicious,
            "shard_sizes": [len(s) for s in ctx.shards.clients], "root_indices": ctx.shards.root.tolist(),
            "val_indices": ctx.val_indices.tolist(), "environment": environment(ctx.device)}


def run_rounds(ctx: FedContext, out: str) -> dict:
    """Every round, in this process or on Flower."""
    server = Server(ctx.cfg, ctx.model, ctx.root)
    if ctx.cfg.flower.enabled:
        from utils.fed.flower import run_on_flower  # flwr is optional: imported only when asked for

        return run_on_flower(ctx, server, out)
    return FederatedRun(ctx, server, in_process_exchange(server, InProcessClients(ctx)), out).run()


def report_line(cfg: FedConfig, s: dict, out: str) -> str:
    return (f"[{cfg.server.aggregator}{', flower' if cfg.flower.enabled else ''}] start err {s['err_start']:.4f} | "
            f"after {s['rounds']} rounds ({s['stop_reason']}) {s['err_before_trigger']:.4f} | after trigger "
            f"{s['err_after_trigger']:.4f} | delta {s['delta']:+.4f} | {s['total_seconds']:.1f} s | results in {out}")


def run_federated(cfg: FedConfig, data: Data | None = None) -> dict:
    """Run one federated experiment as configured; returns the summary (``data``: the dataset, already loaded on
    the run's device by a sweep)."""
    refuse_existing(cfg.run.out, RESULTS, cfg.run.overwrite)  # before the data are loaded: fail fast
    if cfg.flower.enabled:
        from utils.fed.flower import require_flower

        require_flower()
    ctx = build_context(cfg, data)
    out = cfg.run.out or default_out(cfg, ctx)
    return run_in_folder(out, RESULTS, cfg.run.overwrite, run_config(ctx, out), lambda: run_rounds(ctx, out),
                         lambda summary: report_line(cfg, summary, out), cfg.run.log_name, "rounds.jsonl")
