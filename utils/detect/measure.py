"""Measurements of the online loop: small objects with one interface. Each is built from what it may read
(``MeasureInputs``), adds its fields to every step's record (``measure(model, arrival)``) and its figures to the
summary (``summary``); the loop times each one as ``<name>_s``.

A new measurement is a subclass of ``Measurement`` appended to ``MEASUREMENTS``; nothing in the loop changes.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from utils.core.checkpoint import load_memorized_model, weights_digest
from utils.core.data import Split
from utils.core.discrepancy import memorization_discrepancies, memorization_discrepancy
from utils.core.metrics import auroc, tpr_at_fpr
from utils.core.models import ModelSpec
from utils.core.stream import Arrival
from utils.detect import detectors as registry
from utils.detect.detectors import ReferenceFit, batch_view, build_detectors, fit_reference, split_view
from utils.errors import UserError
from utils.fields import check_choice, check_fields, opt
from utils.io.results import append_jsonl, atomic_write


@dataclass(frozen=True)
class MeasureConfig:
    """What is measured on every arriving batch besides the test error (SPEC "Detectors")."""

    md: bool = opt(True, "do not measure MD", flag="--no_md", negate=True)
    alignment: bool = opt(True, "do not log A(g_trigger, g_val) per batch", flag="--no_alignment", negate=True)
    detectors: tuple[str, ...] = opt((), f"also score every arriving batch with these detectors: "
                                     f"{', '.join(registry.DETECTORS)} (or 'all'); results in detectors.jsonl and "
                                     f"summary.json", metavar="NAME")
    detector_fit_samples: int = opt(5000, "clean training samples the fitted detectors (kd, lid, mahalanobis) use",
                                    low=100, high=10 ** 6)
    md_curve: tuple[str, ...] = opt((), "also score MD with each of these checkpoints (same burn-in run) as the "
                                    "memorized model: MD's AUROC as a function of the memorized model's epoch, in "
                                    "summary.json", metavar="CKPT")

    def __post_init__(self) -> None:
        object.__setattr__(self, "detectors", tuple(self.detectors))
        object.__setattr__(self, "md_curve", tuple(self.md_curve))
        check_fields(self)
        for name in self.detectors:  # the registry as it is now, with what a user registered
            check_choice("--detectors", name, tuple(registry.DETECTORS))


@dataclass
class MeasureInputs:
    """What a measurement may read when it is built for a run (``Measurement.build``)."""

    cfg: MeasureConfig
    model: nn.Module  # the online model as the stream starts
    memorized: nn.Module | None
    spec: ModelSpec
    run_id: str | None  # the burn-in run of the online model (checkpoints of other runs are refused)
    allow_other_run: bool
    train: Split  # clean training samples (the fitted detectors)
    fit_cache: str  # the folder that keeps the detectors' fits (next to the online checkpoint)
    device: torch.device
    out: str  # the run's results folder
    alignment: Callable[[nn.Module], float]  # A(g_trigger, g_val) at a model (the attacker's)


class Measurement:
    """One measurement. ``after_update``: measured after the learner's step and the evaluation (else before)."""

    name = "measurement"
    after_update = False

    @classmethod
    def build(cls, inputs: MeasureInputs) -> "Measurement | None":
        """The measurement for this run, or None when it is not measured (its flag is off, a model is missing)."""
        return cls()

    def start(self, model: nn.Module) -> None:
        """Called once the trigger is crafted, before the first arriving batch."""

    def measure(self, model: nn.Module, arrival: Arrival) -> dict:
        """Fields for this step's record in steps.jsonl (``model``: the online model)."""
        return {}

    def finish(self, model: nn.Module) -> None:
        """Called after the last arriving batch, before the trigger step."""

    def summary(self) -> dict:
        """Figures for summary.json."""
        return {}


def concatenated(positive: list[torch.Tensor], negative: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray] | None:
    """The scores of each side, concatenated; None when either side is empty."""
    p = torch.cat(positive) if positive else torch.empty(0)
    n = torch.cat(negative) if negative else torch.empty(0)
    return (p.double().numpy(), n.double().numpy()) if len(p) and len(n) else None


def auroc_or_none(positive: list[torch.Tensor], negative: list[torch.Tensor]) -> float | None:
    """AUROC of the concatenated scores, None when either side is empty (SPEC "Detectors")."""
    scores = concatenated(positive, negative)
    return None if scores is None else auroc(*scores)


