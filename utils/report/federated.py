"""What reproduce.py writes for the federated preset (SPEC "Federated learning"): the table per aggregator (accuracy
before and after the trigger round, the trigger's drop beside its two controls, the paired effects with 95 %
intervals, rounds before the stop, the per-score AUROCs, seconds per round), the claims with verdicts, the scores'
AUROCs as detectors, the costs, a compact per-run summary, and accuracy over rounds per aggregator."""
from __future__ import annotations

import os
import re
import statistics
import time

from utils.io.results import read_jsonl
from utils.report import plots
from utils.report.claims import CLAIM_COLUMNS, Claim, Interval, claim_rows, paired_interval, trigger_drop, verdict
from utils.report.tables import mean_std, write_table
from utils.sweep.federated import ALONE, HONEST, FedPreset, aggregator_row, dirichlet
from utils.sweep.presets import Replicate

Groups = dict[str, dict[Replicate, dict]]  # row label -> replicate -> summary
SCORE_NAMES = ("norm", "cosine", "krum", "fltrust", "md")
TABLE = {"aggregator": "aggregator", "replicates": "replicates", "acc_start": "acc. start (%)",
         "acc_before": "acc. before trigger round (%)", "acc_after": "acc. after trigger round (%)",
         "drop": "trigger's drop (pts)", "drop_alone": "trigger alone: drop (pts)",
         "drop_honest": "honest rounds + trigger: drop (pts)", "vs_alone": "drop − trigger alone (pts, 95 % CI)",
         "vs_honest": "drop − honest rounds (pts, 95 % CI)", "verdict": "attack works (both > 1 pt)",
         "rounds": "rounds before the stop", **{f"auroc_{s}": f"AUROC {s}" for s in SCORE_NAMES},
         "round_s": "s / round"}


def control_of(groups: Groups, bases: dict[str, str], label: str, suffix: str) -> dict[Replicate, dict] | None:
    """A row's control: its own, or that of the row whose controls it shares (``bases``: the adaptive attacker's
    trigger and honest rounds are those of the same attacker without the MD term)."""
    return groups.get(bases.get(label, label) + suffix)


def interval_text(iv: Interval | None) -> str:
    """'m [lo, hi]' (points), or '' without an interval."""
    return "" if iv is None else f"{iv.mean:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}]"


def paired(row: dict[Replicate, dict], control: dict[Replicate, dict] | None) -> tuple[str, Interval | None]:
    """'m [lo, hi]' of the paired difference of the trigger's drop, and its interval."""
    if not control:
        return "", None
    iv = paired_interval({rep: trigger_drop(s) - trigger_drop(control[rep]) for rep, s in row.items() if rep in control})
    return interval_text(iv), iv


def table_row(label: str, groups: Groups, bases: dict[str, str]) -> dict:
    """One aggregator's (or attacker's) row of the table."""
    runs, reps = list(groups[label].values()), groups[label]
    alone, honest = control_of(groups, bases, label, ALONE), control_of(groups, bases, label, HONEST)
    vs_alone, iv_a = paired(reps, alone)
    vs_honest, iv_h = paired(reps, honest)
    works = [verdict(iv, 1.0) for iv in (iv_a, iv_h) if iv is not None]
    drops = lambda rows: mean_std([trigger_drop(s) for s in rows.values()]) if rows else ""  # noqa: E731
    auroc = lambda s: mean_std([(r["auroc_accumulative"] or {}).get(s) for r in runs], digits=3)  # noqa: E731
    return {"aggregator": label, "replicates": len(runs), "acc_start": mean_std([1 - r["err_start"] for r in runs], 100),
            "acc_before": mean_std([1 - r["err_before_trigger"] for r in runs], 100),
            "acc_after": mean_std([1 - r["err_after_trigger"] for r in runs], 100), "drop": drops(reps),
            "drop_alone": drops(alone), "drop_honest": drops(honest), "vs_alone": vs_alone, "vs_honest": vs_honest,
            "verdict": works[0] if len(set(works)) == 1 else " / ".join(works), "rounds": mean_std([r["rounds"] for r in runs]),
            **{f"auroc_{s}": auroc(s) for s in SCORE_NAMES},
            "round_s": f"{statistics.median(r['costs']['round_s'] for r in runs if r['costs']['round_s']):.2f}"
            if any(r["costs"]["round_s"] for r in runs) else ""}


