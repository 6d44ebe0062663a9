"""The reproduction's tables, from the runs' summary.json files: the main table, the detectors, MD by the
memorized model's epoch, the capacity ladder. Each is written as <name>.md and <name>.csv by one writer."""
from __future__ import annotations

import csv
import io
import statistics
from typing import Callable, Sequence

from utils.io.results import write_text


def mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """'m ± s' over replicates (just 'm' for one value; '' when there is none)."""
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def write_table(rows: list[dict], headers: dict[str, str], folder: str, name: str, title: str) -> str:
    """<folder>/<name>.csv (the column keys) and <name>.md (the headers, under a title); returns the Markdown."""
    buffer = io.StringIO()
    w = csv.DictWriter(buffer, list(headers), lineterminator="\n")
    w.writeheader()
    w.writerows([{k: r.get(k, "") for k in headers} for r in rows])
    write_text(f"{folder}/{name}.csv", buffer.getvalue())
    md = [f"### {title}", "", "| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(r.get(k, "")) for k in headers) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    write_text(f"{folder}/{name}.md", text)
    return text


MAIN = {"defence": "defence", "replicates": "replicates", "acc_burn_in": "acc. after burn-in (%)",
        "acc_end_accumulative": "acc. end of accumulative phase (%)", "acc_after_trigger": "acc. after trigger (%)",
        "trigger_drop": "trigger's drop (pts)", "total_drop": "drop from burn-in (pts)", "steps": "steps",
        "md_auroc_poison_vs_clean": "MD AUROC poison vs clean", "md_auroc_poison_vs_noise": "MD AUROC poison vs noise",
        "dsc_mean_steps": "DSC steps / batch"}


def summary_row(name: str, runs: list[dict]) -> dict:
    """One row of the main table from a row's summaries: accuracies in %, mean ± std over replicates."""
    acc: Callable[[str], list[float]] = lambda key: [1.0 - r[key] for r in runs]  # noqa: E731
    return {"defence": name, "replicates": len(runs),
            "acc_burn_in": mean_std(acc("err_burn_in"), 100),
            "acc_end_accumulative": mean_std(acc("err_before_trigger"), 100),
            "acc_after_trigger": mean_std(acc("err_after_trigger"), 100),
            "trigger_drop": mean_std([r["err_after_trigger"] - r["err_before_trigger"] for r in runs], 100),
            "total_drop": mean_std([r["err_after_trigger"] - r["err_burn_in"] for r in runs], 100),
            "steps": mean_std([r["steps"] for r in runs]),
            "md_auroc_poison_vs_clean": mean_std([r.get("md_auroc_poison_vs_clean") for r in runs], digits=3),
            "md_auroc_poison_vs_noise": mean_std([r.get("md_auroc_poison_vs_noise") for r in runs], digits=3),
            "dsc_mean_steps": mean_std([r.get("dsc_mean_steps") for r in runs], digits=2)}


def table_rows(groups: dict[str, list[dict]]) -> list[dict]:
    """The main table: one row per row label."""
    return [summary_row(name, runs) for name, runs in groups.items()]


DETECTORS = {"detector": "detector", "replicates": "replicates", "auroc_poison_vs_clean": "AUROC poison vs clean",
             "auroc_poison_vs_noise": "AUROC poison vs noise", "tpr_at_5fpr_poison_vs_clean": "TPR at 5 % FPR vs clean",
             "tpr_at_5fpr_poison_vs_noise": "TPR at 5 % FPR vs noise"}


def detector_rows(plain: list[dict], adaptive: dict[str, list[dict]]) -> tuple[list[dict], dict[str, str]]:
    """Per detector: AUROC and TPR at 5 % FPR against the plain attacker's runs (mean ± std over replicates), and the
    AUROC vs clean against each adaptive attacker's runs; returns the rows and their headers."""
    headers = dict(DETECTORS)
    column = {k: "auroc_poison_vs_clean_adaptive_" + k.replace("λ=", "l") for k in adaptive}  # ASCII CSV keys
    headers.update({column[k]: f"AUROC vs clean, adaptive {k}" for k in adaptive})
    rows = []
    for name in (plain[0].get("detectors") or {}) if plain else ():
        row = {"detector": name, "replicates": len(plain)}
        for key in list(DETECTORS)[2:]:
            row[key] = mean_std([r["detectors"][name][key] for r in plain], digits=3)
        for label, runs in adaptive.items():
            row[column[label]] = mean_std([r["detectors"][name]["auroc_poison_vs_clean"] for r in runs
                                                 if name in r.get("detectors", {})], digits=3)
        rows.append(row)
    return rows, headers


MD_CURVE = {"epoch": "memorized epoch", "replicates": "replicates", "auroc_poison_vs_clean": "MD AUROC poison vs clean",
            "auroc_poison_vs_noise": "MD AUROC poison vs noise"}


def md_curve_rows(runs: list[dict]) -> list[dict]:
    """MD's AUROCs by the memorized model's epoch, mean ± std over the runs."""
    by_epoch: dict[int, list[dict]] = {}
    for r in runs:
        for point in r.get("md_curve", []):
            by_epoch.setdefault(point["epoch"], []).append(point)
    return [{"epoch": e, "replicates": len(ps),
             "auroc_poison_vs_clean": mean_std([p["auroc_poison_vs_clean"] for p in ps], digits=3),
             "auroc_poison_vs_noise": mean_std([p["auroc_poison_vs_noise"] for p in ps], digits=3)}
            for e, ps in sorted(by_epoch.items())]


LADDER = {"model": "model", "params": "parameters", "burn_in_acc": "burn-in acc. (%)", "defence": "defence",
          "replicates": "replicates", "drop_trigger_alone": "trigger alone: drop (pts)",
          "drop_clean_stream": "clean stream + trigger: drop (pts)", "trigger_drop": "trigger's drop (pts)",
          "total_drop": "drop from burn-in (pts)", "steps": "steps before the stop",
          "md_auroc_poison_vs_clean": "MD AUROC vs clean", "md_auroc_poison_vs_noise": "MD AUROC vs noise",
          "dsc_mean_steps": "DSC steps / batch", "s_per_batch": "s / arriving batch",
          "split": "craft / defend / measure / eval (s)", "peak_mib": "peak memory (MiB)",
          "craft_floor": "crafting / its floor"}

MEASURE_FIELDS = ("md_s", "md_curve_s", "detectors_s", "alignment_s")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def step_costs(steps: list[dict]) -> dict[str, float | None]:
    """Medians over arriving batches: the whole step and its crafting, defence, measurement, evaluation parts."""
    measure = [sum(s.get(k, 0.0) for k in MEASURE_FIELDS) for s in steps]
    return {"step": _median([s["step_s"] for s in steps]), "craft": _median([s["craft_s"] for s in steps]),
            "defend": _median([s["defend_s"] for s in steps]), "measure": _median(measure),
            "eval": _median([s["eval_s"] for s in steps])}


def ladder_rows(model: str, costs: dict, groups: dict[str, list[dict]], steps: dict[str, list[dict]]) -> list[dict]:
    """The capacity ladder's rows of one model: one per defence (the controls are columns of every row).

    ``costs``: the rung's parameters, peak memory and crafting-to-floor ratio; ``steps``: label -> step records."""
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    controls = {k: mean_std([r["err_after_trigger"] - r["err_before_trigger"] for r in runs], 100)
                for k, runs in groups.items() if k.startswith("ST (")}
    rows = []
    for label, runs in groups.items():
        if label.startswith("ST ("):
            continue
        base, c = summary_row(label, runs), step_costs(steps.get(label, []))
        rows.append({**{k: base[k] for k in ("defence", "replicates", "trigger_drop", "total_drop", "steps",
                                             "md_auroc_poison_vs_clean", "md_auroc_poison_vs_noise",
                                             "dsc_mean_steps")},
                     "model": model, "params": costs.get("params"), "burn_in_acc": base["acc_burn_in"],
                     "drop_trigger_alone": controls.get("ST (trigger alone)", ""),
                     "drop_clean_stream": controls.get("ST (clean stream + trigger)", ""), "s_per_batch": fmt(c["step"]),
                     "split": " / ".join(fmt(c[k]) for k in ("craft", "defend", "measure", "eval")),
                     "peak_mib": f"{costs['peak_mib']:.0f}" if costs.get("peak_mib") else "",
                     "craft_floor": fmt(costs.get("craft_floor_ratio"))})
    return rows
