"""Small statistics used in reports: rank-based AUROC and the TPR at a fixed FPR (SPEC "Detectors")."""
from __future__ import annotations

import math

import numpy as np

from utils.errors import UserError


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½·P(tie): the Mann–Whitney AUROC, ties by average rank."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks (1-based) over runs of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.05) -> float:
    """max TPR subject to FPR ≤ fpr, flagging score ≥ t with t an observed score (SPEC "Detectors"): the share of
    positives strictly above the (k+1)-th highest negative, k = ⌊fpr·n_neg⌋ (1 when k = n_neg); tied negatives
    are flagged together or not at all, so all-equal scores give 0 for fpr < 1."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise UserError("TPR at FPR needs at least one positive and one negative score")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise UserError("TPR at FPR: the scores contain NaN")
    if not 0.0 <= float(fpr) <= 1.0:
        raise UserError(f"the false-positive rate must lie in [0, 1], got {fpr}")
    k = math.floor(float(fpr) * neg.size + 1e-9)  # the tolerance keeps e.g. 0.29·100 at 29
    if k >= neg.size:
        return 1.0
    cut = np.sort(neg)[::-1][k]  # the (k+1)-th highest negative: at most k negatives lie above it
    return float(np.mean(pos > cut))
