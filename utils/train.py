"""Device and seed set-up, the one evaluation loop, and one burn-in epoch (SPEC phase 1)."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.data import BatchLoader, Split
from utils.errors import UserError


def get_device(name: str | None = None) -> torch.device:
    """The device: ``name`` if given (checked), else cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Test error of the model (eval mode) on a split, in [0, 1]; the model's mode is restored."""
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, len(split), batch_size):
        x, y = split.batch(torch.arange(i, min(i + batch_size, len(split))))
        wrong += (model(x).argmax(1) != y).sum().item()
    model.train(was_training)
    return wrong / len(split)


def train_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                desc: str = "train", clip_gradnorm: float | None = None) -> tuple[float, float]:
    """One pass of SGD over the loader in train mode; returns (mean loss, train accuracy)."""
    model.train()
    loss_sum = torch.zeros((), device=loader.split.x.device)
    correct = torch.zeros((), device=loader.split.x.device)
    seen = 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_gradnorm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_gradnorm)
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
    loss_mean = loss_sum.item() / seen
    if not np.isfinite(loss_mean):
        raise UserError(f"the training loss became {loss_mean}; lower --lr or enable --clip_gradnorm")
    return loss_mean, correct.item() / seen
