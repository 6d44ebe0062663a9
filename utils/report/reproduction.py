"""What reproduce.py writes for a preset (its results folder): the claims with their intervals, the per-row table,
the detectors, MD by the memorized epoch, the figures, the fingerprint, and the check against the published runs.
"""
from __future__ import annotations

import dataclasses
import os
import time

from utils.io.results import read_json, write_json, write_text
from utils.report import plots
from utils.report.check import Comparison, burn_in_fingerprint, compare, run_fingerprint
from utils.report.claims import CLAIM_COLUMNS, claim_rows, paper_claims
from utils.report.tables import MAIN, MD_CURVE, detector_rows, md_curve_rows, table_rows, write_table
from utils.sweep.presets import Preset, Replicate

Groups = dict[str, dict[Replicate, dict]]  # row label -> replicate -> summary


def title(preset: Preset) -> str:
    b, s = preset.base, preset.burn_in
    stream = "the authors' (reused first batch)" if b.stream.reuse_first_batch else "distinct batches"
    stop = (f"stop at error > {b.eval.threshold}" if b.eval.threshold is not None
            else f"stop at burn-in error + {b.eval.threshold_delta}")
    return (f"{preset.name} preset: {s.dataset}, {s.arch}{f' width {s.width}' if s.width else ''}, stream "
            f"{stream}, ε {b.attack.epsilon}, online lr {b.learner.lr}, at most {b.stream.steps} batches, {stop}, "
            f"burn-ins {list(preset.burn_in_seeds)} x seeds {list(preset.seeds)} ({time.strftime('%Y-%m-%d')})")


def run_folders(preset: Preset, out: str, label: str) -> list[str]:
    """The run folders of one row, one per replicate."""
    row = next(r for r in preset.rows() if r.label == label)
    return [os.path.join(out, "runs", preset.run_name(row, rep)) for rep in preset.replicates()]


def adaptive_row(groups: Groups) -> str | None:
    """The ST row of the strongest adaptive attacker, if the preset has one."""
    rows = [k for k in groups if k.startswith("ST, adaptive attacker λ=")]
    return max(rows, key=lambda k: float(k.rsplit("=", 1)[1])) if rows else None


def write_claims(preset: Preset, out: str, groups: Groups) -> tuple[str, list[dict]]:
    """claims.md / claims.csv: each claim's paired effect, 95 % interval and verdict."""
    rows = claim_rows(paper_claims(adaptive_row(groups)), groups)
    methods = sorted({r["method"] for r in rows if r["method"]})
    text = write_table(rows, CLAIM_COLUMNS, out, "claims", f"The papers' claims, paired by replicate ({preset.name}; "
                                                           f"95 % interval: {', '.join(methods) or 'none'})")
    return text, rows


def write_tables(preset: Preset, out: str, groups: Groups) -> str:
    """The per-row table, the detectors' table and MD by the memorized epoch."""
    lists = {label: list(reps.values()) for label, reps in groups.items()}
    text = write_table(table_rows(lists), MAIN, out, "table", title(preset))
    adaptive = {k.split(", adaptive attacker ")[1]: v for k, v in lists.items() if k.startswith("ST, adaptive")}
    rows, headers = detector_rows(lists.get("ST", []), adaptive)
    if rows:
        text += "\n" + write_table(rows, headers, out, "detectors", f"Detectors on the ST runs' samples ({preset.name})")
    curve = md_curve_rows(lists.get("ST", []))
    if curve:
        text += "\n" + write_table(curve, MD_CURVE, out, "md_curve", f"MD by the memorized model's epoch ({preset.name})")
    return text


def write_figures(preset: Preset, out: str, groups: Groups) -> None:
    """Accuracy over the stream, MD over the stream and its histogram, the ROC curves, the MD curve (the first
    replicate of each row; the ROC curves over every replicate of ST)."""
    plt = plots.pyplot()
    if plt is None or "ST" not in groups:
        return
    first = {label: run_folders(preset, out, label)[0] for label in groups if not label.startswith("ST (")}
    firsts = {k: v for k, v in first.items() if "adaptive" not in k}
    plots.plot_accuracy(plt, firsts, {k: next(iter(groups[k].values())) for k in firsts},
                        os.path.join(out, "accuracy.png"))
    with_md = {k: v for k, v in firsts.items() if os.path.exists(os.path.join(v, "md.jsonl"))}
    if with_md:
        plots.plot_md_over_stream(plt, with_md, os.path.join(out, "md_over_stream.png"))
        plots.plot_md_histogram(plt, "ST", first["ST"], os.path.join(out, "md_histogram.png"))
    plots.plot_roc(plt, run_folders(preset, out, "ST"), os.path.join(out, "detectors_roc.png"))
    plots.plot_md_curve(plt, md_curve_rows(list(groups["ST"].values())), os.path.join(out, "md_curve.png"))


