"""One command reproduces the table: burn-in (if missing), then ST / AT / DSC under attack, with controls.

  python reproduce.py                    # the cpu preset: real Fashion-MNIST, small CNN, 3 seeds, < 10 min on 2 cores
  python reproduce.py --preset paper     # CIFAR-10, ResNet-18, the papers' constants (a GPU)

Writes results/<preset>/: preset.json, table.md, table.csv, accuracy.png, md_over_stream.png, md_histogram.png,
and one folder per run under runs/ (config.json, steps.jsonl, md.jsonl, summary.json). Finished runs and
burn-in checkpoints are reused, so an interrupted reproduction continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import online_accu_train
import train_cifar
from utils.errors import UserError, run_cli
from utils.report import make_plots, table_rows, write_table
from utils.results import ensure_dir, write_json

# Settings shared by every online run: the authors' run_*.sh commands.
AUTHORS = ["--batch_size", "100", "--test_batch_size", "500", "--mode", "eval", "--onlinemode", "train",
           "--momentum", "0.9", "--only_reg", "--use_advtrigger"]

PRESETS: dict[str, dict] = {
    # Real Fashion-MNIST, the small CNN; burn-in 10 epochs (memorized model: epoch 5). See README for why
    # ε, lr, stream length and threshold differ from the paper's (the grid in experiments/grid.py).
    # The stream is the authors' (every batch = the first batch, re-augmented): only there did the grid show
    # the attack's effect at this scale.
    "cpu": dict(dataset="fashion-mnist", arch="cnn", width=0, burnin_epochs=10, save_freq=5, online_epoch=10,
                memorized_epoch=5, epochs=30, lr=0.1, epsilon=0.05, threshold=None, threshold_delta=0.08,
                eval_subset=2000, seeds=[20, 21, 22], device="cpu", dsc_calibrate=0.9, ckpt=None, stream="reuse"),
    # The papers: CIFAR-10, ResNet-18, 40 burn-in epochs (memorized: epoch 20), 100 batches, ε 0.2, lr 0.1.
    "paper": dict(dataset="cifar10", arch="resnet18", width=0, burnin_epochs=40, save_freq=10, online_epoch=40,
                  memorized_epoch=20, epochs=100, lr=0.1, epsilon=0.2, threshold=0.18, threshold_delta=None,
                  eval_subset=0, seeds=[20, 21, 22], device=None, dsc_calibrate=0.0, ckpt=None, stream="distinct"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--out", default=None, help="results folder (default results/<preset>)")
    p.add_argument("--dataroot", default="data")
    p.add_argument("--fresh", action="store_true", help="discard finished runs whose preset differs")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    o = p.add_argument_group("overrides of the preset's values")
    for key in ("dataset", "arch", "device", "ckpt"):
        o.add_argument(f"--{key}", default=None)
    o.add_argument("--stream", default=None, choices=["distinct", "reuse"],
                   help="distinct batches (SPEC default) or the authors' reuse of the first batch")
    for key in ("width", "burnin_epochs", "save_freq", "online_epoch", "memorized_epoch", "epochs", "eval_subset"):
        o.add_argument(f"--{key}", default=None, type=int)
    for key in ("lr", "epsilon", "threshold", "threshold_delta", "dsc_calibrate"):
        o.add_argument(f"--{key}", default=None, type=float)
    o.add_argument("--seeds", nargs="+", type=int, default=None)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """The preset with the command line's overrides; the checkpoint folder defaults to checkpoints/<dataset>_<arch>."""
    cfg = dict(PRESETS[args.preset])
    for key in cfg:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.threshold_delta is not None:
        cfg["threshold"] = None
    if args.threshold is not None:
        cfg["threshold_delta"] = None
    width = f"_w{cfg['width']}" if cfg["width"] else ""
    cfg["ckpt"] = cfg["ckpt"] or os.path.join("checkpoints", f"{cfg['dataset']}_{cfg['arch']}{width}")
    if cfg["memorized_epoch"] % cfg["save_freq"] or cfg["online_epoch"] % cfg["save_freq"]:
        raise UserError("--online_epoch and --memorized_epoch must be multiples of --save_freq")
    return cfg


