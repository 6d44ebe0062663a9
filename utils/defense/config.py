"""The defenders' settings (SPEC "Baselines", "DSC")."""
from __future__ import annotations

from dataclasses import dataclass

from utils.core.grads import MAX_INNER_STEPS, STEPS_NOTE
from utils.errors import UserError
from utils.fields import check_fields, opt


@dataclass(frozen=True)
class ATConfig:
    """Adversarial training (SPEC "Baselines"); ``descent_kl``: the authors' variant (SPEC quirk 2)."""

    epsilon: float = opt(0.2, "PGD radius", flag="--at_epsilon", low=0, high=1, note="pixel units")
    step_size: float = opt(0.02, "PGD step size", flag="--at_step", low=0, high=1)
    steps: int = opt(10, "PGD steps (no random start)", flag="--at_steps", low=0, high=MAX_INNER_STEPS,
                     note=STEPS_NOTE)
    descent_kl: bool = opt(False, "the authors' AT: steps that descend CE + KL instead of ascending CE",
                           flag="--at_descent_kl")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DSCConfig:
    """DSC (SPEC "DSC"); ``calibrate`` > 0: our extension, τ0 from clean held-out batches."""

    tau0: float = opt(0.5, "τ0 of τ_t = τ0 + κ·t", flag="--dsc_tau0", low=0, high=1e6)
    kappa: float = opt(0.02, "κ of τ_t = τ0 + κ·t", flag="--dsc_kappa", low=0, high=1e6)
    epsilon: float = opt(0.2, "DSC correction radius", flag="--dsc_epsilon", low=0, high=1, note="pixel units")
    step_size: float = opt(0.02, "DSC step size", flag="--dsc_step", low=0, high=1)
    max_steps: int = opt(10, "DSC correction steps at most", flag="--dsc_max_steps", low=0, high=MAX_INNER_STEPS,
                         note=STEPS_NOTE)
    calibrate: float = opt(0.0, "our extension: τ0 := the Q-quantile (0<Q<1) of the mean MD of clean held-out test "
                           "batches at the start, κ scaled by the same factor (0: off, the paper's constants)",
                           flag="--dsc_calibrate", low=0, high=1, note="a quantile; 0: off", metavar="Q")
    calibrate_batches: int = opt(20, "clean test batches --dsc_calibrate measures", flag="--dsc_calibrate_batches",
                                 low=1, high=10000)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.calibrate >= 1:
            raise UserError(f"--dsc_calibrate must lie in [0, 1) (a quantile; 0: off), got {self.calibrate:g}")
        if self.calibrate and self.tau0 == 0:
            raise UserError("--dsc_calibrate scales κ by (calibrated τ0) / --dsc_tau0, so it needs --dsc_tau0 > 0")
