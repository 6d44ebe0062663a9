"""The reproduction's figures (PNG, matplotlib optional): accuracy over the stream, MD over the stream and its
histogram, the detectors' ROC curves, MD's AUROC by the memorized model's epoch."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from utils.io.results import atomic_write, read_jsonl

LABELS = {"clean": "clean samples", "noise": "random ±ε noise", "poison": "poisoned samples"}


def pyplot() -> Any | None:
    """matplotlib.pyplot with the file backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plots were drawn (pip install matplotlib)")
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: str) -> str:
    """Write a figure as PNG through the one atomic writer (a full disk leaves no half-drawn file), and close it."""
    try:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path


def _steps(run: str) -> list[dict]:
    path = os.path.join(run, "steps.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def plot_accuracy(plt: Any, runs: dict[str, str], summaries: dict[str, dict], path: str) -> str:
    """Test accuracy over the stream per run, the trigger step dashed (identical runs stay visible by marker)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, run), marker in zip(runs.items(), "os^Dvx<>ph*"):
        steps, s = _steps(run), summaries[label]
        acc = [100 * (1 - s["err_burn_in"])] + [100 * (1 - x["test_err"]) for x in steps]
        line, = ax.plot(range(len(acc)), acc, marker=marker, markersize=4, markerfacecolor="none", label=label)
        ax.plot([s["steps"], s["steps"] + 1], [100 * (1 - s["err_before_trigger"]), 100 * (1 - s["err_after_trigger"])],
                "v--", color=line.get_color())
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="arriving batch (dashed: the trigger step)", ylabel="test accuracy (%)",
           title="Test accuracy over the stream under accumulative poisoning")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def plot_md_over_stream(plt: Any, runs: dict[str, str], path: str) -> str:
    """Mean MD of each arriving batch, poisoned vs the same batch clean."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, run), marker in zip(runs.items(), "os^Dvx<>ph*"):
        rows = read_jsonl(os.path.join(run, "md.jsonl"))
        ts = [r["t"] for r in rows]
        line, = ax.plot(ts, [np.mean(r["poison"]) for r in rows], marker=marker, markersize=4, markerfacecolor="none",
                        label=f"{label}: poisoned batch")
        ax.plot(ts, [np.mean(r["clean"]) for r in rows], ":", color=line.get_color(), label=f"{label}: same, clean")
    ax.set(xlabel="arriving batch", ylabel="mean MD = KL(p_mem || p_cur)",
           title="Memorization Discrepancy of arriving batches")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def plot_md_histogram(plt: Any, label: str, run: str, path: str) -> str:
    """Per-sample MD of poisoned, clean and randomly perturbed samples over one run's stream."""
    rows = read_jsonl(os.path.join(run, "md.jsonl"))
    values = {k: np.concatenate([r[k] for r in rows]) for k in ("clean", "noise", "poison")}
    bins = np.linspace(0, np.quantile(np.concatenate(list(values.values())), 0.99) + 1e-9, 40)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, v in values.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.8, label=LABELS[k])
    ax.set(xlabel="per-sample MD", ylabel="samples", title=f"MD of poisoned vs clean samples over the stream ({label})")
    ax.legend()
    return save_figure(plt, fig, path)


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold 'score ≥ t', from (0, 0) to (1, 1) (SPEC "Detectors", evaluating)."""
    scores = np.concatenate([positive, negative])
    is_pos = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], is_pos[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the end of each run of equal scores
    tpr, fpr = np.cumsum(p)[last] / len(positive), np.cumsum(1 - p)[last] / len(negative)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def plot_roc(plt: Any, runs: list[str], path: str) -> str | None:
    """One panel per detector: ROC of poisoned vs clean and vs noise samples, pooled over the runs (seeds)."""
    lines = [line for run in runs if os.path.exists(os.path.join(run, "detectors.jsonl"))
             for line in read_jsonl(os.path.join(run, "detectors.jsonl"))]
    names = [k for k in (lines[0] if lines else {}) if k != "t"]
    if not names:
        return None
    cols = 4
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(3.2 * cols, 3.0 * -(-len(names) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        pooled = {k: np.concatenate([line[name][k] for line in lines]) for k in ("poison", "clean", "noise")}
        for other in ("clean", "noise"):
            fpr, tpr = roc_curve(pooled["poison"], pooled[other])
            ax.plot(fpr, tpr, label=f"vs {other}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(title=name, xlabel="false-positive rate", ylabel="true-positive rate")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return save_figure(plt, fig, path)


def plot_md_curve(plt: Any, rows: list[dict], path: str) -> str | None:
    """MD's AUROC (mean over seeds) by the memorized model's epoch."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("auroc_poison_vs_clean", "poisoned vs clean"), ("auroc_poison_vs_noise", "poisoned vs noise")):
        pts = [(r["epoch"], float(r[key].split(" ± ")[0])) for r in rows if r[key]]
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.axhline(0.5, color="grey", linestyle=":")
    ax.set(xlabel="epoch of the memorized model", ylabel="MD AUROC", title="MD's separation by the memorized epoch")
    ax.legend()
    return save_figure(plt, fig, path)


def plot_ablation(plt: Any, rows: list[dict], claims: tuple[str, ...], stealth_points: float, path: str) -> str:
    """Each claim's paired effect with its 95 % interval at every step of an ablation (left), and the accumulative
    phase's own cost (right), the thresholds dashed."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(rows))
    for i, (key, marker) in enumerate(zip(claims, "os^Dv")):
        xs = x + (i - (len(claims) - 1) / 2) * 0.1
        pts = [(xi, r[f"{key}_mean"], r[f"{key}_low"], r[f"{key}_high"]) for xi, r in zip(xs, rows)
               if r.get(f"{key}_mean") is not None]
        if pts:
            px, m, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(px, m, yerr=[m - lo, hi - m], fmt=marker, capsize=3, label=key, markerfacecolor="none")
    ax.axhline(1.0, ls="--", color="grey", lw=1)
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set(ylabel="paired effect (pts), 95 % interval", title="claims along the ablation (threshold: 1 pt)")
    pts = [(xi, r["stealth_mean"], r["stealth_low"], r["stealth_high"]) for xi, r in zip(x, rows)
           if r.get("stealth_mean") is not None]
    if pts:
        px, m, lo, hi = map(np.array, zip(*pts))
        bx.errorbar(px, m, yerr=[m - lo, hi - m], fmt="o", capsize=3, color="C3")
    bx.axhline(stealth_points, ls="--", color="grey", lw=1)
    bx.set(ylabel="accuracy cost of the accumulative phase (pts)", title=f"stealth (stealthy: < {stealth_points:g})")
    for a in (ax, bx):
        a.set_xticks(x, [r["step"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)
