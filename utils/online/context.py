"""What the parts of an online run share (SPEC "Phase 2"), built once from an ``OnlineConfig``: the models,
the data, the attacker's validation batch, the stream, the learner. The attacker, the defender and the
measurements are built from it by ``utils.online.run`` (each given only what it reads).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from utils.core.checkpoint import check_spec, load_checkpoint, load_memorized_model, model_from_checkpoint
from utils.core.data import Data, Split, get_data
from utils.core.models import ModelSpec, use_memory_format
from utils.core.stream import Stream, poison_mask
from utils.core.train import Learner, get_device, set_deterministic, set_seed, set_threads, use_cpu_kernels
from utils.errors import UserError
from utils.online.config import OnlineConfig


@dataclass
class RunContext:
    """The parts of one online run, in the order their random draws happen (see ``build_context``)."""

    cfg: OnlineConfig
    device: torch.device
    model: nn.Module
    spec: ModelSpec
    checkpoint: dict[str, Any]  # the online checkpoint's path, epoch, test error, run id
    memorized: nn.Module | None
    memorized_path: str | None
    data: Data
    generator: torch.Generator  # the run's own draws: validation batch, stream, subset, trigger, mask
    val_indices: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    stream: Stream
    learner: Learner
    eval_split: Split  # what is evaluated after every step (the test set, or a fixed subset of it)
    x_trigger: torch.Tensor  # the trigger's clean base batch
    y_trigger: torch.Tensor
    mask: torch.Tensor  # the positions poisoned in every batch
    threshold: float  # the stop rule's absolute test error


def load_online_model(cfg: OnlineConfig) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """The online model from --resume/--model_name, checked against --dataset/--arch/--use_bn."""
    path = os.path.join(cfg.run.resume, cfg.run.model_name)
    ckpt = load_checkpoint(path)
    model, spec = model_from_checkpoint(ckpt, path)
    check_spec(spec, path, dataset=cfg.run.dataset, arch=cfg.run.arch, norm=cfg.run.norm)
    meta = {"path": path, "epoch": ckpt.get("epoch"), "err_cls": ckpt.get("err_cls"), "run_id": ckpt.get("run_id")}
    return model, spec, meta


def load_memorized(cfg: OnlineConfig, spec: ModelSpec, online: dict[str, Any]) -> tuple[nn.Module | None, str]:
    """The memorized model; None, with a printed note, when only the optional MD measurement would use it and it
    is missing."""
    path = cfg.run.memorized_path()
    needed = cfg.defence == "DSC" or cfg.attack.adaptive_md > 0
    if not needed and not cfg.measure.md:
        return None, path
    if not needed and cfg.run.memorized_model is None and not os.path.isfile(path):
        print(f"note: no memorized model at {path!r}: MD is not measured (pass --memorized_model to measure it)")
        return None, path
    return load_memorized_model(path, spec, online.get("run_id"), cfg.run.allow_other_run)[0], path


def default_out(cfg: OnlineConfig, spec: ModelSpec) -> str:
    """A new results folder name: ASCII, no spaces, unique per process (time to the second and the pid)."""
    return os.path.join("runs", f"{spec.dataset}_{spec.arch}_{cfg.defence}_s{cfg.run.seed}_"
                                f"{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}")


def _validation_batch(cfg: OnlineConfig, test: Split, generator: torch.Generator) -> torch.Tensor:
    """The attacker's validation batch: the first --test_batch_size of a seeded shuffle of the test set."""
    if cfg.attack.val_size > len(test):
        raise UserError(f"--test_batch_size {cfg.attack.val_size} is larger than the test set ({len(test)})")
    return torch.randperm(len(test), generator=generator)[:cfg.attack.val_size]


def _check_sizes(cfg: OnlineConfig, test: Split) -> None:
    """Flags that count test samples must fit the test set."""
    if cfg.eval.eval_subset > len(test):
        raise UserError(f"--eval_subset {cfg.eval.eval_subset} is more than the test set holds ({len(test)}); "
                        f"use at most {len(test)} (or 0 for the whole set)")
    needed = cfg.dsc.calibrate_batches * cfg.stream.batch_size
    if cfg.defence == "DSC" and cfg.dsc.calibrate and needed > len(test):
        raise UserError(f"--dsc_calibrate_batches {cfg.dsc.calibrate_batches} x --batch_size "
                        f"{cfg.stream.batch_size} = {needed} samples, more than the test set holds ({len(test)}); "
                        f"use at most {len(test) // cfg.stream.batch_size} batches")


def build_context(cfg: OnlineConfig) -> RunContext:
    """Load and draw everything a run needs, in a fixed order of random draws (so a seed fixes the run)."""
    set_threads(cfg.run.threads)
    use_cpu_kernels(cfg.run.kernels)
    use_memory_format(cfg.run.memory_format)
    device = get_device(cfg.run.device)
    if cfg.run.deterministic:
        set_deterministic(device)
    model, spec, online = load_online_model(cfg)
    memorized, memorized_path = load_memorized(cfg, spec, online)
    set_seed(cfg.run.seed)
    data = get_data(spec.dataset, cfg.run.dataroot, device, download=cfg.run.download)
    _check_sizes(cfg, data.test)
    model.to(device)
    if memorized is not None:
        memorized.to(device)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    val_indices = _validation_batch(cfg, data.test, generator)
    x_val, y_val = data.test.batch(val_indices)
    stream = Stream(data.train, cfg.stream.batch_size, shuffle=cfg.stream.shuffle,
                    reuse_first=cfg.stream.reuse_first_batch, augment=data.info if cfg.stream.augment else None,
                    generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learner.lr, momentum=cfg.learner.momentum,
                                weight_decay=cfg.learner.weight_decay)
    learner = Learner(model, optimizer, cfg.learner.mode, cfg.learner.clip_value)
    eval_split = data.test
    if cfg.eval.eval_subset:
        sub = torch.randperm(len(data.test), generator=generator)[:cfg.eval.eval_subset]
        eval_split = Split(data.test.x[sub.to(device)], data.test.y[sub.to(device)])
    x_trigger, y_trigger = stream.get(0)
    mask = poison_mask(len(y_trigger), cfg.attack.poison_scale, generator, x_trigger.device)
    threshold = cfg.eval.threshold
    if threshold is None:
        threshold = online["err_cls"] + cfg.eval.threshold_delta
    return RunContext(cfg, device, model, spec, online, memorized, memorized_path if memorized is not None else None,
                      data, generator, val_indices, x_val, y_val, stream, learner, eval_split, x_trigger, y_trigger,
                      mask, threshold)
