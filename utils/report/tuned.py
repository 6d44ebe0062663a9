"""The tuned attacker's reports (SPEC "The tuned attacker"; utils/sweep/tune.py runs the study): a trial's two
values, the rule that picks the front's points to confirm, the front (every trial), the table of the authors'
attacker against each confirmed tuned attacker on the held-out replicates, and the figure of the fronts.

Every finding is the confirmation's: the paired effect (the trigger's drop after the accumulative phase minus the
trigger alone) with its 95 % interval and the verdict of the attack paper's claim (threshold 1 point), the
accumulative phase's cost (stealth) with its interval, the tuned attacker's effect minus the authors' (paired, same
replicates), and MD's AUROC on the defended runs with how much the tuned attacker lowered it. The search's own
values (on its few replicates, and selected as the best of many) are shown, never judged.
"""
from __future__ import annotations

import math
import os
import statistics

from utils.io.results import read_json, write_json
from utils.report import plots
from utils.report.ablation import STEALTH_POINTS, accumulative_cost, stealth
from utils.report.claims import ATTACK, DEFENCE, Claim, claim_rows, md_auroc, trigger_drop
from utils.report.tables import write_table
from utils.sweep.tune import DEFENCES, SPACE, Groups

EFFECT_THRESHOLD = 1.0  # the attack paper's claim: more than 1 point beyond the trigger alone
RULE = (f"confirmed: the front's point of highest search effect among those of search cost < {STEALTH_POINTS:g} pts "
        f"(stealthy), and the point of highest search effect overall (strongest), when it is another")


def effect_claim(row: str, control: str) -> Claim:
    """The trigger's drop after the accumulative phase minus the trigger alone, per replicate."""
    return Claim("effect_vs_trigger_alone", ATTACK, "the poisoned trigger drops accuracy more after the accumulative "
                 "phase than alone, by more than 1 point", row, trigger_drop, control, threshold=EFFECT_THRESHOLD)


def trial_values(groups: Groups, row: str, control: str) -> tuple[float, float]:
    """A trial's two values (SPEC "The tuned attacker"; points, means over the search replicates): the paired effect
    and the accumulative phase's own accuracy cost; NaN where nothing was measured."""
    effects = effect_claim(row, control).effects(groups)
    costs = [accumulative_cost(s) for s in groups.get(row, {}).values()]
    return (statistics.fmean(effects.values()) if effects else math.nan,
            statistics.fmean(costs) if costs else math.nan)


def chosen_points(trials: list[dict], stealth_points: float = STEALTH_POINTS) -> list[tuple[str, dict]]:
    """RULE (SPEC "The tuned attacker", confirmation): (name, trial) of the stealthy point (highest effect at cost < ``stealth_points``) and the strongest
    (highest effect), the latter only when it is another trial; both lie on the front."""
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    stealthy = [t for t in complete if t["cost"] < stealth_points]
    picks = []
    if stealthy:
        picks.append(("stealthy", max(stealthy, key=lambda t: (t["effect"], -t["number"]))))
    if complete:
        strongest = max(complete, key=lambda t: (t["effect"], -t["number"]))
        if not picks or strongest["number"] != picks[0][1]["number"]:
            picks.append(("strongest", strongest))
    return picks


def _fmt(value: float | None, digits: int = 2, sign: str = "+") -> str:
    return "" if value is None else f"{value:{sign}.{digits}f}"


