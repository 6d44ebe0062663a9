"""Where does the accumulative attack work? A grid over stream x ε x online lr (issue: attack + ST loop).

For each cell and seed it runs, with standard training (ST):
  trigger  -- the poisoned trigger alone (--epochs 0)
  clean    -- a clean stream, then the trigger (--no_poison)
  poison   -- accumulative poisons, then the trigger
and writes <out>/table.md and <out>/table.csv. Runs already finished (summary.json present) are reused,
so an interrupted grid continues where it stopped.

  python experiments/grid.py --resume checkpoints/fashion-mnist_cnn --model_name epoch10.pth
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import online_accu_train  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.results import read_jsonl, write_json  # noqa: E402

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
    p.add_argument("--out", default="results/grid")
    p.add_argument("--no_run", action="store_true", help="only tabulate: cells with missing runs are left out")
    p.add_argument("--table", default="table", help="base name of the table files written in --out")
    p.add_argument("--extra", default="", help="more flags for online_accu_train.py, one string")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def run_dir(out: str, stream: str, eps: float, lr: float, cond: str, seed: int) -> str:
    # the trigger-alone control does not depend on the stream
    cell = f"eps{eps:g}_lr{lr:g}" if cond == "trigger" else f"{stream}_eps{eps:g}_lr{lr:g}"
    return os.path.join(out, "runs", cell, f"{cond}_s{seed}")


def run_one(args: argparse.Namespace, stream: str, eps: float, lr: float, cond: str, seed: int) -> dict:
    folder = run_dir(args.out, stream, eps, lr, cond, seed)
    if not os.path.exists(os.path.join(folder, "summary.json")):
        argv = ["--resume", args.resume, "--model_name", args.model_name, "--batch_size", "100",
                "--test_batch_size", "500", "--mode", "eval", "--onlinemode", "train", "--lr", str(lr),
                "--momentum", "0.9", "--only_reg", "--use_advtrigger", "--med", "ST", "--epsilon", str(eps),
                "--epochs", "0" if cond == "trigger" else str(args.epochs), "--seed", str(seed),
                "--threshold_delta", str(args.threshold_delta), "--eval_subset", str(args.eval_subset),
                "--device", args.device, "--out", folder, "--overwrite", *args.extra.split()]
        if stream == "reuse":
            argv.append("--reuse_first_batch")
        if cond == "clean":
            argv.append("--no_poison")
        online_accu_train.main(argv)
    summary = json.load(open(os.path.join(folder, "summary.json")))
    steps_path = os.path.join(folder, "steps.jsonl")
    steps = read_jsonl(steps_path) if os.path.exists(steps_path) else []
    summary["craft_s_per_batch"] = statistics.fmean(s["craft_s"] for s in steps) if steps else None
    return summary


def fmt(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, f"{args.table}_config.json"), vars(args))
    rows = []
    for stream, eps, lr in itertools.product(args.streams, args.eps, args.lr):
        if args.no_run and not all(os.path.exists(os.path.join(run_dir(args.out, stream, eps, lr, c, s), "summary.json"))
                                   for c in args.conditions for s in args.seeds):
            continue
        res = {c: [run_one(args, stream, eps, lr, c, s) for s in args.seeds] for c in args.conditions}
        row = {"stream": stream, "eps": eps, "lr": lr, "seeds": len(args.seeds)}
        first = next(iter(res.values()))
        row["burn_in_err"] = fmt([r["err_burn_in"] for r in first])
        for c, rs in res.items():
            row[f"{c}_end_err"] = fmt([r["err_before_trigger"] for r in rs])
            row[f"{c}_after_trigger_err"] = fmt([r["err_after_trigger"] for r in rs])
            row[f"{c}_trigger_drop"] = fmt([r["delta"] for r in rs])
            if c != "trigger":
                row[f"{c}_steps"] = "/".join(str(r["steps"]) for r in rs)
                row[f"{c}_align_start_end"] = "/".join(
                    f"{r['alignment_start']:.2f}>{r['alignment_end']:.2f}" for r in rs
                    if r["alignment_start"] is not None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = list(rows[0])
    with open(os.path.join(args.out, f"{args.table}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, f"{args.table}.md"), "w") as f:
        f.write("Errors in % (mean ± std over seeds). *_trigger_drop = error after the trigger step minus "
                "error before it.\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[k]) for k in keys) + " |\n")
    print(f"table: {os.path.join(args.out, args.table + '.md')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
