"""Burn-in (SPEC phase 1): train a model on clean data, checkpoint every --save_freq epochs.

Paper scale:  python train_cifar.py                      (CIFAR-10, ResNet-18, 40 epochs)
CPU scale:    python train_cifar.py --dataset fashion-mnist --arch cnn --epochs 10 --save_freq 5
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import time
from typing import Sequence

import torch

from utils.checkpoint import check_spec, load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.data import DATASETS, dataset_info, get_data, train_loader
from utils.errors import UserError, run_cli
from utils.models import ARCHS, build_model, model_spec
from utils.results import append_jsonl, ensure_dir, read_jsonl, write_jsonl
from utils.train import evaluate, get_device, set_deterministic, set_seed, train_epoch


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--arch", default="resnet18", help=f"one of {', '.join(ARCHS)}")
    p.add_argument("--width", default=0, type=int, help="base width (0: the arch's default, resnet18 64, cnn 16)")
    p.add_argument("--group_norm", default=0, type=int,
                   help="0 (default): BatchNorm, as the authors' burn-in trains; N>0: GroupNorm with N groups")
    p.add_argument("--dataroot", default="data", help="dataset folder (torchvision layout)")
    p.add_argument("--no_download", action="store_true", help="never download; fail if files are missing")
    p.add_argument("--batch_size", default=256, type=int)
    p.add_argument("--test_batch_size", default=256, type=int, help="evaluation batch size (speed only)")
    p.add_argument("--workers", default=8, type=int, help="accepted for the authors' command lines; no effect "
                   "(data stays on the device, no worker processes)")
    p.add_argument("--epochs", default=40, type=int)
    p.add_argument("--start_epoch", default=1, type=int, help="accepted for the authors' command lines; no "
                   "effect (use --resume to continue a run)")
    p.add_argument("--save_freq", default=10, type=int, help="write epoch{N}.pth every N epochs")
    p.add_argument("--lr", default=0.1, type=float, help="initial LR; x0.1 every 50 epochs (the authors' schedule)")
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--weight_decay", default=1e-4, type=float)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue an interrupted run from the last checkpoint in DIR (default: --outf)")
    p.add_argument("--outf", default="checkpoints_base_bn", help="checkpoint and log folder")
    p.add_argument("--clip_gradnorm", action="store_true", help="clip the gradient's L2 norm to --clipvalue")
    p.add_argument("--clipvalue", default=1.0, type=float)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels only (slower on CUDA; "
                   "see utils/train.py)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = p.parse_args(argv)
    for name in ("epochs", "save_freq", "batch_size", "test_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    return args


def lr_at(epoch: int, base_lr: float) -> float:
    """The authors' schedule: the initial LR divided by 10 every 50 epochs."""
    return base_lr * (0.1 ** (epoch // 50))


def last_checkpoint(folder: str) -> str:
    """last.pth of a run folder, else its highest epoch{N}.pth; a UserError when there is none."""
    if os.path.isfile(os.path.join(folder, "last.pth")):
        return os.path.join(folder, "last.pth")
    found = sorted(glob.glob(os.path.join(folder, "epoch*.pth")),
                   key=lambda f: int(re.findall(r"epoch(\d+)\.pth$", f)[0]) if re.search(r"epoch\d+\.pth$", f) else -1)
    if not found:
        raise UserError(f"--resume: no checkpoint (last.pth or epoch*.pth) in {folder!r}; start without --resume")
    return found[-1]


def drop_history_after(outf: str, epoch: int) -> None:
    """On resume: forget the history lines of epochs after the checkpoint (Ctrl-C between line and checkpoint)."""
    path = os.path.join(outf, "history.jsonl")
    if os.path.isfile(path):
        write_jsonl(path, [h for h in read_jsonl(path) if h["epoch"] <= epoch])


def log(outf: str, line: str) -> None:
    print(line, flush=True)
    with open(os.path.join(outf, "log.txt"), "a") as f:
        f.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = get_device(args.device)
    if args.deterministic:
        set_deterministic(device)
    info = dataset_info(args.dataset)
    norm = "gn" if args.group_norm > 0 else "bn"
    spec = model_spec(args.arch, info, norm, args.group_norm or 32, args.width)
    set_seed(args.seed)
    model = build_model(spec).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    start, resumed_from = 1, None
    if args.resume is not None:
        path = last_checkpoint(args.resume or args.outf)
        ckpt = load_checkpoint(path)
        resumed, rspec = model_from_checkpoint(ckpt, path)
        check_spec(rspec, path, arch=spec.arch, dataset=spec.dataset, norm=spec.norm, width=spec.width)
        model.load_state_dict(resumed.state_dict())
        if ckpt.get("optimizer") is None or ckpt.get("rng") is None:
            raise UserError(f"{path!r} has no optimizer/RNG state and cannot be resumed from")
        for key in ("batch_size", "lr", "momentum", "weight_decay", "seed"):
            before = ckpt.get("args", {}).get(key)
            if before is not None and before != getattr(args, key):
                raise UserError(f"--resume: the run in {path!r} used --{key} {before}, this command gives "
                                f"{getattr(args, key)}; resume with the same flags (or start a new --outf)")
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        generator.set_state(ckpt["rng"]["loader"])
        start = ckpt["epoch"] + 1
        resumed_from = f"resumed from {path} (epoch {ckpt['epoch']}, test error {ckpt['err_cls']:.4f})"
    data = get_data(args.dataset, args.dataroot, device, download=not args.no_download)
    loader = train_loader(data, args.batch_size, generator)
    ensure_dir(args.outf)  # only once the flags, data and checkpoint are known to be good
    if resumed_from is not None:
        drop_history_after(args.outf, start - 1)
        log(args.outf, resumed_from)
    log(args.outf, f"burn-in: {vars(args)} on {device}, {sum(p.numel() for p in model.parameters())} parameters")
    plain_args = dict(vars(args))
    try:
        for epoch in range(start, args.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, args.lr)
            t0 = time.time()
            loss, acc = train_epoch(model, loader, optimizer, desc=f"epoch {epoch}/{args.epochs}",
                                    clip_gradnorm=args.clipvalue if args.clip_gradnorm else None)
            err = evaluate(model, data.test, args.test_batch_size)
            seconds = time.time() - t0
            log(args.outf, f"epoch {epoch:3d}  loss {loss:.4f}  train acc {acc:.4f}  test err {err:.4f}  "
                           f"({seconds:.1f} s)")
            append_jsonl(os.path.join(args.outf, "history.jsonl"),
                         {"epoch": epoch, "loss": loss, "train_acc": acc, "test_err": err, "seconds": seconds})
            rng = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
            save = dict(spec=spec, epoch=epoch, err_cls=err, args=plain_args, optimizer=optimizer, rng=rng)
            if epoch % args.save_freq == 0:
                save_checkpoint(os.path.join(args.outf, f"epoch{epoch}.pth"), model, **save)
            save_checkpoint(os.path.join(args.outf, "last.pth"), model, **save)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the checkpoints of finished epochs are kept in {args.outf!r}; continue with the "
                                f"same command plus --resume") from None
    return 0


if __name__ == "__main__":
    run_cli(main)
