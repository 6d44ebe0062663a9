"""Defender steps of the online phase (SPEC "Baselines"): each takes one arriving batch and updates the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.discrepancy import md_from_logits
from utils.errors import UserError
from utils.grads import preserved_state, project_linf


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


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float = 0.2,
                step_size: float = 0.02, steps: int = 10, descend_with_kl: bool = False) -> torch.Tensor:
    """PGD in the L∞ ball, no random start, model in eval mode (SPEC "Baselines", AT).

    Default: ascent on CE (real PGD). ``descend_with_kl``: the authors' variant, signed steps that
    *descend* CE + KL(p(x) ‖ p(x')) (their KLDivLoss, mean over all elements).
    """
    x0 = x.detach()
    x_adv = x0.clone()
    with preserved_state(model):
        model.eval()
        if descend_with_kl:
            with torch.no_grad():
                p_nat = F.softmax(model(x0), dim=1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            loss = F.cross_entropy(out, y)
            if descend_with_kl:
                loss = loss + (p_nat * (p_nat.clamp_min(1e-30).log() - F.log_softmax(out, dim=1))).mean()
            (g,) = torch.autograd.grad(loss, x_adv)
            direction = -1.0 if descend_with_kl else 1.0
            x_adv = project_linf(x_adv.detach() + direction * step_size * g.sign(), x0, epsilon)
    return x_adv.detach()


def adversarial_training(learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int, niter: int = 1) -> dict:
    """AT: PGD within ε, then one SGD step on the perturbed batch (SPEC "Baselines")."""
    cfg = learner.extras["at"]
    for _ in range(niter):
        x_adv = pgd_perturb(learner.model, x, y, epsilon=cfg["epsilon"], step_size=cfg["step_size"],
                            steps=cfg["steps"], descend_with_kl=cfg["descend_with_kl"])
        sgd_step(learner, x_adv, y, 1)
    return {}


def dsc_correct(model: nn.Module, memorized_model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                threshold: float, epsilon: float = 0.2, step_size: float = 0.02, max_steps: int = 10,
                return_steps: bool = False):
    """DSC's correction: loss-descent signed steps until the batch's mean MD ≤ threshold (SPEC "DSC").

    Returns the corrected batch (and, with ``return_steps``, how many steps were taken).
    """
    x0 = x.detach()
    x_c = x0.clone()
    taken = 0
    with preserved_state(model), preserved_state(memorized_model):
        model.eval()
        memorized_model.eval()
        for _ in range(max_steps):
            x_c.requires_grad_(True)
            out = model(x_c)
            with torch.no_grad():
                md = md_from_logits(out.detach(), memorized_model(x_c.detach())).mean().item()
            if md <= threshold:
                break
            (g,) = torch.autograd.grad(F.cross_entropy(out, y), x_c)
            x_c = project_linf(x_c.detach() - step_size * g.sign(), x0, epsilon)
            taken += 1
    x_c = x_c.detach()
    return (x_c, taken) if return_steps else x_c


def discrepancy_aware_correction(learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int,
                                 niter: int = 1) -> dict:
    """DSC: correct the batch with threshold τ_t = τ0 + κ·t, then one SGD step on it (SPEC "DSC")."""
    cfg = learner.extras["dsc"]
    tau = cfg["tau0"] + cfg["kappa"] * t
    steps = []
    for _ in range(niter):
        x_c, n = dsc_correct(learner.model, learner.extras["memorized"], x, y, threshold=tau,
                             epsilon=cfg["epsilon"], step_size=cfg["step_size"], max_steps=cfg["max_steps"],
                             return_steps=True)
        steps.append(n)
        sgd_step(learner, x_c, y, 1)
    return {"dsc_tau": tau, "dsc_steps": sum(steps) / len(steps)}


# A defender: (learner, x, y, t, niter) -> dict of per-step facts to log. t: index of the batch in the stream.
Defender = Callable[[Learner, torch.Tensor, torch.Tensor, int, int], dict]

DEFENDERS: dict[str, Defender] = {"ST": standard_training, "AT": adversarial_training,
                                  "DSC": discrepancy_aware_correction}
ALIASES = {"OURS": "DSC"}


def get_defender(name: str) -> tuple[str, Defender]:
    """The defender registered under ``name`` (case-insensitive; the authors' OURS means DSC)."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in DEFENDERS:
        raise UserError(f"unknown --med {name!r}; known: {', '.join(DEFENDERS)}")
    return key, DEFENDERS[key]