class MemorizationDiscrepancy(Measurement):
    """MD of the poisoned samples, of the same samples clean and under ±ε noise (SPEC "Memorization
    Discrepancy"); per-sample values in md.jsonl, the means in each step's record, the AUROCs in the summary."""

    name = "md"

    def __init__(self, memorized: nn.Module, path: str):
        self.memorized, self.path = memorized, path
        self.values: dict[str, list[torch.Tensor]] = {"poison": [], "clean": [], "noise": []}

    @classmethod
    def build(cls, inputs: MeasureInputs) -> "MemorizationDiscrepancy | None":
        if inputs.memorized is None or not inputs.cfg.md:
            return None
        return cls(inputs.memorized, os.path.join(inputs.out, "md.jsonl"))

    def measure(self, model: nn.Module, a: Arrival) -> dict:
        md = {"poison": memorization_discrepancy(model, self.memorized, a.x_in)[a.mask],
              "clean": memorization_discrepancy(model, self.memorized, a.x),
              "noise": memorization_discrepancy(model, self.memorized, a.noisy)[a.mask]}
        for key, v in md.items():
            self.values[key].append(v.cpu())
        append_jsonl(self.path, {"t": a.t, **{key: v.tolist() for key, v in md.items()}})
        return {f"md_{key}": v.mean().item() for key, v in md.items()}

    def summary(self) -> dict:
        return {"md_measured": True,
                "md_auroc_poison_vs_clean": auroc_or_none(self.values["poison"], self.values["clean"]),
                "md_auroc_poison_vs_noise": auroc_or_none(self.values["poison"], self.values["noise"]),
                "md_mean": {k: (torch.cat(v).mean().item() if v else None) for k, v in self.values.items()}}


class Alignment(Measurement):
    """A(g(x_T', y_T), g(x_v, y_v)) after every step, at the start and before the trigger step (SPEC
    "The attack"): how far the accumulative phase has turned the trigger against the validation batch."""

    name = "alignment"
    after_update = True

    def __init__(self, alignment: Callable[[nn.Module], float]) -> None:
        self.alignment = alignment
        self.start_value: float | None = None
        self.end_value: float | None = None

    @classmethod
    def build(cls, inputs: MeasureInputs) -> "Alignment | None":
        return cls(inputs.alignment) if inputs.cfg.alignment else None

    def start(self, model: nn.Module) -> None:
        self.start_value = self.alignment(model)

    def measure(self, model: nn.Module, a: Arrival) -> dict:
        return {"alignment": self.alignment(model)}

    def finish(self, model: nn.Module) -> None:
        self.end_value = self.alignment(model)

    def summary(self) -> dict:
        return {"alignment_start": self.start_value, "alignment_end": self.end_value}


def cached_reference_fit(inputs: MeasureInputs, reference: nn.Module) -> ReferenceFit:
    """The detectors' fit on clean training samples (SPEC "Detectors"), computed once per online checkpoint and
    kept next to it (``detector_fits/``); its own generator (seed 0), so every run of the checkpoint shares it."""
    n = inputs.cfg.detector_fit_samples
    if n > len(inputs.train):
        raise UserError(f"--detector_fit_samples {n} is more than the training set holds ({len(inputs.train)})")
    digest = weights_digest(reference.state_dict())[:16]
    path = os.path.join(inputs.fit_cache, f"{digest}_{inputs.spec.dataset}_n{n}.pt")
    if os.path.isfile(path):
        try:
            return ReferenceFit.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # a damaged cache is fitted again, never trusted
            print(f"note: refitting the detectors ({path!r} could not be read: {type(e).__name__})")
    fit = fit_reference(reference, inputs.train, n_samples=n, generator=torch.Generator().manual_seed(0))
    try:
        atomic_write(path, lambda tmp: torch.save(fit.to("cpu").to_dict(), tmp))
    except (OSError, UserError) as e:
        print(f"note: the detectors' fit is not cached ({e})")
    return fit


def roc_figures(pos: list[torch.Tensor], neg: list[torch.Tensor]) -> dict:
    """AUROC and TPR at 5 % FPR of positives against negatives (SPEC "Detectors"); None when a side is empty."""
    scores = concatenated(pos, neg)
    if scores is None:
        return {"auroc": None, "tpr_at_5fpr": None}
    return {"auroc": auroc(*scores), "tpr_at_5fpr": tpr_at_fpr(*scores, 0.05)}