def attack_rows(groups: Groups) -> list[str]:
    """The rows under attack (the controls are columns of theirs)."""
    return [k for k in groups if not k.endswith(ALONE) and not k.endswith(HONEST)]


def slug(label: str) -> str:
    """A row label as an ASCII key: 'md_screen, adaptive attacker λ=10' -> 'md_screen_adaptive_attacker_l10'."""
    return re.sub(r"[^a-z0-9.]+", "_", label.replace("λ=", "l").lower()).strip("_")


def federated_claims(groups: Groups, bases: dict[str, str]) -> list[Claim]:
    """Per attacked row: the trigger's drop exceeds each control's by more than 1 point; on the FedAvg runs (the
    attack unimpeded, boosted and not) and against the adaptive attacker: MD's AUROC above 0.5 and above every other
    score's."""
    claims = []
    for label in attack_rows(groups):
        for suffix, what in ((ALONE, "the trigger alone"), (HONEST, "honest rounds + trigger")):
            control = bases.get(label, label) + suffix
            if control in groups:
                claims.append(Claim(f"{slug(label)}_vs_{slug(suffix)}", "Pang et al. 2021 (federated)",
                                    f"{label}: the trigger drops accuracy more than after {what}, by more than 1 "
                                    f"point", label, trigger_drop, control, threshold=1.0))
    md = lambda s: (s["auroc_accumulative"] or {}).get("md")  # noqa: E731
    for label in [k for k in groups if k in ("fedavg", "fedavg, unboosted attacker") or "adaptive" in k
                  or (k.startswith("fedavg, dirichlet") and k in attack_rows(groups))]:
        claims.append(Claim(f"md_separates_{slug(label)}", "this project", f"{label}: MD's AUROC of malicious vs "
                            f"honest updates is above 0.5", label, md, threshold=0.5, unit="AUROC"))
        for other in SCORE_NAMES[:-1]:
            claims.append(Claim(f"md_beats_{other}_{slug(label)}", "this project", f"{label}: MD separates the "
                                f"updates better than {other}", label, md, label,
                                (lambda o: lambda s: (s["auroc_accumulative"] or {}).get(o))(other), unit="AUROC"))
    return claims


def score_rows(groups: Groups) -> tuple[list[dict], dict[str, str]]:
    """Per attacked row (not the attacker-alone ones: one update per round): each score's AUROC of malicious vs
    honest updates in the accumulative rounds (the mean of each round's) and in the trigger round."""
    headers = {"row": "row", **{s: f"AUROC {s}" for s in SCORE_NAMES},
               **{f"trigger_{s}": f"trigger round: AUROC {s}" for s in SCORE_NAMES}}
    rows = []
    for k in attack_rows(groups):
        runs = list(groups[k].values())
        if all(r["auroc_accumulative"] is None and r["auroc_trigger"] is None for r in runs):
            continue
        rows.append({"row": k, **{s: mean_std([(r["auroc_accumulative"] or {}).get(s) for r in runs], digits=3)
                                  for s in SCORE_NAMES},
                     **{f"trigger_{s}": mean_std([(r["auroc_trigger"] or {}).get(s) for r in runs], digits=3)
                        for s in SCORE_NAMES}})
    return rows, headers


NONIID = {"aggregator": "aggregator", "split": "clients' data", "acc_honest": "honest rounds: acc. before trigger (%)",
          "vs_fedavg": "honest acc. − FedAvg's (pts, 95 % CI)", "vs_iid": "honest acc. − IID (pts, 95 % CI)",
          "excluded_honest": "honest rounds: updates excluded", "excluded_attacker": "attack: its updates excluded",
          "vs_honest": "attack: drop − honest rounds (pts, 95 % CI)", "auroc_md": "AUROC md",
          "auroc_best_other": "best other AUROC"}


