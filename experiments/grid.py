"""Where does the accumulative attack work? A grid over stream x ε x online lr (ST), with both controls.

For each cell and seed it runs, with standard training (ST):
  trigger  -- the poisoned trigger alone (--epochs 0)
  clean    -- a clean stream, then the trigger (--no_poison)
  poison   -- accumulative poisons, then the trigger
and writes <out>/<table>.md and <table>.csv. Finished runs of the same configuration are reused, so an
interrupted grid continues where it stopped.

  python experiments/grid.py --resume checkpoints/fashion-mnist_cnn --model_name epoch10.pth
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
from typing import Sequence

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

from utils.errors import run_cli  # noqa: E402
from utils.io.results import write_json, write_text  # noqa: E402
from utils.online.config import OnlineConfig, authors_config  # noqa: E402
from utils.sweep.on_ray import add_ray_flags, ray_options  # noqa: E402
from utils.sweep.runs import run_sweep  # noqa: E402

CONDITIONS = ("trigger", "clean", "poison")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", required=True, help="burn-in checkpoint folder")
    p.add_argument("--model_name", required=True)
    p.add_argument("--streams", nargs="+", default=["distinct", "reuse"], choices=["distinct", "reuse"])
    p.add_argument("--eps", nargs="+", type=float, default=[0.2, 0.1, 0.05, 0.03])
    p.add_argument("--lr", nargs="+", type=float, default=[0.1, 0.03, 0.01])
    p.add_argument("--seeds", nargs="+", type=int, default=[20])
    p.add_argument("--epochs", type=int, default=50, help="stream length (accumulative batches)")
    p.add_argument("--threshold_delta", type=float, default=0.08)
    p.add_argument("--eval_subset", type=int, default=2000)
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: torch's default); results depend on it")
    p.add_argument("--dataroot", default="data")
    p.add_argument("--out", default="results/grid")
    p.add_argument("--no_run", action="store_true", help="only tabulate: cells with missing runs are left out")
    p.add_argument("--table", default="table", help="base name of the table files written in --out")
    p.add_argument("--fresh", action="store_true", help="replace finished runs of another configuration")
    p.add_argument("--debug", action="store_true")
    add_ray_flags(p)
    return p.parse_args(argv)


def cell_config(args: argparse.Namespace, stream: str, eps: float, lr: float, cond: str, seed: int) -> OnlineConfig:
    """The authors' base with this cell's stream, ε, lr, control and seed; the trigger alone ignores the stream."""
    cell = f"eps{eps:g}_lr{lr:g}" if cond == "trigger" else f"{stream}_eps{eps:g}_lr{lr:g}"
    return authors_config(
        run={"resume": args.resume, "model_name": args.model_name, "seed": seed, "device": args.device, "threads": args.threads,
             "dataroot": args.dataroot, "out": os.path.join(args.out, "runs", cell, f"{cond}_s{seed}")},
        stream={"steps": 0 if cond == "trigger" else args.epochs, "reuse_first_batch": stream == "reuse"},
        learner={"lr": lr}, attack={"epsilon": eps, "poison": cond != "clean"},
        eval={"threshold": None, "threshold_delta": args.threshold_delta, "eval_subset": args.eval_subset})


def fmt(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def cell_row(stream: str, eps: float, lr: float, res: dict[str, list[dict]]) -> dict:
    """One table row from a cell's summaries (errors in %, alignment at the start > at the end)."""
    row = {"stream": stream, "eps": eps, "lr": lr, "seeds": len(next(iter(res.values())))}
    row["burn_in_err"] = fmt([r["err_burn_in"] for r in next(iter(res.values()))])
    for c, rs in res.items():
        row[f"{c}_end_err"] = fmt([r["err_before_trigger"] for r in rs])
        row[f"{c}_after_trigger_err"] = fmt([r["err_after_trigger"] for r in rs])
        row[f"{c}_trigger_drop"] = fmt([r["delta"] for r in rs])
        if c != "trigger":
            row[f"{c}_steps"] = "/".join(str(r["steps"]) for r in rs)
            row[f"{c}_align_start_end"] = "/".join(f"{r['alignment_start']:.2f}>{r['alignment_end']:.2f}"
                                                   for r in rs if r.get("alignment_start") is not None)
    return row


def write_tables(rows: list[dict], out: str, name: str) -> None:
    keys = list(rows[0])
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["Errors in % (mean ± std over seeds). *_trigger_drop = error after the trigger step minus error "
             "before it.", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    write_text(os.path.join(out, f"{name}.md"), "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys)
                                                                   + " |" for r in rows]) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cells = {(stream, eps, lr): {c: [cell_config(args, stream, eps, lr, c, s) for s in args.seeds]
                                 for c in args.conditions}
             for stream, eps, lr in itertools.product(args.streams, args.eps, args.lr)}  # every flag checked here
    ray = ray_options(args)
    write_json(os.path.join(args.out, f"{args.table}_config.json"), vars(args))
    if args.no_run:  # only the cells whose runs have all finished
        cells = {k: v for k, v in cells.items() if all(os.path.isfile(os.path.join(cfg.run.out, "summary.json"))
                                                       for cs in v.values() for cfg in cs)}
    flat = [cfg for cfgs in cells.values() for cs in cfgs.values() for cfg in cs]
    summaries = iter(run_sweep([], [(cfg, -1) for cfg in flat], args.fresh, ray))
    rows = [cell_row(*key, {c: [next(summaries) for _ in cs] for c, cs in cfgs.items()}) for key, cfgs in cells.items()]
    if rows:
        write_tables(rows, args.out, args.table)
        print(f"table: {os.path.join(args.out, args.table + '.md')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
