"""Compare the results of two sets of runs, timing fields aside: every .jsonl file (steps, md, detector scores,
federated rounds) and summary.json.

  python scripts/compare_runs.py BEFORE/runs AFTER/runs [--rename OLD=NEW ...]

Each run folder under BEFORE is compared with the folder of the same name under AFTER (or its --rename).
A field that only one side has counts as a difference unless it is a timing field (ends in _s or _seconds).
Exit status 0 when every compared run is identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def is_timing(key: str) -> bool:
    return key.endswith("_s") or key.endswith("seconds")


def strip(obj):
    """The object without timing fields, at any depth."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def compare_run(a: str, b: str) -> list[str]:
    """The files that differ (timing fields aside) between two run folders."""
    problems = []
    names = {n for d in (a, b) if os.path.isdir(d) for n in os.listdir(d) if n.endswith(".jsonl")}
    for name in sorted(names) + ["summary.json"]:
        x, y = load(os.path.join(a, name)), load(os.path.join(b, name))
        if x is None and y is None:
            continue
        if strip(x) != strip(y):
            problems.append(name)
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW")
    args = p.parse_args(argv)
    rename = dict(r.split("=", 1) for r in args.rename)
    bad = 0
    for run in sorted(os.listdir(args.before)):
        other = os.path.join(args.after, rename.get(run, run))
        if not os.path.isdir(other):
            print(f"{run}: no counterpart {other}")
            bad += 1
            continue
        problems = compare_run(os.path.join(args.before, run), other)
        print(f"{run} -> {os.path.basename(other)}: {'identical' if not problems else 'DIFFERS in ' + ', '.join(problems)}")
        bad += bool(problems)
    print(f"{bad} run(s) differ" if bad else "all runs identical (timing fields aside)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