def knob_text(value: object) -> str:
    """A knob's value as the tables show it (floats to 3 significant digits)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


FRONT = {"number": "trial", "front": "on the front", "authors": "the authors' attacker", "effect": "effect (pts)",
         "cost": "cost (pts)", **{k.name: k.name for k in SPACE}, "seconds": "seconds", "fail_reason": "failed because",
         "runs": "runs"}


def write_front(trials: list[dict], folder: str, title: str) -> str:
    """front.md/.csv (every answered trial: its knobs, values, Pareto flag) and front.json."""
    rows = [{**{k: knob_text(v) for k, v in t["params"].items()}, "number": t["number"],
             "front": "yes" if t["pareto"] else "", "authors": "yes" if t["authors"] else "",
             "effect": _fmt(t["effect"]), "cost": _fmt(t["cost"], sign=""),
             "seconds": "" if t.get("seconds") is None else f"{t['seconds']:.0f}",
             "fail_reason": t["fail_reason"], "runs": t["runs"]} for t in trials]
    write_json(os.path.join(folder, "front.json"), trials)
    return write_table(rows, FRONT, folder, "front", title)


def _cell(row: dict) -> str:
    """A claim row as 'effect [low, high] verdict'."""
    return f"{row['effect'].split(' ')[0]} {row['ci']} {row['verdict']}" if row["effect"] else row["verdict"]


def compared(tuned: Groups, authors: Groups, row: str, control: str) -> tuple[dict, dict]:
    """The tuned attacker against the authors' on the same replicates: its effect minus theirs (claim: above 0),
    and MD's AUROC on the defended runs, theirs minus the tuned one's (claim: the tuned attacker lowers it)."""
    claim = effect_claim(row, control)
    both = {name: {rep: {"effect": v} for rep, v in claim.effects(g).items()}
            for name, g in (("tuned", tuned), ("authors", authors))}
    stronger = claim_rows([Claim("tuned_vs_authors", "this project", "the tuned attacker's effect exceeds the "
                                 "authors'", "tuned", lambda s: s["effect"], "authors")], both)[0]
    md = {"authors": authors.get(row, {}), "tuned": tuned.get(row, {})}
    lowers = claim_rows([Claim("tuned_lowers_md", DEFENCE, "the tuned attacker lowers MD's AUROC", "authors",
                               md_auroc, "tuned", unit="AUROC")], md)[0]
    return stronger, lowers


def attacker_row(name: str, trial: dict | None, groups: Groups, authors: Groups, row: str, control: str) -> dict:
    """One row of a defence's table: an attacker on the held-out replicates."""
    effect = claim_rows([effect_claim(row, control)], groups)[0]
    md = claim_rows([Claim("md", DEFENCE, "MD's AUROC", row, md_auroc, threshold=0.5, unit="AUROC")], groups)[0]
    text, verdict, iv = stealth({"ST": groups.get(row, {})})
    out = {"attacker": "the authors'" if trial is None else f"tuned: {name} (trial {trial['number']})",
           "settings": "" if trial is None else ", ".join(f"{k}={knob_text(v)}" for k, v in trial["params"].items()),
           "search_effect": "" if trial is None else _fmt(trial["effect"]),
           "search_cost": "" if trial is None else _fmt(trial["cost"], sign=""),
           "effect": _cell(effect), "stealth": text, "stealth_verdict": verdict, "md_auroc": _cell(md),
           "drop": _fmt(_mean([trigger_drop(s) for s in groups.get(row, {}).values()]), 1, ""),
           "drop_alone": _fmt(_mean([trigger_drop(s) for s in groups.get(control, {}).values()]), 1, ""),
           "replicates": effect["replicates"], "effect_mean": effect["mean"], "effect_low": effect["low"],
           "effect_high": effect["high"], "effect_verdict": effect["verdict"], "md_mean": md["mean"],
           "stealth_mean": None if iv is None else iv.mean, "stealth_low": None if iv is None else iv.low,
           "stealth_high": None if iv is None else iv.high}
    if trial is not None:
        stronger, lowers = compared(groups, authors, row, control)
        out.update(vs_authors=_cell(stronger), md_lowered=_cell(lowers), vs_authors_mean=stronger["mean"],
                   vs_authors_verdict=stronger["verdict"], md_lowered_mean=lowers["mean"])
    return out


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


TABLE = {"attacker": "attacker", "settings": "settings", "search_effect": "search: effect (pts)",
         "search_cost": "search: cost (pts)", "effect": "effect vs trigger alone (pts) [95 %] verdict (> 1)",
         "vs_authors": "tuned − authors' effect (pts) [95 %] verdict (> 0)", "drop": "trigger's drop after the phase",
         "drop_alone": "trigger alone", "stealth": "accumulative cost (pts) [95 %]",
         "stealth_verdict": f"stealthy (< {STEALTH_POINTS:g} pts)", "md_auroc": "MD AUROC [95 %] verdict (> 0.5)",
         "md_lowered": "MD AUROC lowered by (authors' − tuned) [95 %] verdict (> 0)",
         "replicates": "replicates (burn-ins)"}


def defence_rows(trials_chosen: list[tuple[str, dict]], confirmed: dict[str, Groups], row: str,
                 control: str) -> list[dict]:
    """The authors' attacker, then each confirmed tuned one."""
    authors = confirmed["authors"]
    rows = [attacker_row("authors", None, authors, authors, row, control)]
    rows += [attacker_row(name, trial, confirmed[name], authors, row, control) for name, trial in trials_chosen]
    return rows


