"""How the cpu preset's numbers depend on the CPU's kernels (docs/REPRODUCIBILITY.md, step 1 of issue 20).

This machine imitates others: ATen's vector kernels (ATEN_CPU_CAPABILITY), oneDNN's convolutions
(ONEDNN_MAX_CPU_ISA), MKL's matrix products (MKL_CBWR / MKL_ENABLE_INSTRUCTIONS) and the thread count. For each
setting, in a fresh process: the cpu preset's first burn-in (seed 0) with the native kernels, its per-epoch test
error and weights' hash; and, from one common burn-in (the first setting's), the ST run of seed 20, its per-step
test error and alignment. The table says where each setting first differs from the first one. The same with the
portable kernels shows the pin: every setting then gives the first one's floats.

  .venv/bin/python scripts/kernel_sensitivity.py --out results/sensitivity     # about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

from utils.core.train import PORTABLE_KERNELS
from utils.report.check import burn_in_fingerprint, first_step_difference, run_fingerprint
from utils.report.tables import write_table
from utils.sweep.presets import cpu_preset

SETTINGS = {  # name -> environment (on top of one without any kernel variable) and threads
    "this CPU (AVX-512), 2 threads": ({}, 2),
    "1 thread": ({}, 1),
    "ATen AVX2": ({"ATEN_CPU_CAPABILITY": "avx2"}, 2),
    "ATen default (no vector ISA)": ({"ATEN_CPU_CAPABILITY": "default"}, 2),
    "oneDNN AVX2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 2),
    "MKL CNR AVX2": ({"MKL_CBWR": "AVX2"}, 2),
    "an AVX2 CPU (ATen, oneDNN, MKL at AVX2)": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 2),
}


def worker(args: argparse.Namespace) -> None:
    """In this (fresh) process: the burn-in, or the ST run of seed 20 from ``args.ckpt``."""
    from utils.burnin.run import run_burn_in
    from utils.online.config import replace
    from utils.online.run import run_online

    preset = cpu_preset()
    if args.worker == "burnin":
        run_burn_in(dataclasses.replace(preset.burn_in_for(0), outf=args.target, kernels=args.kernels,
                                        threads=args.threads, overwrite=True))
        return
    row = next(r for r in preset.rows() if r.slug == "ST")
    cfg = preset.run_config(row, (0, 20), "unused")
    run_online(replace(cfg, run={"resume": args.ckpt, "memorized_model": os.path.join(args.ckpt, "epoch2.pth"),
                                 "out": args.target, "overwrite": True, "kernels": args.kernels,
                                 "threads": args.threads}))


def spawn(kind: str, target: str, env_extra: dict, threads: int, kernels: str, ckpt: str = "") -> None:
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS and k != "MKL_ENABLE_INSTRUCTIONS"}
    env.update(env_extra)
    argv = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--target", target, "--threads", str(threads),
            "--kernels", kernels, "--ckpt", ckpt]
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)


def measure(out: str, kernels: str, names: list[str]) -> list[dict]:
    """Each named setting's burn-in and ST run, and where each first differs from the first setting's."""
    rows, ref = [], None
    for name in names:
        env, threads = SETTINGS[name]
        folder = os.path.join(out, kernels, f"s{list(SETTINGS).index(name)}")  # a finished one is reused
        if not os.path.isfile(os.path.join(folder, "ST_s20", "summary.json")):
            spawn("burnin", os.path.join(folder, "burnin"), env, threads, kernels)
            common = os.path.join(out, kernels, "s0", "burnin")
            spawn("online", os.path.join(folder, "ST_s20"), env, threads, kernels, ckpt=common)
        burn = burn_in_fingerprint(os.path.join(folder, "burnin"), list(range(1, cpu_preset().burn_in.epochs + 1)))
        run = run_fingerprint(os.path.join(folder, "ST_s20"))
        ref = ref or (burn, run)
        first_epoch = next((a["epoch"] for a, b in zip(burn, ref[0]) if a["sha256"] != b["sha256"]), None)
        online = first_step_difference(run["steps"], ref[1]["steps"], ("here", "in the first row"))
        summary = run["summary"]
        rows.append({"setting": name, "kernels": kernels, "errs": " / ".join(f"{e['test_err']:.4f}" for e in burn),
                     "burn_in_first": "identical" if first_epoch is None else f"epoch {first_epoch}",
                     "online_first": online or "identical", "steps": summary["steps"],
                     "drop": f"{100 * (summary['err_after_trigger'] - summary['err_before_trigger']):.2f}"})
        print(rows[-1], flush=True)
    return rows


COLUMNS = {"setting": "kernel setting", "kernels": "--cpu_kernels", "errs": "burn-in test error, epochs 1-5",
           "burn_in_first": "burn-in: first epoch whose weights differ", "online_first":
           "ST seed 20 from one common burn-in: first difference", "steps": "steps before the stop",
           "drop": "trigger's drop (pts)"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/sensitivity")
    p.add_argument("--kernels", nargs="+", default=["native", "portable"], choices=["native", "portable"])
    p.add_argument("--settings", nargs="+", type=int, default=None, metavar="I",
                   help="the settings to run, by their index in SETTINGS (default: all; the first is the reference)")
    p.add_argument("--worker", choices=["burnin", "online"], help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.kernels = args.kernels[0]
        worker(args)
        return 0
    chosen = args.settings or range(len(SETTINGS))
    if not chosen or chosen[0] != 0 or not all(0 <= i < len(SETTINGS) for i in chosen):
        p.error(f"--settings: indices in 0..{len(SETTINGS) - 1}, the reference 0 first")
    names = [list(SETTINGS)[i] for i in chosen]
    rows = [r for kernels in args.kernels for r in measure(args.out, kernels, names)]
    print(write_table(rows, COLUMNS, args.out, "sensitivity", "Where the cpu preset first differs under other CPU "
                      "kernels (this machine imitating others; each row a fresh process)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