def excluded(preset: FedPreset, out: str, label: str, malicious: bool) -> str:
    """'k/n (p %)': the accumulative rounds' updates the aggregator gave weight 0, the malicious ones or the honest
    ones, over the row's runs; '' for the coordinate-wise rules (no per-update weight)."""
    row = next((r for r in preset.rows() if r.label == label), None)
    zero = total = 0
    for rep in preset.replicates() if row else []:
        path = os.path.join(out, "runs", preset.run_name(row, rep), "rounds.jsonl")
        for r in read_jsonl(path) if os.path.isfile(path) else []:
            if r["phase"] != "accumulative" or None in r["weights"]:
                continue
            mine = [w for k, w in enumerate(r["weights"]) if (k in r["malicious"]) == malicious]
            zero, total = zero + sum(w == 0 for w in mine), total + len(mine)
    return f"{zero}/{total} ({100 * zero / total:.0f} %)" if total else ""


def split_rows(preset: FedPreset) -> dict[str, tuple[str, float | None]]:
    """Each aggregator row against the base attacker, IID (α None) and non-IID: {label: (aggregator, α)}."""
    return {aggregator_row(a, alpha): (a, alpha) for alpha in (None, *preset.alphas) for a in preset.aggregators}


def accuracy_gap(row: dict[Replicate, dict] | None, other: dict[Replicate, dict] | None) -> Interval | None:
    """The paired accuracy difference before the trigger, row − other (points), with its interval."""
    if not row or not other:
        return None
    return paired_interval({rep: 100 * (other[rep]["err_before_trigger"] - s["err_before_trigger"])
                            for rep, s in row.items() if rep in other})


def noniid_effects(preset: FedPreset, groups: Groups) -> list[dict]:
    """Per aggregator and split (IID, each Dirichlet α): the honest rounds' accuracies, their paired gaps to
    FedAvg's and to the same aggregator's with IID clients, the attack's drop over honest rounds, and each score's
    mean AUROC under the attack (SPEC "Federated learning")."""
    out = []
    for label, (a, alpha) in split_rows(preset).items():
        if label not in groups:
            continue
        split, honest = ("iid" if alpha is None else dirichlet(alpha)), groups.get(label + HONEST)
        fedavg = aggregator_row("fedavg", alpha)
        aurocs = {s: [(r["auroc_accumulative"] or {}).get(s) for r in groups[label].values()] for s in SCORE_NAMES}
        out.append({"aggregator": a, "split": split, "label": label,
                    "honest_acc": [100 * (1 - r["err_before_trigger"]) for r in (honest or {}).values()],
                    "vs_fedavg": accuracy_gap(honest, groups.get(fedavg + HONEST)) if a != "fedavg" else None,
                    "vs_iid": accuracy_gap(honest, groups.get(a + HONEST)) if split != "iid" else None,
                    "vs_honest": paired(groups[label], honest)[1],
                    "auroc": {s: statistics.fmean(v) for s, v in aurocs.items() if v and None not in v}})
    return out


def noniid_rows(effects: list[dict], preset: FedPreset, out: str) -> list[dict]:
    """The non-IID table's lines from ``noniid_effects`` and the runs' per-update weights."""
    rows = []
    for e in effects:
        others = {s: v for s, v in e["auroc"].items() if s != "md"}
        best = max(others, key=others.get, default=None)
        rows.append({"aggregator": e["aggregator"], "split": e["split"], "acc_honest": mean_std(e["honest_acc"]),
                     "vs_fedavg": interval_text(e["vs_fedavg"]), "vs_iid": interval_text(e["vs_iid"]),
                     "excluded_honest": excluded(preset, out, e["label"] + HONEST, False),
                     "excluded_attacker": excluded(preset, out, e["label"], True),
                     "vs_honest": interval_text(e["vs_honest"]),
                     "auroc_md": f"{e['auroc']['md']:.3f}" if "md" in e["auroc"] else "",
                     "auroc_best_other": f"{best} {others[best]:.3f}" if best else ""})
    return rows