class DetectorScores(Measurement):
    """Every --detectors score of the poisoned samples, of the same samples clean and under ±ε noise (SPEC
    "Detectors"); per-sample scores in detectors.jsonl, AUROC and TPR at 5 % FPR per detector in the summary."""

    name = "detectors"

    def __init__(self, inputs: MeasureInputs, path: str):
        self.memorized, self.path = inputs.memorized, path
        self.reference = copy.deepcopy(inputs.model).eval()  # θ_0: the online model as the phase starts
        names = inputs.cfg.detectors
        fitted = any(registry.DETECTORS[n].needs_fit for n in names)
        fit = cached_reference_fit(inputs, self.reference) if fitted else None
        self.detectors = build_detectors(names, fit)
        self.scores = {d.name: {"poison": [], "clean": [], "noise": []} for d in self.detectors}

    @classmethod
    def build(cls, inputs: MeasureInputs) -> "DetectorScores | None":
        if not inputs.cfg.detectors:
            return None
        if inputs.memorized is None and any(n.startswith("md") for n in inputs.cfg.detectors):
            raise UserError("--detectors md, md_reverse and md_js need the memorized model; pass --memorized_model")
        return cls(inputs, os.path.join(inputs.out, "detectors.jsonl"))

    def measure(self, model: nn.Module, a: Arrival) -> dict:
        """One forward pass per model over the three batches together, then each batch scored on its own (the
        spectral and clustering detectors look within a batch)."""
        kinds = (("poison", a.x_in, a.mask), ("clean", a.x, None), ("noise", a.noisy, a.mask))
        whole = batch_view(model, self.memorized, self.reference, torch.cat([x for _, x, _ in kinds]),
                           a.y.repeat(len(kinds)))
        line: dict = {"t": a.t}
        for i, (kind, _, keep) in enumerate(kinds):
            view = split_view(whole, i, len(kinds))
            for d in self.detectors:
                s = d.score(view).detach()
                s = (s if keep is None else s[keep]).float().cpu()
                self.scores[d.name][kind].append(s)
                line.setdefault(d.name, {})[kind] = s.tolist()
        append_jsonl(self.path, line)
        return {}

    def summary(self) -> dict:
        out = {}
        for name, s in self.scores.items():
            clean, noise = roc_figures(s["poison"], s["clean"]), roc_figures(s["poison"], s["noise"])
            out[name] = {"auroc_poison_vs_clean": clean["auroc"], "auroc_poison_vs_noise": noise["auroc"],
                         "tpr_at_5fpr_poison_vs_clean": clean["tpr_at_5fpr"],
                         "tpr_at_5fpr_poison_vs_noise": noise["tpr_at_5fpr"]}
        return {"detectors": out}


class MDCurve(Measurement):
    """MD with each --md_curve checkpoint as the memorized model, on the same poisoned, clean and noise samples
    (SPEC "Detectors", the memorized model's epoch); its AUROCs per checkpoint in the summary."""

    name = "md_curve"

    def __init__(self, inputs: MeasureInputs):
        loaded = {p: load_memorized_model(p, inputs.spec, inputs.run_id, inputs.allow_other_run)
                  for p in inputs.cfg.md_curve}
        self.models = {p: model.to(inputs.device) for p, (model, _) in loaded.items()}
        self.epochs = {p: epoch for p, (_, epoch) in loaded.items()}
        self.values = {p: {"poison": [], "clean": [], "noise": []} for p in self.models}

    @classmethod
    def build(cls, inputs: MeasureInputs) -> "MDCurve | None":
        return cls(inputs) if inputs.cfg.md_curve else None

    def measure(self, model: nn.Module, a: Arrival) -> dict:
        for kind, x, keep in (("poison", a.x_in, a.mask), ("clean", a.x, None), ("noise", a.noisy, a.mask)):
            mds = memorization_discrepancies(model, list(self.models.values()), x)
            for path, md in zip(self.models, mds):
                self.values[path][kind].append((md if keep is None else md[keep]).cpu())
        return {}

    def summary(self) -> dict:
        return {"md_curve": [{"memorized_model": path, "epoch": self.epochs[path],
                              "auroc_poison_vs_clean": auroc_or_none(v["poison"], v["clean"]),
                              "auroc_poison_vs_noise": auroc_or_none(v["poison"], v["noise"])}
                             for path, v in self.values.items()]}


# The measurements of every run, in this order (those with after_update=False before the learner's step).
MEASUREMENTS: list[type[Measurement]] = [MemorizationDiscrepancy, MDCurve, DetectorScores, Alignment]
