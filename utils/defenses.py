"""Defender steps of the online phase (SPEC "Baselines"): each takes one arriving batch and updates the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError


@dataclass
class Learner:
    """The online learner: its model, optimizer and how it steps (SPEC "Phase 2")."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    mode: str = "train"  # the model's mode during its update (--onlinemode)
    clip_value: float | None = None  # the authors' --clip_gradnorm: clip the gradient's inf-norm to this
    extras: dict[str, Any] = field(default_factory=dict)  # what a defender needs (memorized model, ...)


def sgd_step(learner: Learner, x: torch.Tensor, y: torch.Tensor, niter: int = 1) -> None:
    """``niter`` plain SGD steps on (x, y) with the model in the learner's mode (SPEC "Phase 2")."""
    model = learner.model
    model.train(learner.mode == "train")
    for _ in range(niter):
        learner.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if learner.clip_value is not None:
            nn.utils.clip_grad_norm_(model.parameters(), learner.clip_value, norm_type=float("inf"))
        learner.optimizer.step()


def standard_training(learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int, niter: int = 1) -> dict:
    """ST: one plain SGD step on what arrives (SPEC "Baselines")."""
    sgd_step(learner, x, y, niter)
    return {}


# A defender: (learner, x, y, t, niter) -> dict of per-step facts to log. t: index of the batch in the stream.
Defender = Callable[[Learner, torch.Tensor, torch.Tensor, int, int], dict]

DEFENDERS: dict[str, Defender] = {"ST": standard_training}
ALIASES = {"OURS": "DSC"}


def get_defender(name: str) -> tuple[str, Defender]:
    """The defender registered under ``name`` (case-insensitive; the authors' OURS means DSC)."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in DEFENDERS:
        raise UserError(f"unknown --med {name!r}; known: {', '.join(DEFENDERS)}")
    return key, DEFENDERS[key]