def write_noniid_figure(effects: list[dict], path: str) -> None:
    """noniid.png: per aggregator and split, the honest rounds' accuracy (left) and the attack's drop over honest
    rounds with its 95 % interval (right)."""
    plt = plots.pyplot()
    if plt is None or not effects:
        return
    aggs, splits = list(dict.fromkeys(e["aggregator"] for e in effects)), list(dict.fromkeys(e["split"] for e in effects))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(splits)
    for j, split in enumerate(splits):
        mine = {e["aggregator"]: e for e in effects if e["split"] == split}
        xs = [i + (j - (len(splits) - 1) / 2) * width for i, a in enumerate(aggs) if a in mine]
        acc = [statistics.fmean(mine[a]["honest_acc"]) if mine[a]["honest_acc"] else float("nan") for a in aggs
               if a in mine]
        ax.bar(xs, acc, width, label=split, color=f"C{j}")
        ivs = [(x, mine[a]["vs_honest"]) for x, a in zip(xs, [a for a in aggs if a in mine]) if mine[a]["vs_honest"]]
        if ivs:
            bx.errorbar([x for x, _ in ivs], [iv.mean for _, iv in ivs], yerr=[[iv.mean - iv.low for _, iv in ivs],
                        [iv.high - iv.mean for _, iv in ivs]], fmt="o", capsize=3, color=f"C{j}", label=split)
    lows = [min(e["honest_acc"]) for e in effects if e["honest_acc"]]
    ax.set(ylabel="honest rounds: test accuracy before the trigger (%)", title="what each aggregator costs honest "
           "clients", ylim=(max(0.0, min(lows, default=0.0) - 5), None))
    bx.axhline(1.0, ls="--", color="grey", lw=1)
    bx.axhline(0.0, color="black", lw=0.5)
    bx.set(ylabel="trigger's drop − after honest rounds (pts, 95 %)", title="the attack under each aggregator")
    for a in (ax, bx):
        a.set_xticks(range(len(aggs)), aggs, rotation=30, ha="right", fontsize=8)
        a.legend(fontsize=7)
    plots.save_figure(plt, fig, path)


COSTS = {"row": "row", "runs": "runs", "round_s": "s / round", "clients_s": "clients", "scores_s": "scores (root "
         "update, MD)", "aggregate_s": "aggregation", "eval_s": "evaluation", "other_s": "alignment, "
         "records"}


def cost_rows(groups: Groups) -> list[dict]:
    """Median seconds of an accumulative round and of its parts, per attacked row and its honest control."""
    rows = []
    for label, reps in groups.items():
        costs = [r["costs"] for r in reps.values() if r["costs"]["round_s"]]
        if not costs:
            continue
        med = {k: statistics.median(c[k] for c in costs) for k in ("round_s", "clients_s", "scores_s", "aggregate_s",
                                                                    "eval_s")}
        med["other_s"] = med["round_s"] - sum(v for k, v in med.items() if k != "round_s")
        rows.append({"row": label, "runs": len(costs), **{k: f"{v:.3f}" for k, v in med.items()}})
    return rows


RUNS = ("row", "burn_in", "seed", "err_start", "err_before_trigger", "err_after_trigger", "delta", "rounds",
        "stop_reason", "alignment_start", "alignment_before_trigger", *(f"auroc_{s}" for s in SCORE_NAMES),
        "round_s", "global_sha256")


def run_rows(groups: Groups) -> list[dict]:
    """One line per run: its figures (the compact summary published in docs/results/federated/)."""
    out = []
    for label, reps in groups.items():
        for (b, seed), s in sorted(reps.items()):
            auc = s["auroc_accumulative"] or {}
            out.append({"row": label, "burn_in": b, "seed": seed, **{k: s.get(k) for k in RUNS if k in s},
                        **{f"auroc_{k}": auc.get(k) for k in SCORE_NAMES}, "round_s": s["costs"]["round_s"]})
    return out


