"""The papers' claims as paired effects with 95 % confidence intervals over replicates, and a verdict each.

A replicate is one (burn-in seed, online seed) pair; every row of a preset runs on the same replicates, so an
effect is a difference between two rows (or a row and a constant) on the same replicate: the same starting model
and the same draws. The design is two-level (each burn-in carries several online seeds), so the interval is a t
interval over the burn-ins' means (df = burn-ins - 1): the burn-in is a random factor as much as the seed, and
replicates of one burn-in are not independent. With a single burn-in it is a t interval over the seeds, and it
then speaks for that starting model only.

Verdict against the claim's threshold θ (the effect must exceed θ): *holds* when the interval lies above θ, *does
not hold* when it lies below θ, *inconclusive* when it contains θ.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

from scipy import stats

Summary = dict
Replicate = tuple[int, int]  # (burn-in seed, online seed)


def trigger_drop(s: Summary) -> float:
    """The trigger's drop in accuracy points (SPEC "The attack", step 3)."""
    return 100.0 * (s["err_after_trigger"] - s["err_before_trigger"])


def md_auroc(s: Summary) -> float | None:
    """MD's AUROC, poisoned against the same samples clean."""
    return s.get("md_auroc_poison_vs_clean")


def detector_auroc(name: str) -> Callable[[Summary], float | None]:
    """A detector's AUROC, poisoned against clean, from a run's summary."""
    return lambda s: (s.get("detectors") or {}).get(name, {}).get("auroc_poison_vs_clean")


@dataclass(frozen=True)
class Claim:
    """effect = metric(row) − metric(control) (or − ``constant``) per replicate; the claim: effect > threshold."""

    key: str
    paper: str
    text: str
    row: str
    metric: Callable[[Summary], float | None]
    control: str | None = None
    control_metric: Callable[[Summary], float | None] | None = None
    constant: float = 0.0
    threshold: float = 0.0
    unit: str = "pts"

    def effects(self, groups: dict[str, dict[Replicate, Summary]]) -> dict[Replicate, float]:
        """The paired effect of every replicate that both sides have."""
        treat = groups.get(self.row, {})
        control = groups.get(self.control, {}) if self.control else None
        out = {}
        for rep, s in treat.items():
            a = self.metric(s)
            b = self.constant if control is None else (
                (self.control_metric or self.metric)(control[rep]) if rep in control else None)
            if a is not None and b is not None:
                out[rep] = a - b
        return out


DATA_LEVEL = ("loss", "grad_norm", "confidence", "kd", "lid", "mahalanobis", "spectral", "activation_clustering")
ATTACK, DEFENCE = "Pang et al. 2021", "Zhu et al. 2023"


def paper_claims(adaptive_row: str | None) -> list[Claim]:
    """The claims of the two papers that the cpu preset's rows can test (thresholds stated in each)."""
    claims = [
        Claim("attack_vs_trigger_alone", ATTACK, "the poisoned trigger drops accuracy more after the accumulative "
              "phase than alone, by more than 1 point", "ST", trigger_drop, "ST (trigger alone)", threshold=1.0),
        Claim("attack_vs_clean_stream", ATTACK, "the poisoned trigger drops accuracy more after the accumulative "
              "phase than after a clean stream, by more than 1 point", "ST", trigger_drop,
              "ST (clean stream + trigger)", threshold=1.0),
        Claim("dsc_paper_vs_st", DEFENCE, "DSC (paper's τ) keeps the trigger's drop smaller than ST, by more than "
              "1 point", "ST", trigger_drop, "DSC (paper's τ)", threshold=1.0),
        Claim("dsc_calibrated_vs_st", DEFENCE, "DSC (calibrated τ) keeps the trigger's drop smaller than ST, by "
              "more than 1 point", "ST", trigger_drop, "DSC (calibrated τ)", threshold=1.0),
        Claim("at_authors_vs_st", DEFENCE, "the authors' AT keeps the trigger's drop smaller than ST, by more than "
              "1 point", "ST", trigger_drop, "AT (authors': CE+KL descent)", threshold=1.0),
        Claim("md_separates", DEFENCE, "MD separates poisoned from clean samples (AUROC above 0.5)", "ST", md_auroc,
              threshold=0.5, unit="AUROC"),
    ]
    claims += [Claim(f"md_beats_{name}", DEFENCE, f"MD separates them better than {name} (AUROC difference above "
                     f"0, same samples)", "ST", md_auroc, "ST", detector_auroc(name), unit="AUROC")
               for name in DATA_LEVEL]
    if adaptive_row:
        claims.append(Claim("adaptive_lowers_md", "this project", f"an attacker who knows MD lowers its AUROC "
                            f"({adaptive_row.split(', ')[-1]})", "ST", md_auroc, adaptive_row, unit="AUROC"))
    return claims


@dataclass(frozen=True)
class Interval:
    """A mean effect, its 95 % interval, and what it rests on."""

    mean: float
    low: float
    high: float
    replicates: int
    burn_ins: int
    method: str


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t interval of the mean of ``values`` (at least two)."""
    m = statistics.fmean(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def paired_interval(effects: dict[Replicate, float], level: float = 0.95) -> Interval | None:
    """The 95 % interval of the mean effect: t over the burn-ins' means (several burn-ins), else t over the seeds;
    None with fewer than two units."""
    by_burn_in: dict[int, list[float]] = {}
    for (b, _), v in sorted(effects.items()):
        by_burn_in.setdefault(b, []).append(v)
    if len(by_burn_in) >= 2:
        units, method = [statistics.fmean(v) for v in by_burn_in.values()], f"t over {len(by_burn_in)} burn-in means"
    else:
        units, method = list(effects.values()), f"t over {len(effects)} seeds of one burn-in"
    if len(units) < 2:
        return None
    m, lo, hi = t_interval(units, level)
    return Interval(m, lo, hi, len(effects), len(by_burn_in), method)


def verdict(interval: Interval | None, threshold: float) -> str:
    """holds / does not hold / inconclusive (the interval above, below, or around the threshold)."""
    if interval is None:
        return "not measured"
    if interval.low > threshold:
        return "holds"
    if interval.high < threshold:
        return "does not hold"
    return "inconclusive"


CLAIM_COLUMNS = {"key": "id", "paper": "paper", "claim": "claim", "effect": "effect (mean)", "ci": "95 % interval",
                 "threshold": "threshold", "replicates": "replicates (burn-ins)", "verdict": "verdict"}


def claim_rows(claims: list[Claim], groups: dict[str, dict[Replicate, Summary]]) -> list[dict]:
    """One row per claim: the mean paired effect, its interval, the threshold and the verdict."""
    rows = []
    for c in claims:
        iv = paired_interval(c.effects(groups))
        digits = 1 if c.unit == "pts" else 3
        sign = "+" if c.control or c.constant else ""  # a difference is signed, a plain AUROC is not
        rows.append({"key": c.key, "paper": c.paper, "claim": c.text, "unit": c.unit, "threshold": f"> {c.threshold:g}",
                     "effect": "" if iv is None else f"{iv.mean:{sign}.{digits}f} {c.unit}",
                     "ci": "" if iv is None else f"[{iv.low:{sign}.{digits}f}, {iv.high:{sign}.{digits}f}]",
                     "mean": None if iv is None else iv.mean, "low": None if iv is None else iv.low,
                     "high": None if iv is None else iv.high,
                     "replicates": "" if iv is None else f"{iv.replicates} ({iv.burn_ins})",
                     "method": "" if iv is None else iv.method, "verdict": verdict(iv, c.threshold)})
    return rows
