"""Burn-in (SPEC "Phase 1"): train a model on clean data, checkpoint every ``save_freq`` epochs; resumable.

``run_burn_in(BurnInConfig(...))`` is what ``train_cifar.py`` and ``reproduce.py`` call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import time
import uuid
from dataclasses import dataclass

import torch

from utils.core.checkpoint import check_spec, load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.core.data import BatchLoader, Split, get_data, train_loader
from utils.core.distributed import Dist, agree, broadcast, setup, teardown, unwrap, wrap
from utils.errors import UserError
from utils.burnin.config import SAME_ON_RESUME, BurnInConfig, checkpoint_args
from utils.core.models import build_model, use_memory_format
from utils.io.results import FolderLock, append_jsonl, append_line, ensure_dir, read_jsonl, write_json, write_jsonl
from utils.core.train import (environment, evaluate, get_device, set_deterministic, set_seed, set_threads, train_epoch,
                              use_cpu_kernels)

RUN_FILES = ("last.pth", "history.jsonl", "log.txt", "config.json")  # besides epoch{N}.pth


def lr_at(epoch: int, base_lr: float) -> float:
    """The authors' schedule: the initial LR divided by 10 every 50 epochs."""
    return base_lr * (0.1 ** (epoch // 50))


def last_checkpoint(folder: str) -> str:
    """last.pth of a run folder, else its highest epoch{N}.pth; a UserError when there is none."""
    if os.path.isfile(os.path.join(folder, "last.pth")):
        return os.path.join(folder, "last.pth")
    found = sorted(glob.glob(os.path.join(glob.escape(folder), "epoch*.pth")),
                   key=lambda f: int(re.findall(r"epoch(\d+)\.pth$", f)[0]) if re.search(r"epoch\d+\.pth$", f) else -1)
    if not found:
        raise UserError(f"--resume: no checkpoint (last.pth or epoch*.pth) in {folder!r}; start without --resume")
    return found[-1]


def existing_run_files(folder: str, checkpoints_only: bool = False) -> list[str]:
    """The files of an earlier burn-in in ``folder``: its checkpoints (and its history, log and config)."""
    names = {os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(folder), "epoch*.pth"))}
    names |= {"last.pth"} if checkpoints_only else set(RUN_FILES)
    return sorted(n for n in names if os.path.exists(os.path.join(folder, n)))


def refuse_mixing(cfg: BurnInConfig) -> None:
    """A new run never writes into a folder holding another run's checkpoints, unless --overwrite removes them
    (the log and history of a run that wrote no checkpoint are simply replaced)."""
    found = existing_run_files(cfg.outf, checkpoints_only=True) if os.path.isdir(cfg.outf) else []
    if found and cfg.resume is None and not cfg.overwrite:
        raise UserError(f"--outf {cfg.outf!r} already holds a burn-in ({', '.join(found[:4])}"
                        f"{' ...' if len(found) > 4 else ''}); continue it with --resume, replace it with "
                        f"--overwrite, or choose another --outf")


def log(outf: str, line: str, dist: Dist | None = None) -> None:
    """A line on stdout and in <outf>/log.txt (rank 0 only under torchrun)."""
    if dist is not None and not dist.main:
        return
    print(line, flush=True)
    append_line(os.path.join(outf, "log.txt"), line)


@dataclass
class TrainState:
    """What a burn-in carries from epoch to epoch (and through a checkpoint, to a resumed run)."""

    model: torch.nn.Module  # what is trained: the model, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start: int
    run_id: str
    resumed_from: str | None = None


def resume_state(cfg: BurnInConfig, state: TrainState) -> None:
    """Load the last checkpoint of the run to continue into ``state`` (same flags required)."""
    path = last_checkpoint(cfg.resume or cfg.outf)
    ckpt = load_checkpoint(path)
    resumed, rspec = model_from_checkpoint(ckpt, path)
    spec = cfg.spec()
    check_spec(rspec, path, arch=spec.arch, dataset=spec.dataset, norm=spec.norm, width=spec.width)
    if ckpt.get("optimizer") is None or ckpt.get("rng") is None:
        raise UserError(f"{path!r} has no optimizer/RNG state and cannot be resumed from")
    for key in SAME_ON_RESUME:
        before = checkpoint_args(ckpt).get(key)
        if before is not None and before != getattr(cfg, key):
            raise UserError(f"--resume: the run in {path!r} used --{key} {before}, this command gives "
                            f"{getattr(cfg, key)}; resume with the same flags (or start a new --outf)")
    state.model.load_state_dict(resumed.state_dict())
    state.optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.generator.set_state(ckpt["rng"]["loader"])
    state.start, state.run_id = ckpt["epoch"] + 1, ckpt.get("run_id") or state.run_id
    state.resumed_from = f"resumed from {path} (epoch {ckpt['epoch']}, test error {ckpt['err_cls']:.4f})"


def new_state(cfg: BurnInConfig, dist: Dist) -> TrainState:
    """Model, optimizer and loader generator of a fresh run, seeded; a resumed run loads into them; under
    torchrun the model is then wrapped for DistributedDataParallel (every rank starts from the same state)."""
    set_seed(cfg.seed)
    model = build_model(cfg.spec()).to(dist.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(cfg.seed), 1, uuid.uuid4().hex)
    if cfg.resume is not None:
        resume_state(cfg, state)
    state.run_id = broadcast(state.run_id, dist)  # a new run's id, drawn by rank 0
    state.model = wrap(model, dist)
    return state


