"""Does a machine's run agree with the published one? (docs/REPRODUCIBILITY.md)

A *fingerprint* of a reproduction is small enough to commit: the preset, the machine, every burn-in epoch's test
error and weights' hash, every run's per-step test error and alignment, and the figures of its summary that the
tables and claims read. ``compare`` sets two fingerprints side by side: whether the burn-ins and the runs are
identical bit for bit, and if not where each first differs; whether this machine's claim effects fall inside the
published intervals, and whether the verdicts agree.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from utils.burnin.config import LEGACY_ARGS
from utils.core.checkpoint import load_checkpoint
from utils.fields import with_defaults_for_missing
from utils.io.results import read_json, read_jsonl
from utils.online.config import OnlineConfig

STEP_FIELDS = ("test_err", "alignment", "md_poison")  # per arriving batch
SUMMARY_FIELDS = ("err_burn_in", "err_before_trigger", "err_after_trigger", "steps", "stop_reason",
                  "md_auroc_poison_vs_clean", "md_auroc_poison_vs_noise", "dsc_mean_steps", "detectors", "md_curve")
IGNORED = ("outf", "dataroot", "out", "resume", "memorized_model", "md_curve", "download", "device")  # paths, places


def burn_in_fingerprint(outf: str, epochs: list[int]) -> list[dict]:
    """Per saved epoch: its test error and the hash of its weights (from the checkpoint)."""
    out = []
    for e in epochs:
        ckpt = load_checkpoint(os.path.join(outf, f"epoch{e}.pth"))
        out.append({"epoch": e, "test_err": ckpt["err_cls"], "sha256": ckpt.get("net_sha256")})
    return out


def run_fingerprint(folder: str) -> dict:
    """A run's per-step figures and the summary figures the reports read."""
    steps = read_jsonl(os.path.join(folder, "steps.jsonl")) if os.path.exists(os.path.join(folder, "steps.jsonl")) else []
    summary = read_json(os.path.join(folder, "summary.json"))
    return {"steps": [[s.get(k) for k in STEP_FIELDS] for s in steps],
            "summary": {k: _strip_paths(summary.get(k)) for k in SUMMARY_FIELDS}}


def _strip_paths(value: Any) -> Any:
    """The MD curve's points without their checkpoint paths (they name the machine's folders)."""
    if isinstance(value, list):
        return [{k: v for k, v in p.items() if k != "memorized_model"} if isinstance(p, dict) else p for p in value]
    return value


def plain(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested configuration as {dotted.key: value} of JSON values (tuples as lists), without the fields that name
    places (IGNORED)."""
    if not prefix:
        d = json.loads(json.dumps(d))
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k not in IGNORED:
            out.update(plain(v, f"{prefix}{k}."))
    return out


@dataclass
class Comparison:
    """Two fingerprints side by side."""

    config_diff: list[str] = field(default_factory=list)
    burn_ins: list[str] = field(default_factory=list)  # one line per burn-in that differs (empty: all identical)
    burn_ins_compared: int = 0
    runs_identical: int = 0
    runs_compared: int = 0
    first_run_difference: str = ""
    claims: list[dict] = field(default_factory=list)  # key, mine, published interval, inside, verdicts

    @property
    def identical(self) -> bool:
        return (not self.config_diff and not self.burn_ins and self.runs_identical == self.runs_compared
                and self.runs_compared > 0)


def first_step_difference(mine: list[list], published: list[list],
                          sides: tuple[str, str] = ("here", "published")) -> str | None:
    """'step t: <quantity> x here, y published', or 'n steps here, m published'; None when identical."""
    for t, (a, b) in enumerate(zip(mine, published)):
        for name, x, y in zip(STEP_FIELDS, a, b):
            if x != y:
                return f"step {t}: {name} {x!r} {sides[0]}, {y!r} {sides[1]}"
    if len(mine) != len(published):
        return f"{len(mine)} steps {sides[0]}, {len(published)} {sides[1]}"
    return None


def compare_burn_ins(mine: dict, published: dict) -> tuple[list[str], int]:
    """One line per burn-in whose weights differ at some epoch: the first such epoch and its test errors."""
    lines, compared = [], 0
    for b, epochs in published.items():
        if b not in mine:
            continue
        compared += 1
        for a, p in zip(mine[b], epochs):
            if a["sha256"] != p["sha256"]:
                lines.append(f"burn-in {b}: weights differ from epoch {a['epoch']} on (test error {a['test_err']} "
                             f"here, {p['test_err']} published)")
                break
    return lines, compared


def compare_runs(mine: dict, published: dict) -> tuple[int, int, str]:
    """(identical runs, compared runs, the earliest first difference as a sentence)."""
    same, compared, first = 0, 0, None
    for name in sorted(published.keys() & mine.keys()):
        compared += 1
        where = first_step_difference(mine[name]["steps"], published[name]["steps"])
        if where is None and mine[name]["summary"] != published[name]["summary"]:
            where = "the summary (after the trigger step)"
        if where is None:
            same += 1
        elif first is None or where.startswith("step") and _step(where) < _step(first[1]):
            first = (name, where)
    return same, compared, "" if first is None else f"{first[0]}, {first[1]}"


def _step(where: str) -> int:
    return int(where.split()[1].rstrip(":")) if where.startswith("step") else 10 ** 9


def compare_claims(mine: list[dict], published: list[dict]) -> list[dict]:
    """Per claim both sides have: this machine's mean effect, the published interval, inside or not, the verdicts."""
    theirs = {c["key"]: c for c in published}
    out = []
    for c in mine:
        p = theirs.get(c["key"])
        if p is None or c.get("mean") is None or p.get("low") is None:
            continue
        out.append({"key": c["key"], "claim": c["claim"], "mean": c["mean"], "low": p["low"], "high": p["high"],
                    "inside": p["low"] <= c["mean"] <= p["high"], "verdict": c["verdict"],
                    "published_verdict": p["verdict"], "agree": c["verdict"] == p["verdict"]})
    return out


def with_legacy_settings(published: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """A published preset written before a setting existed holds it at the value it then had: a burn-in setting at
    LEGACY_ARGS (e.g. ``burn_in.normalize`` True), an online setting at its default (a new field's default keeps
    the behaviour it had before the field existed), so a setting added later at that value is no difference."""
    legacy = {f"burn_in.{k}": v for k, v in LEGACY_ARGS.items() if f"burn_in.{k}" in mine}
    online = {k: v for k, v in plain({"base": OnlineConfig().to_dict()}).items() if k in mine}
    return with_defaults_for_missing({**legacy, **published}, online)


def compare(mine: dict, published: dict) -> Comparison:
    """This machine's fingerprint against the published one."""
    a = plain(mine["preset"])
    b = with_legacy_settings(plain(published["preset"]), a)
    diff = [f"{k}: {b.get(k)!r} published, {a.get(k)!r} here" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]
    burn_ins, n_burn_ins = compare_burn_ins(mine["burn_ins"], published["burn_ins"])
    same, n_runs, first = compare_runs(mine["runs"], published["runs"])
    return Comparison(diff, burn_ins, n_burn_ins, same, n_runs, first,
                      compare_claims(mine.get("claims", []), published.get("claims", [])))
