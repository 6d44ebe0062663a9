"""DSC's mathematics (SPEC "DSC"): the discrepancy-aware correction of a batch, its threshold τ_t, and our
calibration of τ0 on clean held-out batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.core.data import Split
from utils.core.discrepancy import md_from_logits, memorization_discrepancy
from utils.core.grads import preserved_state, project_linf
from utils.defense.config import DSCConfig


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


@dataclass(frozen=True)
class DSCThreshold:
    """τ_t = τ0 + κ·t (SPEC "DSC"), with how τ0 was set."""

    tau0: float
    kappa: float
    calibrated: bool = False
    clean_batch_md: tuple[float, ...] = ()

    def at(self, t: int) -> float:
        return self.tau0 + self.kappa * t


def calibrate_dsc(cfg: DSCConfig, model: nn.Module, memorized: nn.Module, split: Split, batch_size: int,
                  generator: torch.Generator) -> DSCThreshold:
    """Our extension to SPEC "DSC": τ0 := the cfg.calibrate-quantile of the mean MD of clean held-out batches,
    κ scaled by the same factor; the paper's constants when cfg.calibrate is 0."""
    if not cfg.calibrate:
        return DSCThreshold(cfg.tau0, cfg.kappa)
    idx = torch.randperm(len(split), generator=generator)[:cfg.calibrate_batches * batch_size]
    idx = idx.view(cfg.calibrate_batches, -1)
    means = torch.stack([memorization_discrepancy(model, memorized, split.batch(i)[0]).mean() for i in idx])
    tau0 = torch.quantile(means.cpu(), cfg.calibrate).item()
    return DSCThreshold(tau0, cfg.kappa * tau0 / cfg.tau0, True, tuple(means.tolist()))