def prepare_folder(cfg: BurnInConfig, state: TrainState, dist: Dist) -> None:
    """Under the folder's lock: remove a replaced run, trim the history of a resumed one, write config.json."""
    if cfg.resume is None:  # a new run: nothing of an earlier one stays (refuse_mixing allowed it)
        for name in existing_run_files(cfg.outf):
            os.remove(os.path.join(cfg.outf, name))
    if state.resumed_from is not None:
        path = os.path.join(cfg.outf, "history.jsonl")  # epochs after the checkpoint (Ctrl-C between the two)
        if os.path.isfile(path):
            write_jsonl(path, [h for h in read_jsonl(path) if h["epoch"] < state.start])
        log(cfg.outf, state.resumed_from)
    write_json(os.path.join(cfg.outf, "config.json"), {"config": dataclasses.asdict(cfg), "run_id": state.run_id,
                                                       "model": cfg.spec().to_dict(), "device": str(dist.device),
                                                       "ranks": dist.world, "environment": environment(dist.device)})


def end_of_epoch(cfg: BurnInConfig, state: TrainState, epoch: int, figures: dict) -> None:
    """Rank 0: the epoch's log line, its history line, its checkpoints (last.pth every epoch)."""
    log(cfg.outf, f"epoch {epoch:3d}  loss {figures['loss']:.4f}  train acc {figures['train_acc']:.4f}  "
                  f"test err {figures['test_err']:.4f}  ({figures['seconds']:.1f} s)")
    append_jsonl(os.path.join(cfg.outf, "history.jsonl"), {"epoch": epoch, **figures})
    rng = {"torch": torch.get_rng_state(), "loader": state.generator.get_state()}
    save = dict(spec=cfg.spec(), epoch=epoch, err_cls=figures["test_err"], args=dataclasses.asdict(cfg),
                run_id=state.run_id, optimizer=state.optimizer, rng=rng)
    model = unwrap(state.model)
    if epoch % cfg.save_freq == 0:
        save_checkpoint(os.path.join(cfg.outf, f"epoch{epoch}.pth"), model, **save)
    save_checkpoint(os.path.join(cfg.outf, "last.pth"), model, **save)


def train_epochs(cfg: BurnInConfig, state: TrainState, loader: BatchLoader, test: Split, dist: Dist) -> None:
    """Epochs state.start .. cfg.epochs: train, evaluate (both summed over ranks), then rank 0 logs and saves."""
    for epoch in range(state.start, cfg.epochs + 1):
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg.lr)
        t0 = time.time()
        loss, acc = train_epoch(state.model, loader, state.optimizer, desc=f"epoch {epoch}/{cfg.epochs}",
                                clip_gradnorm=cfg.clipvalue if cfg.clip_gradnorm else None, dist=dist)
        err = evaluate(unwrap(state.model), test, cfg.test_batch_size, dist)
        if dist.main:
            end_of_epoch(cfg, state, epoch, {"loss": loss, "train_acc": acc, "test_err": err,
                                             "seconds": time.time() - t0})


def load_training_data(cfg: BurnInConfig, dist: Dist, generator: torch.Generator) -> tuple[BatchLoader, Split]:
    """The burn-in's loader (the first --subset samples when asked) and the test split, on this rank's device."""
    data = get_data(cfg.dataset, cfg.dataroot, dist.device, download=cfg.download)
    if cfg.subset:
        data = dataclasses.replace(data, train=Split(data.train.x[:cfg.subset], data.train.y[:cfg.subset]))
    return train_loader(data, cfg.batch_size, generator), data.test  # the loader checks the batch size


def run_burn_in(cfg: BurnInConfig) -> str:
    """Train (or continue) a burn-in run, in one process or as one rank of a torchrun job; returns its run id."""
    set_threads(cfg.threads)
    use_cpu_kernels(cfg.kernels)
    use_memory_format(cfg.memory_format)
    dist = setup(get_device(cfg.device))
    state = loader = None
    try:
        if cfg.deterministic:
            set_deterministic(dist.device)
        refuse_mixing(cfg)
        state = new_state(cfg, dist)
        loader, test = load_training_data(cfg, dist, state.generator)
        with contextlib.ExitStack() as stack:  # rank 0 takes the folder's lock and writes; the others wait for it
            ok = False
            try:
                if dist.main:  # only once flags, data and checkpoint are good
                    stack.enter_context(FolderLock(ensure_dir(cfg.outf, "--outf"), "--outf"))
                    refuse_mixing(cfg)
                    prepare_folder(cfg, state, dist)
                    params = sum(p.numel() for p in unwrap(state.model).parameters())
                    log(cfg.outf, f"burn-in: {dataclasses.asdict(cfg)} on {dist.device} x {dist.world}, run "
                                  f"{state.run_id}, {params} parameters")
                ok = True
            finally:
                agree(ok, dist, "to prepare --outf")
            train_epochs(cfg, state, loader, test, dist)
        agree(True, dist, "the burn-in")  # every rank done (rank 0 has written its last checkpoint) before any leaves
        run_id = state.run_id
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (utils.errors.Terminated): the same type
        raise type(e)(f"the checkpoints of finished epochs are kept in {cfg.outf!r}; continue with the same "
                      f"command plus --resume") from None
    finally:
        state = loader = None  # the DDP model goes before its process group (gloo's threads must not outlive it)
        teardown(dist)
    return run_id
