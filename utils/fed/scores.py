"""Per-update screening scores (SPEC "Federated learning", the scores): for every update of a round, how suspicious
each rule finds it (higher = more suspicious), and the AUROC of malicious against honest updates per score."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from utils.core.metrics import auroc
from utils.fed.aggregators import RoundView, cosines, krum_scores, robust_z

SCORES: dict[str, Callable[[RoundView, int], torch.Tensor]] = {
    "norm": lambda view, f: view.norms,  # ‖Δ_k‖ (norm clipping's statistic)
    "cosine": lambda view, f: 1.0 - cosines(view.updates, view.updates.mean(dim=0)),  # 1 − cos(Δ_k, mean update)
    "krum": lambda view, f: krum_scores(view, f),  # Krum's score
    "fltrust": lambda view, f: 1.0 - cosines(view.updates, view.root_update()),  # 1 − FLTrust's trust before ReLU
    "md": lambda view, f: robust_z(view.md()).abs(),  # |robust z| of MD: the MD screen's statistic
}


def update_scores(view: RoundView, krum_f: int) -> dict[str, list[float]]:
    """Every score of every update of the round, and the raw MD (``md_raw``)."""
    out = {name: [float(v) for v in fn(view, krum_f)] for name, fn in SCORES.items()}
    out["md_raw"] = [float(v) for v in view.md()]
    return out


def round_aurocs(scores: dict[str, list[float]], malicious: list[int]) -> dict[str, float] | None:
    """Per score, the AUROC of the malicious updates against the honest ones of one round (None without both)."""
    n = len(next(iter(scores.values())))
    bad = set(malicious)
    honest = [k for k in range(n) if k not in bad]
    if not bad or not honest:
        return None
    return {name: auroc(np.asarray([v[k] for k in sorted(bad)]), np.asarray([v[k] for k in honest]))
            for name, v in scores.items() if name in SCORES}


def mean_aurocs(per_round: list[dict[str, float] | None]) -> dict[str, float] | None:
    """The mean over rounds of each score's per-round AUROC (None when no round had both kinds of update)."""
    rounds = [r for r in per_round if r is not None]
    if not rounds:
        return None
    return {name: float(np.mean([r[name] for r in rounds])) for name in rounds[0]}
