"""The learner and its defenders (SPEC "Phase 2", "Baselines", "DSC"): each defender takes one arriving batch
and updates the model, with one call shape, ``defender.step(learner, x, y, t, niter)``, as torchattacks does
for attacks. A new defender is a subclass of ``Defender`` registered in ``DEFENDERS`` under its --med name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attack import pgd_perturb
from utils.config import ATConfig, DSCConfig
from utils.data import Split
from utils.discrepancy import md_from_logits, memorization_discrepancy
from utils.grads import preserved_state, project_linf

if TYPE_CHECKING:
    from utils.context import RunContext


@dataclass
class Learner:
    """The online learner: its model, optimizer and how it steps (SPEC "Phase 2")."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    mode: str = "train"  # the model's mode during its update (--onlinemode)
    clip_value: float | None = None  # the authors' --clip_gradnorm: clip the gradient's inf-norm to this


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


class Defender:
    """A defence of the online learner: ``step`` learns from one arriving batch (t: its index in the stream)
    and returns the per-step facts to log; ``summary`` turns the run's step records into its figures."""

    name = "defender"

    @classmethod
    def from_context(cls, ctx: "RunContext") -> "Defender":
        """Build the defender for a run (its configuration is ``ctx.cfg``)."""
        return cls()

    def describe(self) -> dict:
        """Settings decided at the start of the run, for config.json."""
        return {}

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int, niter: int = 1) -> dict:
        raise NotImplementedError

    def summary(self, records: list[dict]) -> dict:
        return {"dsc_mean_steps": None}  # the table has this column for every defence; DSC fills it


class StandardTraining(Defender):
    """ST: one plain SGD step on what arrives (SPEC "Baselines")."""

    name = "ST"

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int, niter: int = 1) -> dict:
        sgd_step(learner, x, y, niter)
        return {}


class AdversarialTraining(Defender):
    """AT: PGD within ε, then one SGD step on the perturbed batch (SPEC "Baselines"; quirk 2 for descent_kl)."""

    name = "AT"

    def __init__(self, cfg: ATConfig):
        self.cfg = cfg

    @classmethod
    def from_context(cls, ctx: "RunContext") -> "AdversarialTraining":
        return cls(ctx.cfg.at)

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int, niter: int = 1) -> dict:
        for _ in range(niter):
            x_adv = pgd_perturb(learner.model, x, y, epsilon=self.cfg.epsilon, step_size=self.cfg.step_size,
                                steps=self.cfg.steps, descend_with_kl=self.cfg.descent_kl)
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


class DiscrepancyAwareCorrection(Defender):
    """DSC: correct the batch with threshold τ_t, then one SGD step on it (SPEC "DSC")."""

    name = "DSC"

    def __init__(self, cfg: DSCConfig, memorized: nn.Module, threshold: DSCThreshold):
        self.cfg, self.memorized, self.threshold = cfg, memorized, threshold

    @classmethod
    def from_context(cls, ctx: "RunContext") -> "DiscrepancyAwareCorrection":
        """τ0, κ from the flags, or calibrated on clean test batches (its own generator: seed + 2)."""
        generator = torch.Generator().manual_seed(ctx.cfg.run.seed + 2)
        threshold = calibrate_dsc(ctx.cfg.dsc, ctx.model, ctx.memorized, ctx.data.test, ctx.cfg.stream.batch_size,
                                  generator)
        if threshold.calibrated:
            print(f"DSC calibrated: tau0 {threshold.tau0:.4f}, kappa {threshold.kappa:.5f} (quantile "
                  f"{ctx.cfg.dsc.calibrate} of {ctx.cfg.dsc.calibrate_batches} clean batches)")
        return cls(ctx.cfg.dsc, ctx.memorized, threshold)

    def describe(self) -> dict:
        return {"dsc": dataclasses.asdict(self.threshold)}

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int, niter: int = 1) -> dict:
        tau = self.threshold.at(t)
        steps = []
        for _ in range(niter):
            x_c, n = dsc_correct(learner.model, self.memorized, x, y, threshold=tau, epsilon=self.cfg.epsilon,
                                 step_size=self.cfg.step_size, max_steps=self.cfg.max_steps, return_steps=True)
            steps.append(n)
            sgd_step(learner, x_c, y, 1)
        return {"dsc_tau": tau, "dsc_steps": sum(steps) / len(steps)}

    def summary(self, records: list[dict]) -> dict:
        steps = [r["dsc_steps"] for r in records]
        return {"dsc_mean_steps": sum(steps) / len(steps) if steps else None}


# --med name -> defender class (the config accepts exactly these names; OURS is DSC)
DEFENDERS: dict[str, type[Defender]] = {"ST": StandardTraining, "AT": AdversarialTraining,
                                        "DSC": DiscrepancyAwareCorrection}