def fingerprint(preset: Preset, out: str, groups: Groups, claims: list[dict]) -> dict:
    """The reproduction's fingerprint (utils/report/check.py), small enough to commit as the published one."""
    runs = {os.path.basename(f): run_fingerprint(f) for label in groups for f in run_folders(preset, out, label)}
    first = run_folders(preset, out, next(iter(groups)))[0]
    env = read_json(os.path.join(first, "config.json")).get("environment", {})
    epochs = preset.saved_epochs()
    return {"preset": dataclasses.asdict(preset), "date": time.strftime("%Y-%m-%d"),
            "machine": {k: env.get(k) for k in ("cpu", "platform", "torch", "threads", "cpu_kernels", "gpu")},
            "burn_ins": {str(b): burn_in_fingerprint(preset.burn_in_for(b).outf, epochs) for b in preset.burn_in_seeds},
            "runs": runs, "claims": claims}


def check_text(c: Comparison, published: dict, where: str) -> str:
    """The check's sentences, framed so that nobody misses them."""
    m = published.get("machine", {})
    lines = [f"CHECK AGAINST THE PUBLISHED RUNS ({where}: {published.get('date')}, {m.get('cpu')}, torch "
             f"{m.get('torch')}, {m.get('threads')} threads, kernels {(m.get('cpu_kernels') or {}).get('aten_capability')})"]
    if c.config_diff:
        lines.append(f"  configuration: DIFFERENT from the published one ({'; '.join(c.config_diff[:3])}"
                     f"{' ...' if len(c.config_diff) > 3 else ''}): the runs below compare unlike with unlike")
    lines.append("  burn-ins:  " + (f"all {c.burn_ins_compared} identical to the published ones, bit for bit"
                                    if not c.burn_ins else "DIFFERENT: " + "; ".join(c.burn_ins)))
    lines.append("  runs:      " + (f"all {c.runs_compared} identical to the published ones, bit for bit"
                                    if c.runs_identical == c.runs_compared else
                                    f"{c.runs_identical} of {c.runs_compared} identical; the first difference: "
                                    f"{c.first_run_difference}"))
    inside, differ = sum(x["inside"] for x in c.claims), [x for x in c.claims if not x["agree"]]
    which = "; ".join(f"{x['key']}: {x['verdict']} here, {x['published_verdict']} published" for x in differ)
    lines.append(f"  claims:    {inside} of {len(c.claims)} effects inside the published 95 % intervals; verdicts "
                 f"agree on {len(c.claims) - len(differ)} of {len(c.claims)}" + (f" (differ: {which})" if differ else ""))
    lines.append("  ==> IDENTICAL: this machine reproduces the published runs bit for bit." if c.identical else
                 "  ==> DIFFERENT: this machine does not reproduce the published runs bit for bit; judge it by the "
                 "claims line above (docs/REPRODUCIBILITY.md).")
    bar = "=" * 100
    return "\n".join([bar, *lines, bar]) + "\n"


def check_published(mine: dict, published_dir: str, out: str) -> str:
    """check.md / check.json against <published_dir>/fingerprint.json; a sentence when there is none."""
    path = os.path.join(published_dir, "fingerprint.json")
    if not os.path.isfile(path):
        text = f"(no published runs to check against: {os.path.relpath(path)} does not exist)\n"
        write_text(os.path.join(out, "check.md"), text)
        return text
    comparison = compare(mine, read_json(path))
    where = os.path.relpath(published_dir)
    text = check_text(comparison, read_json(path), published_dir if where.startswith("..") else where)
    write_text(os.path.join(out, "check.md"), text)
    write_json(os.path.join(out, "check.json"), {**dataclasses.asdict(comparison), "identical": comparison.identical})
    return text


def write_reports(preset: Preset, out: str, groups: Groups, published_dir: str) -> str:
    """Everything reproduce.py writes for a preset; returns the text it prints (the check last)."""
    claims_text, claims = write_claims(preset, out, groups)
    text = claims_text + "\n" + write_tables(preset, out, groups)
    write_figures(preset, out, groups)
    mine = fingerprint(preset, out, groups, claims)
    write_json(os.path.join(out, "fingerprint.json"), mine)
    return text + "\n" + check_published(mine, published_dir, out)
