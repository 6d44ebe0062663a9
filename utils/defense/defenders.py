"""The defenders of the online learner (SPEC "Baselines", "DSC"): each takes one arriving batch and updates the
model, with one call shape, ``defender.step(learner, x, y, t, niter)``, as torchattacks does for attacks. A new
defender is a subclass of ``Defender`` registered in ``DEFENDERS`` under its --med name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.attack.craft import pgd_perturb
from utils.core.data import Split
from utils.core.train import Learner, sgd_step
from utils.defense.config import ATConfig, DSCConfig
from utils.defense.dsc import DSCThreshold, calibrate_dsc, dsc_correct


@dataclass
class DefenderInputs:
    """What a defender may read when it is built for a run (``Defender.build``)."""

    at: ATConfig
    dsc: DSCConfig
    model: nn.Module  # the online model as the stream starts
    memorized: nn.Module | None  # the memorized model (SPEC "Memorization Discrepancy"), when there is one
    held_out: Split  # clean held-out samples (the test split): DSC's calibration draws from them
    batch_size: int  # the stream's batch size
    seed: int  # the run's seed


class Defender:
    """A defence of the online learner: ``step`` learns from one arriving batch (t: its index in the stream)
    and returns the per-step facts to log; ``summary`` turns the run's step records into its figures."""

    name = "defender"

    @classmethod
    def build(cls, inputs: DefenderInputs) -> "Defender":
        """The defender for a run."""
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
    def build(cls, inputs: DefenderInputs) -> "AdversarialTraining":
        return cls(inputs.at)

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, t: int, niter: int = 1) -> dict:
        for _ in range(niter):
            x_adv = pgd_perturb(learner.model, x, y, epsilon=self.cfg.epsilon, step_size=self.cfg.step_size,
                                steps=self.cfg.steps, descend_with_kl=self.cfg.descent_kl)
            sgd_step(learner, x_adv, y, 1)
        return {}


class DiscrepancyAwareCorrection(Defender):
    """DSC: correct the batch with threshold τ_t, then one SGD step on it (SPEC "DSC")."""

    name = "DSC"

    def __init__(self, cfg: DSCConfig, memorized: nn.Module, threshold: DSCThreshold):
        self.cfg, self.memorized, self.threshold = cfg, memorized, threshold

    @classmethod
    def build(cls, inputs: DefenderInputs) -> "DiscrepancyAwareCorrection":
        """τ0, κ from the flags, or calibrated on clean test batches (its own generator: seed + 2)."""
        generator = torch.Generator().manual_seed(inputs.seed + 2)
        threshold = calibrate_dsc(inputs.dsc, inputs.model, inputs.memorized, inputs.held_out, inputs.batch_size,
                                  generator)
        if threshold.calibrated:
            print(f"DSC calibrated: tau0 {threshold.tau0:.4f}, kappa {threshold.kappa:.5f} (quantile "
                  f"{inputs.dsc.calibrate} of {inputs.dsc.calibrate_batches} clean batches)")
        return cls(inputs.dsc, inputs.memorized, threshold)

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


# --med name -> defender class (OnlineConfig accepts exactly these names; OURS is DSC)
DEFENDERS: dict[str, type[Defender]] = {"ST": StandardTraining, "AT": AdversarialTraining,
                                        "DSC": DiscrepancyAwareCorrection}
