"""The online phase (SPEC "Phase 2", "The attack"): accumulative poisoning of a learner, then the trigger.

The authors' command lines run unchanged, e.g. (run_st.sh):
  python online_accu_train.py --batch_size 100 --epoch 100 --test_batch_size 500 --resume checkpoints_base_bn \
      --use_bn --model_name epoch40.pth --mode eval --onlinemode train --lr 1e-1 --momentum 0.9 --beta 1. \
      --only_reg --threshold 0.18 --use_advtrigger --med ST
Results: <--out>/config.json, steps.jsonl (one line per arriving batch), md.jsonl, summary.json, the log line.
This script is the flags; the run is ``utils.online.run_online(config)``.
"""
from __future__ import annotations

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

import argparse
from typing import Sequence

from utils.config import (ATConfig, AttackConfig, DSCConfig, EvalConfig, LearnerConfig, MeasureConfig,
                          OnlineConfig, RunConfig, StreamConfig, check_number)
from utils.data import DATASETS
from utils.defenses import DEFENDERS
from utils.detectors import DETECTORS
from utils.errors import UserError, run_cli
from utils.models import ARCHS
from utils.online import run_online

NO_EFFECT = "accepted for the authors' command lines; no effect"


def authors_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the authors' online_accu_train.py, with their defaults."""
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
    a.add_argument("--threshold", default=None, type=float, help="stop the accumulative phase once the "
                   "test error exceeds this (absolute; default 0.18 unless --threshold_delta is given)")
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


def project_flags(p: argparse.ArgumentParser) -> None:
    """This project's flags: assertions, files, controls, the stop rule's variant, evaluation."""
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
    n.add_argument("--eval_batch_size", default=1000, type=int, help="evaluation batch size (speed only)")
    n.add_argument("--no_alignment", action="store_true", help="do not log A(g_trigger, g_val) per batch")
    n.add_argument("--deterministic", action="store_true", help="deterministic kernels only (slower on CUDA; "
                   "see utils/train.py)")
    n.add_argument("--threads", default=0, type=int, help="torch's CPU threads (0: torch's default, the cores); "
                   "results on the CPU depend on it")
    n.add_argument("--debug", action="store_true", help="show Python tracebacks")


def defence_flags(p: argparse.ArgumentParser) -> None:
    """MD, the detectors, the adaptive attacker, DSC and AT."""
    m = p.add_argument_group("Memorization Discrepancy, detectors and DSC")
    m.add_argument("--memorized_model", default=None, help="memorized (earlier) checkpoint; default: "
                   "<--resume>/epoch20.pth. Needed by DSC; for ST/AT it only adds the MD measurements")
    m.add_argument("--no_md", action="store_true", help="do not measure MD")
    m.add_argument("--allow_other_run", action="store_true", help="accept a memorized model written by "
                   "another burn-in run than the online model (refused by default)")
    m.add_argument("--detectors", nargs="*", default=[], metavar="NAME",
                   help=f"also score every arriving batch with these detectors: {', '.join(DETECTORS)} "
                   "(or 'all'); results in detectors.jsonl and summary.json")
    m.add_argument("--detector_fit_samples", default=5000, type=int,
                   help="clean training samples the fitted detectors (kd, lid, mahalanobis) use")
    m.add_argument("--md_curve", nargs="*", default=[], metavar="CKPT",
                   help="also score MD with each of these checkpoints (same burn-in run) as the memorized model: "
                   "MD's AUROC as a function of the memorized model's epoch, in summary.json")
    m.add_argument("--adaptive_md", default=0.0, type=float, metavar="LAMBDA",
                   help="an attacker who knows MD: add -LAMBDA * mean MD(x') to the poisons' objective "
                   "(white box: the memorized model is known to it)")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flags in (authors_flags, project_flags, defence_flags):
        flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> OnlineConfig:
    """The typed configuration from the parsed flags: the one place flags become settings (validated there)."""
    check_number("--beta", args.beta)  # no effect, but a number all the same
    check_number("--workers", args.workers, 0, integer=True)
    if args.group_norm is not None:
        check_number("--group_norm", args.group_norm, 0, 4096, integer=True)
    chosen = [o for o in ("reg", "normal", "second") if getattr(args, f"only_{o}")]
    if len(chosen) > 1:
        raise UserError("give at most one of --only_reg, --only_normal, --only_second")
    threshold = 0.18 if args.threshold is None and args.threshold_delta is None else args.threshold
    detectors = tuple(DETECTORS) if args.detectors == ["all"] else tuple(args.detectors)
    return OnlineConfig(
        run=RunConfig(resume=args.resume, model_name=args.model_name, memorized_model=args.memorized_model,
                      allow_other_run=args.allow_other_run, dataroot=args.dataroot, download=not args.no_download,
                      device=args.device, out=args.out, overwrite=args.overwrite, seed=args.seed,
                      deterministic=args.deterministic, threads=args.threads, log_name=args.log_name, dataset=args.dataset,
                      arch=args.arch, norm="bn" if args.use_bn else ("gn" if args.group_norm else None)),
        stream=StreamConfig(batch_size=args.batch_size, steps=args.epochs, shuffle=args.shuffle,
                            reuse_first_batch=args.reuse_first_batch, augment=not args.no_stream_augment),
        learner=LearnerConfig(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                              mode=args.onlinemode, clip_gradnorm=args.clip_gradnorm, clipvalue=args.clipvalue),
        attack=AttackConfig(poison=not args.no_poison, epsilon=args.epsilon, num_steps=args.num_steps,
                            gamma=args.gamma, objective=chosen[0] if chosen else "reg", round_sign=args.roundsign,
                            poison_scale=args.poison_scale, use_advtrigger=args.use_advtrigger,
                            online_advtrigger=args.use_online_advtrigger, craft_mode=args.mode,
                            val_size=args.test_batch_size, adaptive_md=args.adaptive_md),
        eval=EvalConfig(threshold=threshold, threshold_delta=args.threshold_delta, eval_subset=args.eval_subset,
                        eval_batch_size=args.eval_batch_size, niter=args.niter),
        defence=args.med,
        at=ATConfig(epsilon=args.at_epsilon, step_size=args.at_step, steps=args.at_steps,
                    descent_kl=args.at_descent_kl),
        dsc=DSCConfig(tau0=args.dsc_tau0, kappa=args.dsc_kappa, epsilon=args.dsc_epsilon, step_size=args.dsc_step,
                      max_steps=args.dsc_max_steps, calibrate=args.dsc_calibrate,
                      calibrate_batches=args.dsc_calibrate_batches),
        measure=MeasureConfig(md=not args.no_md, alignment=not args.no_alignment, detectors=detectors,
                              detector_fit_samples=args.detector_fit_samples, md_curve=tuple(args.md_curve)))


def parse_config(argv: Sequence[str] | None = None) -> OnlineConfig:
    """Flags -> a validated OnlineConfig."""
    return config_from_args(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    run_online(parse_config(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