def write_defence_reports(defence: str, folder: str, trials: list[dict], chosen: list[tuple[str, dict]],
                          confirmed: dict[str, Groups], row: str, control: str, split: dict) -> str:
    """<folder>/front.*, table.md/.csv/.json and fronts.png of one defence; returns the text to print."""
    write_front(trials, folder, f"Tuned attacker against {defence}: every trial on the search replicates "
                        f"{split['search']} (values: means; front: Pareto-optimal)")
    rows = defence_rows(chosen, confirmed, row, control)
    title = (f"{defence}: the authors' attacker against the tuned one on the held-out replicates "
             f"{split['confirm']} (paired effects [95 % interval] verdict; {RULE})")
    table = write_table(rows, TABLE, folder, "table", title)
    write_json(os.path.join(folder, "table.json"), {"defence": defence, "row": row, "control": control,
                                                    "rule": RULE, "split": split, "trials": len(trials),
                                                    "rows": rows})
    plt = plots.pyplot()
    if plt is not None:
        plot_fronts(plt, [(defence, trials, rows)], os.path.join(folder, "fronts.png"))
    on_front = sum(t["pareto"] for t in trials)
    return f"{table}\nthe front: {os.path.join(folder, 'front.md')} ({len(trials)} trials, {on_front} on the front)\n"


def _front_line(trials: list[dict]) -> tuple[list[float], list[float]]:
    """The Pareto front as a staircase, by cost."""
    front = sorted((t["cost"], t["effect"]) for t in trials if t["pareto"])
    return [c for c, _ in front], [e for _, e in front]


def plot_fronts(plt, panels: list[tuple[str, list[dict], list[dict]]], path: str) -> str:
    """Per defence, search cost against search effect of every trial, the front highlighted, the authors' attacker
    marked; the confirmed attackers' held-out means with their 95 % intervals."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (defence, trials, rows) in zip(axes[0], panels):
        done = [t for t in trials if t["state"] == "COMPLETE"]
        ax.scatter([t["cost"] for t in done], [t["effect"] for t in done], s=14, c="0.6", label="trial (search)")
        ax.step(*_front_line(done), where="post", c="C0", marker="o", label="front (search)")
        for t in (t for t in done if t["authors"]):
            ax.scatter([t["cost"]], [t["effect"]], marker="*", s=180, c="C3", zorder=3, label="authors' (search)")
        for i, r in enumerate(rows):
            if r["effect_mean"] is None or r["stealth_mean"] is None:
                continue
            ax.errorbar([r["stealth_mean"]], [r["effect_mean"]], fmt="D", ms=6, capsize=3, c=f"C{3 if i == 0 else i}",
                        yerr=[[r["effect_mean"] - r["effect_low"]], [r["effect_high"] - r["effect_mean"]]],
                        xerr=[[r["stealth_mean"] - r["stealth_low"]], [r["stealth_high"] - r["stealth_mean"]]],
                        label=f"{r['attacker']} (held-out)")
        ax.axvline(STEALTH_POINTS, ls="--", c="0.4", lw=0.8)
        ax.axhline(EFFECT_THRESHOLD, ls=":", c="0.4", lw=0.8)
        ax.set(title=defence, xlabel="accumulative cost (pts, lower: stealthier)",
               ylabel="effect vs trigger alone (pts)")
        ax.legend(fontsize=6, loc="best")
    return plots.save_figure(plt, fig, path)


def write_overview(root: str) -> str:
    """<root>/table.md/.csv (every defence's table, one after the other) and <root>/fronts.png (one panel per
    defence), from the defences that have been tuned."""
    rows, panels = [], []
    for defence in DEFENCES:
        path = os.path.join(root, defence, "table.json")
        if not os.path.isfile(path):
            continue
        table = read_json(path)
        rows += [{"defence": defence, **r} for r in table["rows"]]
        panels.append((defence, read_json(os.path.join(root, defence, "front.json")), table["rows"]))
    text = write_table(rows, {"defence": "defence", **TABLE}, root, "table",
                       f"Every defence against its tuned attacker, on the held-out replicates ({RULE})")
    plt = plots.pyplot()
    if plt is not None and panels:
        plot_fronts(plt, panels, os.path.join(root, "fronts.png"))
    return text
