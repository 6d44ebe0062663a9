"""An ablation's table and figure (utils/sweep/ablation.py): per step, each claim's paired effect with its 95 %
interval and verdict (the same numbers as the step's own claims.md), the accumulative phase's own cost (stealth),
the trigger's drops, MD's and the best data-level detector's AUROC, the replicates and the compute it cost.

Stealth: the ST row's accuracy cost from the burn-in to the end of the accumulative phase, in points, with its
interval over burn-ins; *stealthy* when the interval lies below ``STEALTH_POINTS`` (2), *not stealthy* when above.
The attack *works* at a step when the claim "the poisoned trigger drops accuracy more after the accumulative
phase than alone" holds and the phase is stealthy.
"""
from __future__ import annotations

import os
import statistics

from utils.io.results import write_json
from utils.report import plots
from utils.report.claims import DATA_LEVEL, Interval, claim_rows, paired_interval, paper_claims, trigger_drop
from utils.report.reproduction import Groups, adaptive_row, write_reports
from utils.report.tables import write_table
from utils.sweep.ablation import Ablation, Step
from utils.sweep.presets import Preset

STEALTH_POINTS = 2.0
KEY_CLAIMS = ("attack_vs_trigger_alone", "attack_vs_clean_stream", "dsc_paper_vs_st", "dsc_calibrated_vs_st",
              "at_authors_vs_st")
COLUMNS = {"step": "step", "changes": "changes (this step)", "note": "distance from the target",
           "replicates": "replicates (burn-ins)", "minutes": "run minutes", "stealth": "accumulative cost (pts)",
           "stealth_verdict": "stealthy (< 2 pts)", "drop_alone": "trigger alone: drop (pts)",
           "drop_st": "ST: trigger's drop (pts)", **{k: k for k in KEY_CLAIMS}, "md_auroc": "MD AUROC",
           "best_detector": "best data-level detector (AUROC)", "works": "attack works"}


def accumulative_cost(s: dict) -> float:
    """Accuracy points the accumulative phase itself cost (burn-in to the end of the phase)."""
    return 100.0 * (s["err_before_trigger"] - s["err_burn_in"])


def _fmt(iv, digits: int = 1, sign: str = "+") -> str:
    return "" if iv is None else f"{iv.mean:{sign}.{digits}f} [{iv.low:{sign}.{digits}f}, {iv.high:{sign}.{digits}f}]"


def stealth(groups: Groups) -> tuple[str, str, Interval | None]:
    """The ST row's accumulative cost as 'mean [low, high]', its verdict, and its interval."""
    iv = paired_interval({rep: accumulative_cost(s) for rep, s in groups.get("ST", {}).items()})
    if iv is None:
        return "", "not measured", None
    verdict = "stealthy" if iv.high < STEALTH_POINTS else "not stealthy" if iv.low > STEALTH_POINTS else "inconclusive"
    return _fmt(iv, sign=""), verdict, iv


def best_detector(st: list[dict]) -> str:
    """The data-level detector with the highest mean AUROC on the ST runs, 'name mean'."""
    means = {n: statistics.fmean(v) for n in DATA_LEVEL
             if (v := [r["detectors"][n]["auroc_poison_vs_clean"] for r in st if n in (r.get("detectors") or {})])}
    if not means:
        return ""
    name = max(means, key=means.get)
    return f"{name} {means[name]:.3f}"


def _mean(values: list[float | None], digits: int) -> str:
    vals = [v for v in values if v is not None]
    return f"{statistics.fmean(vals):.{digits}f}" if vals else ""


def step_row(step: Step, groups: Groups) -> dict:
    """One row of the ablation table."""
    claims = {r["key"]: r for r in claim_rows(paper_claims(adaptive_row(groups)), groups)}
    text, verdict, iv = stealth(groups)
    st = list(groups.get("ST", {}).values())
    main = claims["attack_vs_trigger_alone"]
    row = {"step": step.label, "changes": ", ".join(f"{p}={v}" for p, v in step.changes) or "(the base)",
           "note": step.note, "replicates": main["replicates"], "stealth": text, "stealth_verdict": verdict,
           "minutes": f"{sum(s.get('total_seconds', 0) for reps in groups.values() for s in reps.values()) / 60:.1f}",
           "drop_alone": _mean([trigger_drop(s) for s in groups.get("ST (trigger alone)", {}).values()], 1),
           "drop_st": _mean([trigger_drop(s) for s in st], 1),
           "md_auroc": _mean([s.get("md_auroc_poison_vs_clean") for s in st], 3), "best_detector": best_detector(st),
           "works": "yes" if main["verdict"] == "holds" and verdict == "stealthy" else "no"}
    for key in KEY_CLAIMS:
        c = claims[key]
        row[key] = f"{c['effect'].split(' ')[0]} {c['ci']} {c['verdict']}" if c["effect"] else c["verdict"]
        row[f"{key}_mean"], row[f"{key}_low"], row[f"{key}_high"] = c["mean"], c["low"], c["high"]
    row["stealth_mean"], row["stealth_low"], row["stealth_high"] = (None, None, None) if iv is None else (
        iv.mean, iv.low, iv.high)
    return row


def write_ablation_reports(ab: Ablation, steps: list[tuple[Step, Preset, str]], groups: list[Groups],
                           published_root: str, out: str) -> str:
    """Each step's own reports (claims, table, figures, fingerprint, check), then the ablation's table and figure;
    returns the text to print (the table, then one check line per step)."""
    checks = []
    for (step, preset, step_out), g in zip(steps, groups):
        text = write_reports(preset, step_out, g, os.path.join(published_root, step.slug))
        verdict = next((line.strip() for line in text.splitlines() if "==>" in line or "no published" in line), "")
        checks.append(f"  {step.slug}: {verdict}")
    rows = [step_row(step, g) for (step, _, _), g in zip(steps, groups)]
    title = (f"Ablation {ab.name} ({ab.mode.replace('_', ' ')} from the {ab.base} preset): each claim's paired effect "
             f"[95 % interval] verdict at every step")
    text = write_table(rows, COLUMNS, out, "ablation", title)
    write_json(os.path.join(out, "ablation.json"), {"ablation": ab.name, "mode": ab.mode, "base": ab.base,
                                                   "rows": rows})
    plt = plots.pyplot()
    if plt is not None:
        plots.plot_ablation(plt, rows, KEY_CLAIMS, STEALTH_POINTS, os.path.join(out, "ablation.png"))
    return text + "\nCHECK AGAINST THE PUBLISHED RUNS, per step:\n" + "\n".join(checks) + "\n"
