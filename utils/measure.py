"""Measurements of the online loop: small objects with one interface. Each adds its fields to every step's
record (``measure``) and its figures to the summary (``summary``); the loop times each one as ``<name>_s``.

A new measurement is a subclass of ``Measurement`` appended to ``MEASUREMENTS``; nothing in the loop changes.
"""
from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.checkpoint import weights_digest
from utils.detectors import DETECTORS, ReferenceFit, batch_view, build_detectors, fit_reference, split_view
from utils.discrepancy import memorization_discrepancies, memorization_discrepancy
from utils.errors import UserError
from utils.metrics import auroc, tpr_at_fpr
from utils.results import append_jsonl, atomic_write

if TYPE_CHECKING:
    from utils.context import Arrival, RunContext
    from utils.online import OnlineRun


class Measurement:
    """One measurement. ``after_update``: measured after the learner's step and the evaluation (else before)."""

    name = "measurement"
    after_update = False

    @classmethod
    def from_context(cls, ctx: "RunContext", out: str) -> "Measurement | None":
        """The measurement for this run, or None when it is not measured (its flag is off, a model is missing)."""
        return cls()

    def start(self, run: "OnlineRun") -> None:
        """Called once the trigger is crafted, before the first arriving batch."""

    def measure(self, run: "OnlineRun", arrival: "Arrival") -> dict:
        """Fields for this step's record in steps.jsonl."""
        return {}

    def finish(self, run: "OnlineRun") -> None:
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

    def __init__(self, memorized: torch.nn.Module, path: str):
        self.memorized, self.path = memorized, path
        self.values: dict[str, list[torch.Tensor]] = {"poison": [], "clean": [], "noise": []}

    @classmethod
    def from_context(cls, ctx: "RunContext", out: str) -> "MemorizationDiscrepancy | None":
        if ctx.memorized is None or not ctx.cfg.measure.md:
            return None
        return cls(ctx.memorized, os.path.join(out, "md.jsonl"))

    def measure(self, run: "OnlineRun", a: "Arrival") -> dict:
        model = run.ctx.model
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

    def __init__(self) -> None:
        self.start_value: float | None = None
        self.end_value: float | None = None

    @classmethod
    def from_context(cls, ctx: "RunContext", out: str) -> "Alignment | None":
        return cls() if ctx.cfg.measure.alignment else None

    def start(self, run: "OnlineRun") -> None:
        self.start_value = run.attacker.alignment(run.ctx.model)

    def measure(self, run: "OnlineRun", a: "Arrival") -> dict:
        return {"alignment": run.attacker.alignment(run.ctx.model)}

    def finish(self, run: "OnlineRun") -> None:
        self.end_value = run.attacker.alignment(run.ctx.model)

    def summary(self) -> dict:
        return {"alignment_start": self.start_value, "alignment_end": self.end_value}


def cached_reference_fit(ctx: "RunContext", reference: torch.nn.Module) -> ReferenceFit:
    """The detectors' fit on clean training samples (SPEC "Detectors"), computed once per online checkpoint and
    kept next to it (``detector_fits/``); its own generator (seed 0), so every run of the checkpoint shares it."""
    n = ctx.cfg.measure.detector_fit_samples
    if n > len(ctx.data.train):
        raise UserError(f"--detector_fit_samples {n} is more than the training set holds ({len(ctx.data.train)})")
    digest = weights_digest(reference.state_dict())[:16]
    path = os.path.join(ctx.cfg.run.resume, "detector_fits", f"{digest}_{ctx.spec.dataset}_n{n}.pt")
    if os.path.isfile(path):
        try:
            return ReferenceFit.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # a damaged cache is fitted again, never trusted
            print(f"note: refitting the detectors ({path!r} could not be read: {type(e).__name__})")
    fit = fit_reference(reference, ctx.data.train, n_samples=n, generator=torch.Generator().manual_seed(0))
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

    def __init__(self, ctx: "RunContext", path: str):
        self.memorized, self.path = ctx.memorized, path
        self.reference = copy.deepcopy(ctx.model).eval()  # θ_0: the online model as the phase starts
        names = ctx.cfg.measure.detectors
        fit = cached_reference_fit(ctx, self.reference) if any(DETECTORS[n].needs_fit for n in names) else None
        self.detectors = build_detectors(names, fit)
        self.scores = {d.name: {"poison": [], "clean": [], "noise": []} for d in self.detectors}

    @classmethod
    def from_context(cls, ctx: "RunContext", out: str) -> "DetectorScores | None":
        if not ctx.cfg.measure.detectors:
            return None
        if ctx.memorized is None and any(n.startswith("md") for n in ctx.cfg.measure.detectors):
            raise UserError("--detectors md, md_reverse and md_js need the memorized model; pass --memorized_model")
        return cls(ctx, os.path.join(out, "detectors.jsonl"))

    def measure(self, run: "OnlineRun", a: "Arrival") -> dict:
        """One forward pass per model over the three batches together, then each batch scored on its own (the
        spectral and clustering detectors look within a batch)."""
        kinds = (("poison", a.x_in, a.mask), ("clean", a.x, None), ("noise", a.noisy, a.mask))
        whole = batch_view(run.ctx.model, self.memorized, self.reference, torch.cat([x for _, x, _ in kinds]),
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

    def __init__(self, ctx: "RunContext"):
        from utils.context import load_memorized_model  # the loader of the memorized model, checks included

        loaded = {p: load_memorized_model(p, ctx.spec, ctx.checkpoint, ctx.cfg.run.allow_other_run)
                  for p in ctx.cfg.measure.md_curve}
        self.models = {p: model.to(ctx.device) for p, (model, _) in loaded.items()}
        self.epochs = {p: epoch for p, (_, epoch) in loaded.items()}
        self.values = {p: {"poison": [], "clean": [], "noise": []} for p in self.models}

    @classmethod
    def from_context(cls, ctx: "RunContext", out: str) -> "MDCurve | None":
        return cls(ctx) if ctx.cfg.measure.md_curve else None

    def measure(self, run: "OnlineRun", a: "Arrival") -> dict:
        for kind, x, keep in (("poison", a.x_in, a.mask), ("clean", a.x, None), ("noise", a.noisy, a.mask)):
            mds = memorization_discrepancies(run.ctx.model, list(self.models.values()), x)
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