def burn_in(cfg: dict, dataroot: str) -> None:
    """Train the burn-in model unless its checkpoints exist (an interrupted burn-in is resumed)."""
    need = [os.path.join(cfg["ckpt"], f"epoch{e}.pth") for e in (cfg["online_epoch"], cfg["memorized_epoch"])]
    if all(os.path.isfile(p) for p in need):
        print(f"burn-in: reusing {', '.join(need)}")
        return
    argv = ["--dataset", cfg["dataset"], "--arch", cfg["arch"], "--width", str(cfg["width"]),
            "--epochs", str(cfg["burnin_epochs"]), "--save_freq", str(cfg["save_freq"]), "--outf", cfg["ckpt"],
            "--dataroot", dataroot]
    if cfg["device"]:
        argv += ["--device", cfg["device"]]
    if os.path.isfile(os.path.join(cfg["ckpt"], "last.pth")):
        argv.append("--resume")
    train_cifar.main(argv)


def run_specs(cfg: dict) -> list[tuple[str, list[str]]]:
    """(label, extra flags) of every online run of one seed: ST with its two controls, AT, DSC (and calibrated)."""
    specs = [("ST (trigger alone)", ["--med", "ST", "--epochs", "0"]),
             ("ST (clean stream + trigger)", ["--med", "ST", "--no_poison"]),
             ("ST", ["--med", "ST"]),
             ("AT", ["--med", "AT"]),
             ("DSC", ["--med", "DSC"])]
    if cfg["dsc_calibrate"]:
        specs.append(("DSC (calibrated τ)", ["--med", "DSC", "--dsc_calibrate", str(cfg["dsc_calibrate"])]))
    return specs


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").replace("__", "_")


def online_run(cfg: dict, dataroot: str, folder: str, seed: int, extra: list[str]) -> dict:
    """One online run (reused if its summary.json exists)."""
    if not os.path.isfile(os.path.join(folder, "summary.json")):
        argv = [*AUTHORS, "--resume", cfg["ckpt"], "--model_name", f"epoch{cfg['online_epoch']}.pth",
                "--memorized_model", os.path.join(cfg["ckpt"], f"epoch{cfg['memorized_epoch']}.pth"),
                "--dataroot", dataroot, "--lr", str(cfg["lr"]), "--epsilon", str(cfg["epsilon"]),
                "--epochs", str(cfg["epochs"]), "--seed", str(seed), "--eval_subset", str(cfg["eval_subset"]),
                "--out", folder, "--overwrite"]
        argv += (["--threshold", str(cfg["threshold"])] if cfg["threshold"] is not None
                 else ["--threshold_delta", str(cfg["threshold_delta"])])
        if cfg["device"]:
            argv += ["--device", cfg["device"]]
        if cfg["stream"] == "reuse":
            argv.append("--reuse_first_batch")
        online_accu_train.main(argv + extra)  # a later "--epochs" in extra wins
    return json.load(open(os.path.join(folder, "summary.json")))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve(args)
    out = ensure_dir(args.out or os.path.join("results", args.preset))
    preset_path = os.path.join(out, "preset.json")
    if os.path.isfile(preset_path) and json.load(open(preset_path)) != cfg and not args.fresh:
        raise UserError(f"{out!r} holds runs of another configuration ({preset_path}); pass --fresh to "
                        f"replace them or choose another --out")
    if args.fresh and os.path.isdir(os.path.join(out, "runs")):
        import shutil

        shutil.rmtree(os.path.join(out, "runs"))
    write_json(preset_path, cfg)
    started = time.time()
    burn_in(cfg, args.dataroot)
    groups: dict[str, list[dict]] = {}
    first_runs: dict[str, str] = {}
    for seed in cfg["seeds"]:
        for label, extra in run_specs(cfg):
            folder = os.path.join(out, "runs", f"{slug(label)}_s{seed}")
            groups.setdefault(label, []).append(online_run(cfg, args.dataroot, folder, seed, extra))
            first_runs.setdefault(label, folder)
    title = (f"{args.preset} preset: {cfg['dataset']}, {cfg['arch']}, {cfg['stream']} stream, ε {cfg['epsilon']}, "
             f"online lr {cfg['lr']}, "
             f"{cfg['epochs']} batches, seeds {cfg['seeds']} ({time.strftime('%Y-%m-%d')})")
    text = write_table(table_rows(groups), out, title)
    plots = make_plots({k: first_runs[k] for k in ("ST", "AT", "DSC") if k in first_runs}, out)
    print("\n" + text)
    print(f"table: {os.path.join(out, 'table.md')} (and table.csv); plots: {', '.join(plots) or 'none'}")
    print(f"reproduction took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