def write_federated_figure(preset: FedPreset, out: str, groups: Groups) -> None:
    """accuracy.png: test accuracy over the rounds per aggregator (the first replicate), the trigger round dashed."""
    plt = plots.pyplot()
    if plt is None:
        return
    rep = preset.replicates()[0]
    iid = [k for k, (_, alpha) in split_rows(preset).items() if alpha is None] + [k for k in groups if "unboosted" in k]
    rows = {r.label: os.path.join(out, "runs", preset.run_name(r, rep)) for r in preset.rows() if r.label in groups
            and r.label in attack_rows(groups) and r.label in iid}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, ((label, run), marker) in enumerate(zip(rows.items(), "os^Dvx<>ph*+")):
        s, records = groups[label][rep], read_jsonl(os.path.join(run, "rounds.jsonl"))
        acc = [100 * (1 - s["err_start"])] + [100 * (1 - r["test_err"]) for r in records[:-1]]
        line, = ax.plot(range(len(acc)), acc, marker=marker, markersize=4, markerfacecolor="none", label=label,
                        color=plt.cm.tab20(i / 20))
        ax.plot([s["rounds"], s["rounds"] + 1], [100 * (1 - s["err_before_trigger"]), 100 * (1 - s["err_after_trigger"])],
                "v--", color=line.get_color())
    ax.set(xlabel="round (rounds: the evaluation subset; dashed: before and after the trigger round, the full test "
           "set)", ylabel="test accuracy (%)", title="Federated accumulative "
           "attack: test accuracy over the rounds, per aggregator")
    ax.legend(fontsize=7)
    plots.save_figure(plt, fig, os.path.join(out, "accuracy.png"))


def title(preset: FedPreset, what: str) -> str:
    b, c = preset.base, preset.base.clients
    return (f"{what} ({preset.name}: {preset.source.burn_in.dataset}, {preset.source.burn_in.arch} epoch "
            f"{preset.source.online_epoch}, {c.clients} clients x {c.local_steps} steps of {c.batch_size}, lr {c.lr}, "
            f"boost {b.attack.boost:g}, λ {b.attack.feder_lambda:g}, at most {b.server.rounds} rounds, burn-ins "
            f"{list(preset.burn_in_seeds)} x seeds {list(preset.seeds)}, {time.strftime('%Y-%m-%d')})")


def write_federated_reports(preset: FedPreset, out: str, groups: Groups) -> str:
    """Every table and the figure; returns the text reproduce.py prints."""
    bases = {r.label: r.controls or r.label for r in preset.rows()}
    text = write_table([table_row(k, groups, bases) for k in attack_rows(groups)], TABLE, out, "table",
                       title(preset, "The federated accumulative attack per aggregator"))
    claims = claim_rows(federated_claims(groups, bases), groups)
    text += "\n" + write_table(claims, CLAIM_COLUMNS, out, "claims", title(preset, "Claims, paired by replicate"))
    rows, headers = score_rows(groups)
    text += "\n" + write_table(rows, headers, out, "scores", title(preset, "Per-update scores as detectors: AUROC "
                                                                           "of malicious vs honest updates"))
    effects = noniid_effects(preset, groups)
    text += "\n" + write_table(noniid_rows(effects, preset, out), NONIID, out, "noniid", title(
        preset, "IID and non-IID clients: the honest rounds' accuracy and the attack, per aggregator"))
    text += "\n" + write_table(cost_rows(groups), COSTS, out, "costs", title(preset, "Seconds per round (median)"))
    write_table(run_rows(groups), {k: k for k in RUNS}, out, "runs", title(preset, "Every run"))
    write_federated_figure(preset, out, groups)
    write_noniid_figure(effects, os.path.join(out, "noniid.png"))
    return text
