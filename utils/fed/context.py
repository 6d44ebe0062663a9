"""What a federated run loads and draws (SPEC "Federated learning"), built once from a ``FedConfig`` in a fixed order
of seeded draws, so that a seed fixes the run and a Flower ClientApp in another process rebuilds the same parts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from utils.core.checkpoint import load_checkpoint, model_from_checkpoint
from utils.core.data import Data, Split, get_data
from utils.core.models import ModelSpec
from utils.core.train import get_device, set_threads, use_cpu_kernels
from utils.errors import UserError
from utils.fed.config import FedConfig, malicious_count
from utils.fed.split import Shards, split_data
from utils.fed.vectors import TRIGGER_KEY, generator, param_vector


@dataclass
class FedContext:
    """The parts of one federated run."""

    cfg: FedConfig
    device: torch.device
    model: nn.Module  # the starting global model (its BN running statistics stay those of the checkpoint)
    spec: ModelSpec
    checkpoint: dict[str, Any]
    data: Data
    shards: Shards
    malicious: list[int]  # the malicious clients' indices (the first ones)
    trigger: tuple[torch.Tensor, torch.Tensor]  # the attacker's trigger batch, from its own shard
    val: tuple[torch.Tensor, torch.Tensor]  # the attacker's validation batch, from the test set
    val_indices: torch.Tensor
    root: Split  # the server's clean root batch
    eval_split: Split
    threshold: float | None  # the stop rule's absolute test error (None: no early stop)

    @property
    def theta0(self) -> torch.Tensor:
        return param_vector(self.model)


def load_start(cfg: FedConfig) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """The starting global model from --resume/--model_name."""
    path = os.path.join(cfg.run.resume, cfg.run.model_name)
    ckpt = load_checkpoint(path)
    model, spec = model_from_checkpoint(ckpt, path)
    return model, spec, {"path": path, "epoch": ckpt.get("epoch"), "err_cls": ckpt.get("err_cls"),
                         "run_id": ckpt.get("run_id")}


def attacker_batches(cfg: FedConfig, data: Data, shards: Shards) -> tuple[tuple, tuple, torch.Tensor]:
    """The trigger batch (B samples of the first malicious client's shard) and the validation batch (a seeded draw
    of --test_batch_size test samples), and the latter's indices."""
    shard, b = shards.clients[0], cfg.clients.batch_size
    if len(shard) < b:
        raise UserError(f"the attacker's shard holds {len(shard)} samples, fewer than the trigger batch (--batch_size "
                        f"{b}); use a smaller --batch_size, fewer --clients or a larger --alpha")
    if cfg.attack.val_size > len(data.test):
        raise UserError(f"--test_batch_size {cfg.attack.val_size} is larger than the test set ({len(data.test)})")
    trigger = data.train.batch(shard[torch.randperm(len(shard), generator=generator(cfg.run.seed, TRIGGER_KEY))[:b]])
    val_indices = torch.randperm(len(data.test), generator=generator(cfg.run.seed, TRIGGER_KEY, 1))[:cfg.attack.val_size]
    return trigger, data.test.batch(val_indices), val_indices


def eval_split(cfg: FedConfig, test: Split) -> Split:
    """What is evaluated after every accumulative round: the test set, or a fixed seeded subset of it."""
    n = cfg.server.eval_subset
    if n > len(test):
        raise UserError(f"--eval_subset {n} is more than the test set holds ({len(test)}); use at most {len(test)} "
                        f"(or 0 for the whole set)")
    if not n:
        return test
    sub = torch.randperm(len(test), generator=generator(cfg.run.seed, TRIGGER_KEY, 2))[:n].to(test.x.device)
    return Split(test.x[sub], test.y[sub])


def prepare_process(cfg: FedConfig) -> torch.device:
    """This process's threads and CPU kernels (before its first computation), and the device."""
    set_threads(cfg.run.threads)
    use_cpu_kernels(cfg.run.kernels)
    return get_device(cfg.run.device)


def build_context(cfg: FedConfig, data: Data | None = None) -> FedContext:
    """Load and draw everything a federated run needs (``data``: already loaded, e.g. by a Flower worker)."""
    device = prepare_process(cfg)
    model, spec, meta = load_start(cfg)
    if data is not None and data.info.name != spec.dataset:
        raise UserError(f"the checkpoint's dataset is {spec.dataset}, but the data given are {data.info.name}")
    data = data or get_data(spec.dataset, cfg.run.dataroot, device, download=cfg.run.download)
    c = cfg.clients
    shards = split_data(data.train.y.cpu(), c.clients, cfg.server.root_size, c.split, c.alpha, cfg.run.seed)
    trigger, val, val_indices = attacker_batches(cfg, data, shards)
    root_idx = shards.root.to(data.train.x.device)
    root = Split(data.train.x[root_idx], data.train.y[root_idx])
    threshold = cfg.server.threshold
    if cfg.server.threshold_delta is not None:
        threshold = meta["err_cls"] + cfg.server.threshold_delta
    return FedContext(cfg, device, model.to(device), spec, meta, data, shards,
                      list(range(malicious_count(c, cfg.attack))), trigger, val, val_indices, root,
                      eval_split(cfg, data.test), threshold)
