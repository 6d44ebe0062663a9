"""The reproduction's table and plots from the runs' summary.json / steps.jsonl / md.jsonl files."""
from __future__ import annotations

import csv
import os
import statistics
from typing import Sequence

import numpy as np

from utils.results import read_jsonl


def mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """'m ± s' over seeds (just 'm' for one value; '' when there is none)."""
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


COLUMNS = ("defence", "seeds", "acc_burn_in", "acc_end_accumulative", "acc_after_trigger", "trigger_drop",
           "total_drop", "steps", "md_auroc_poison_vs_clean", "md_auroc_poison_vs_noise", "dsc_mean_steps")


def table_rows(groups: dict[str, list[dict]]) -> list[dict]:
    """One row per defence from its runs' summaries: accuracies in %, mean ± std over seeds."""
    rows = []
    for name, runs in groups.items():
        acc = lambda key: [1.0 - r[key] for r in runs]  # noqa: E731
        rows.append({
            "defence": name,
            "seeds": len(runs),
            "acc_burn_in": mean_std(acc("err_burn_in"), 100),
            "acc_end_accumulative": mean_std(acc("err_before_trigger"), 100),
            "acc_after_trigger": mean_std(acc("err_after_trigger"), 100),
            "trigger_drop": mean_std([r["err_after_trigger"] - r["err_before_trigger"] for r in runs], 100),
            "total_drop": mean_std([r["err_after_trigger"] - r["err_burn_in"] for r in runs], 100),
            "steps": mean_std([r["steps"] for r in runs]),
            "md_auroc_poison_vs_clean": mean_std([r.get("md_auroc_poison_vs_clean") for r in runs], digits=3),
            "md_auroc_poison_vs_noise": mean_std([r.get("md_auroc_poison_vs_noise") for r in runs], digits=3),
            "dsc_mean_steps": mean_std([r.get("dsc_mean_steps") for r in runs], digits=2),
        })
    return rows


HEADERS = {"defence": "defence", "seeds": "seeds", "acc_burn_in": "acc. after burn-in (%)",
           "acc_end_accumulative": "acc. end of accumulative phase (%)", "acc_after_trigger": "acc. after trigger (%)",
           "trigger_drop": "trigger's drop (pts)", "total_drop": "drop from burn-in (pts)", "steps": "steps",
           "md_auroc_poison_vs_clean": "MD AUROC poison vs clean", "md_auroc_poison_vs_noise": "MD AUROC poison vs noise",
           "dsc_mean_steps": "DSC steps / batch"}


def write_table(rows: list[dict], folder: str, title: str) -> str:
    """Write table.md and table.csv; return the Markdown."""
    with open(os.path.join(folder, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    md = [f"### {title}", "", "| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
          "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text)
    return text


def make_plots(runs: dict[str, str], folder: str) -> list[str]:
    """Accuracy over the stream, mean MD per batch, MD histogram (PNG); [] with a note if matplotlib is missing.

    ``runs`` maps a label (ST, AT, DSC, ...) to the folder of one run (the first seed).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plots were drawn (pip install matplotlib)")
        return []
    import json

    written = []
    markers = dict(zip(runs, "os^Dvx"))  # identical runs (e.g. DSC that never corrects = ST) stay visible
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in runs.items():
        summary = json.load(open(os.path.join(run, "summary.json")))
        steps = read_jsonl(os.path.join(run, "steps.jsonl")) if os.path.exists(os.path.join(run, "steps.jsonl")) else []
        xs = [0] + [s["t"] + 1 for s in steps]
        acc = [100 * (1 - summary["err_burn_in"])] + [100 * (1 - s["test_err"]) for s in steps]
        line, = ax.plot(xs, acc, marker=markers[label], markersize=4, markerfacecolor="none", label=label)
        t = summary["steps"]
        ax.plot([t, t + 1], [100 * (1 - summary["err_before_trigger"]), 100 * (1 - summary["err_after_trigger"])],
                "v--", color=line.get_color())
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("arriving batch (dashed: the trigger step)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy over the stream under accumulative poisoning")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(folder, "accuracy.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    md_runs = {k: v for k, v in runs.items() if os.path.exists(os.path.join(v, "md.jsonl"))}
    if md_runs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, run in md_runs.items():
            rows = read_jsonl(os.path.join(run, "md.jsonl"))
            ts = [r["t"] for r in rows]
            line, = ax.plot(ts, [np.mean(r["poison"]) for r in rows], marker=markers[label], markersize=4,
                            markerfacecolor="none", label=f"{label}: poisoned batch")
            ax.plot(ts, [np.mean(r["clean"]) for r in rows], ":", color=line.get_color(),
                    label=f"{label}: same batch, clean")
        ax.set_xlabel("arriving batch")
        ax.set_ylabel("mean MD = KL(p_mem || p_cur)")
        ax.set_title("Memorization Discrepancy of arriving batches")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(folder, "md_over_stream.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

        label, run = next(iter(md_runs.items()))
        rows = read_jsonl(os.path.join(run, "md.jsonl"))
        fig, ax = plt.subplots(figsize=(7, 4))
        values = {k: np.concatenate([r[k] for r in rows]) for k in ("clean", "noise", "poison")}
        bins = np.linspace(0, np.quantile(np.concatenate(list(values.values())), 0.99) + 1e-9, 40)
        for k, v in values.items():
            ax.hist(v, bins=bins, histtype="step", linewidth=1.8, label={"clean": "clean samples", "noise": "random ±ε noise",
                                                    "poison": "poisoned samples"}[k])
        ax.set_xlabel("per-sample MD")
        ax.set_ylabel("samples")
        ax.set_title(f"MD of poisoned vs clean samples over the stream ({label})")
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(folder, "md_histogram.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
