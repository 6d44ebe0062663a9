"""The online phase (SPEC "Phase 2", "The attack"): accumulative poisoning of a learner, then the trigger.

The authors' command lines run unchanged, e.g. (run_st.sh):
  python online_accu_train.py --batch_size 100 --epoch 100 --test_batch_size 500 --resume checkpoints_base_bn \
      --use_bn --model_name epoch40.pth --mode eval --onlinemode train --lr 1e-1 --momentum 0.9 --beta 1. \
      --only_reg --threshold 0.18 --use_advtrigger --med ST
Results: <--out>/config.json, steps.jsonl (one line per arriving batch) and summary.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Sequence

import numpy as np
import torch

from utils.checkpoint import check_spec, load_checkpoint, model_from_checkpoint
from utils.data import DATASETS, get_data
from utils.defenses import DEFENDERS, Learner, get_defender
from utils.errors import UserError, run_cli
from utils.models import ARCHS
from utils.online import OnlineConfig, Stream, calibrate_dsc, run_online_phase
from utils.results import ensure_dir, write_json
from utils.train import get_device, set_deterministic, set_seed

NO_EFFECT = "accepted for the authors' command lines; no effect"
RESULTS = ("steps.jsonl", "md.jsonl", "summary.json")  # what a run writes besides config.json and the log


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("the authors' flags")
    a.add_argument("--batch_size", default=100, type=int, help="arriving batch size")
    a.add_argument("--epochs", "--epoch", dest="epochs", default=1, type=int,
                   help="length of the accumulative phase in batches (0: the trigger alone)")
    a.add_argument("--test_batch_size", default=500, type=int,
                   help="size of the attacker's validation batch (first batch of a seeded shuffled test set)")
    a.add_argument("--log_name", default="log.txt", help="name of the text log inside --out")
    a.add_argument("--resume", default="checkpoints_base_bn", help="burn-in checkpoint folder")
    a.add_argument("--model_name", default="epoch40.pth", help="online model's checkpoint in --resume")
    a.add_argument("--use_bn", action="store_true",
                   help="assert the checkpoint uses BatchNorm (the checkpoint decides the norm either way)")
    a.add_argument("--group_norm", default=None, type=int,
                   help="assert the checkpoint uses GroupNorm (the checkpoint decides the norm either way)")
    a.add_argument("--mode", default="eval", choices=["eval", "train"], help="model mode while crafting")
    a.add_argument("--onlinemode", default="train", choices=["eval", "train"], help="model mode while learning")
    a.add_argument("--lr", default=0.01, type=float, help="online SGD learning rate")
    a.add_argument("--momentum", default=0.0, type=float)
    a.add_argument("--weight_decay", default=0.0, type=float)
    a.add_argument("--beta", default=1.0, type=float, help=NO_EFFECT + " (unused in the authors' code too)")
    a.add_argument("--gamma", default=1.0, type=float, help="weight γ of the clean-gradient term")
    a.add_argument("--only_reg", action="store_true", help="objective γ·nrm(g_t) + nrm(s) (the default)")
    a.add_argument("--only_normal", action="store_true", help="objective γ·nrm(g_t) alone")
    a.add_argument("--only_second", action="store_true", help="objective nrm(s) alone")
    a.add_argument("--threshold", default=0.18, type=float, help="stop the accumulative phase once the "
                   "test error exceeds this (absolute)")
    a.add_argument("--use_advtrigger", action="store_true", help="craft the poisoned trigger (else the "
                   "trigger is the clean batch)")
    a.add_argument("--use_online_advtrigger", action="store_true",
                   help="re-craft the trigger after every step (from the clean trigger batch)")
    a.add_argument("--poison_scale", default=1.0, type=float, help="fraction of each batch poisoned")
    a.add_argument("--epsilon", default=0.2, type=float, help="L∞ budget in [0, 1] pixel units")
    a.add_argument("--num-steps", "--num_steps", dest="num_steps", default=2, type=int,
                   help="signed steps per crafted batch (step size 2ε/K)")
    a.add_argument("--niter", default=1, type=int, help="SGD steps on the trigger batch")
    a.add_argument("--seed", default=20, type=int)
    a.add_argument("--shuffle", action="store_true", help="draw the stream from a seeded shuffle of the "
                   "training set (default: dataset order, as the authors)")
    a.add_argument("--clip_gradnorm", action="store_true", help="clip each online gradient's inf-norm "
                   "to --clipvalue (as the authors)")
    a.add_argument("--clipvalue", default=0.01, type=float)
    a.add_argument("--roundsign", action="store_true", help="treat gradient components below 5e-4 as 0 "
                   "in the signed steps")
    a.add_argument("--med", default="ST", help=f"defence: {', '.join(DEFENDERS)} (OURS = DSC)")
    a.add_argument("--dataroot", default="data", help="dataset folder (torchvision layout)")
    a.add_argument("--workers", default=0, type=int, help=NO_EFFECT)
    a.add_argument("--distance", default="linf", choices=["linf"], help="threat model (only linf)")
    n = p.add_argument_group("this project's flags")
    n.add_argument("--dataset", default=None, help=f"assert the dataset ({', '.join(DATASETS)}); default: "
                   "the checkpoint's")
    n.add_argument("--arch", default=None, help=f"assert the arch ({', '.join(ARCHS)}); default: the checkpoint's")
    n.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    n.add_argument("--no_download", action="store_true", help="never download datasets")
    n.add_argument("--out", default=None, help="results folder (default: runs/<dataset>_<arch>_<med>_s<seed>_<time>)")
    n.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    n.add_argument("--reuse_first_batch", action="store_true",
                   help="the authors' stream: every arriving batch and the trigger are the first batch, re-augmented")
    n.add_argument("--no_stream_augment", action="store_true",
                   help="stream batches unaugmented (default: training augmentation, as the authors)")
    n.add_argument("--no_poison", action="store_true", help="control: the accumulative phase sees clean batches")
    n.add_argument("--threshold_delta", default=None, type=float,
                   help="stop once the test error exceeds the burn-in error + this (replaces --threshold)")
    n.add_argument("--eval_subset", default=0, type=int, help="evaluate a fixed subset of this many test "
                   "samples during the phase (0: full set; before/after the trigger always use the full set)")
    n.add_argument("--no_alignment", action="store_true", help="do not log A(g_trigger, g_val) per batch")
    n.add_argument("--deterministic", action="store_true", help="deterministic kernels only (slower on CUDA; "
                   "see utils/train.py)")
    n.add_argument("--debug", action="store_true", help="show Python tracebacks")
    m = p.add_argument_group("Memorization Discrepancy and DSC")
    m.add_argument("--memorized_model", default=None, help="memorized (earlier) checkpoint; default: "
                   "<--resume>/epoch20.pth. Needed by DSC; for ST/AT it only adds the MD measurements")
    m.add_argument("--no_md", action="store_true", help="do not measure MD (ST/AT)")
    m.add_argument("--dsc_tau0", default=0.5, type=float, help="τ0 of τ_t = τ0 + κ·t")
    m.add_argument("--dsc_kappa", default=0.02, type=float, help="κ of τ_t = τ0 + κ·t")
    m.add_argument("--dsc_calibrate", default=0.0, type=float, metavar="Q",
                   help="our extension: τ0 := the Q-quantile (0<Q<1) of the mean MD of clean held-out test "
                   "batches at the start, κ scaled by the same factor (0: off, the paper's constants)")
    m.add_argument("--dsc_calibrate_batches", default=20, type=int)
    m.add_argument("--dsc_epsilon", default=0.2, type=float, help="DSC correction radius")
    m.add_argument("--dsc_step", default=0.02, type=float, help="DSC step size")
    m.add_argument("--dsc_max_steps", default=10, type=int)
    t = p.add_argument_group("adversarial training (AT)")
    t.add_argument("--at_epsilon", default=0.2, type=float, help="PGD radius")
    t.add_argument("--at_step", default=0.02, type=float, help="PGD step size")
    t.add_argument("--at_steps", default=10, type=int, help="PGD steps (no random start)")
    t.add_argument("--at_descent_kl", action="store_true", help="the authors' AT: steps that descend "
                   "CE + KL instead of ascending CE")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    chosen = [o for o in ("reg", "normal", "second") if getattr(args, f"only_{o}")]
    if len(chosen) > 1:
        raise UserError("give at most one of --only_reg, --only_normal, --only_second")
    args.objective = chosen[0] if chosen else "reg"
    if not 0.0 <= args.epsilon <= 1.0:
        raise UserError(f"--epsilon must lie in [0, 1] (pixel units), got {args.epsilon}")
    for name in ("dsc_epsilon", "at_epsilon"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name} must lie in [0, 1] (pixel units), got {getattr(args, name)}")
    if not 0.0 <= args.dsc_calibrate < 1.0:
        raise UserError(f"--dsc_calibrate must lie in [0, 1) (0: off), got {args.dsc_calibrate}")
    if not 0.0 <= args.poison_scale <= 1.0:
        raise UserError(f"--poison_scale must lie in [0, 1], got {args.poison_scale}")
    for name in ("epochs", "num_steps", "niter", "eval_subset", "dsc_max_steps", "at_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-') if name == 'num_steps' else name} must be >= 0, "
                            f"got {getattr(args, name)}")
    for name in ("batch_size", "test_batch_size", "dsc_calibrate_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.dataset is not None and args.dataset not in DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; known datasets: {', '.join(DATASETS)}")
    if args.arch is not None and args.arch not in ARCHS:
        raise UserError(f"unknown arch {args.arch!r}; known archs: {', '.join(ARCHS)}")
    args.med, _ = get_defender(args.med)
    return args


def environment(device: torch.device) -> dict:
    """Library versions, machine and the settings that decide bitwise reproducibility, for config.json."""
    import torchvision  # imported here: it is slow to import, and loading the data has imported it already

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled()}


def load_memorized(args: argparse.Namespace, spec) -> tuple[torch.nn.Module | None, str]:
    """The memorized model (SPEC "Memorization Discrepancy"); None with a printed note when ST/AT lack it."""
    path = args.memorized_model or os.path.join(args.resume, "epoch20.pth")
    if args.no_md and args.med != "DSC":
        return None, path
    if not os.path.isfile(path) and args.med != "DSC" and args.memorized_model is None:
        print(f"note: no memorized model at {path!r}: MD is not measured (pass --memorized_model to measure it)")
        return None, path
    ckpt = load_checkpoint(path)
    memorized, mspec = model_from_checkpoint(ckpt, path)
    for key in ("arch", "dataset", "num_classes", "in_channels", "norm", "width"):
        if getattr(mspec, key) != getattr(spec, key):
            raise UserError(f"the memorized model {path!r} has {key}={getattr(mspec, key)!r} but the online model "
                            f"has {key}={getattr(spec, key)!r}; pass --memorized_model from the same burn-in run")
    memorized.eval()
    return memorized, path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = get_device(args.device)
    if args.deterministic:
        set_deterministic(device)
    path = os.path.join(args.resume, args.model_name)
    ckpt = load_checkpoint(path)
    model, spec = model_from_checkpoint(ckpt, path)
    check_spec(spec, path, dataset=args.dataset, arch=args.arch,
               norm="bn" if args.use_bn else ("gn" if args.group_norm else None))
    memorized, memorized_path = load_memorized(args, spec)
    out = args.out or os.path.join("runs", f"{spec.dataset}_{spec.arch}_{args.med}_s{args.seed}_"
                                           f"{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.overwrite and any(os.path.exists(os.path.join(out, f)) for f in RESULTS):
        raise UserError(f"{out!r} already holds results; pass --overwrite or choose another --out")
    set_seed(args.seed)
    data = get_data(spec.dataset, args.dataroot, device, download=not args.no_download)
    if args.test_batch_size > len(data.test):
        raise UserError(f"--test_batch_size {args.test_batch_size} is larger than the test set ({len(data.test)})")
    model.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    val_idx = torch.randperm(len(data.test), generator=generator)[:args.test_batch_size]
    x_val, y_val = data.test.batch(val_idx)
    stream = Stream(data.train, args.batch_size, shuffle=args.shuffle, reuse_first=args.reuse_first_batch,
                    augment=None if args.no_stream_augment else data.info, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    _, defender = get_defender(args.med)
    if memorized is not None:
        memorized.to(device)
    learner = Learner(model, optimizer, args.onlinemode, args.clipvalue if args.clip_gradnorm else None)
    learner.extras["memorized"] = memorized
    learner.extras["at"] = {"epsilon": args.at_epsilon, "step_size": args.at_step, "steps": args.at_steps,
                            "descend_with_kl": args.at_descent_kl}
    dsc = {"tau0": args.dsc_tau0, "kappa": args.dsc_kappa, "epsilon": args.dsc_epsilon,
           "step_size": args.dsc_step, "max_steps": args.dsc_max_steps, "calibrated": False}
    if args.dsc_calibrate and memorized is not None:
        cal = calibrate_dsc(model, memorized, data.test, args.batch_size, args.dsc_calibrate,
                            args.dsc_calibrate_batches, torch.Generator().manual_seed(args.seed + 2))
        scale = cal["tau0"] / args.dsc_tau0
        dsc.update(tau0=cal["tau0"], kappa=args.dsc_kappa * scale, calibrated=True,
                   clean_batch_md=cal["clean_batch_md"])
        print(f"DSC calibrated: tau0 {dsc['tau0']:.4f}, kappa {dsc['kappa']:.5f} "
              f"(quantile {args.dsc_calibrate} of {args.dsc_calibrate_batches} clean batches)")
    learner.extras["dsc"] = dsc
    err_ckpt = ckpt.get("err_cls")
    threshold = args.threshold if args.threshold_delta is None else err_ckpt + args.threshold_delta
    cfg = OnlineConfig(steps=args.epochs, threshold=threshold, craft_mode=args.mode, epsilon=args.epsilon,
                       num_steps=args.num_steps, gamma=args.gamma, objective=args.objective,
                       round_sign=args.roundsign, poison_scale=args.poison_scale,
                       use_advtrigger=args.use_advtrigger, use_online_advtrigger=args.use_online_advtrigger,
                       no_poison=args.no_poison, niter=args.niter, eval_subset=args.eval_subset,
                       log_alignment=not args.no_alignment)
    config = {"args": vars(args), "online": vars(cfg), "checkpoint": path, "model": spec.to_dict(),
              "checkpoint_epoch": ckpt.get("epoch"),
              "memorized_model": memorized_path if memorized is not None else None, "dsc": dsc, "checkpoint_err": err_ckpt, "device": str(device),
              "val_indices": val_idx.tolist(), "trigger_indices": stream.indices(0).tolist(),
              "environment": environment(device)}
    ensure_dir(out)  # only once the flags, checkpoints and data are known to be good
    for f in RESULTS:
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    write_json(os.path.join(out, "config.json"), config)
    try:
        summary = run_online_phase(cfg, learner, defender, stream, data.test, x_val, y_val, out, generator)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the finished steps are kept in {os.path.join(out, 'steps.jsonl')!r}, no "
                                f"summary.json was written; run again with --overwrite") from None
    line = (f"[{args.med}] burn-in err {summary['err_burn_in']:.4f} | after {summary['steps']} steps "
            f"({summary['stop_reason']}) {summary['err_before_trigger']:.4f} | after trigger "
            f"{summary['err_after_trigger']:.4f} | delta {summary['delta']:+.4f} | {summary['total_seconds']:.1f} s"
            f" | results in {out}")
    print(line)
    with open(os.path.join(out, args.log_name), "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
