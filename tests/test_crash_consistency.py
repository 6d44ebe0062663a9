"""Crash consistency: a reproduction killed with SIGKILL at several moments (tests/crash_child.py), then run again with
the same command each time, gives the results of a run that was never interrupted: the same burn-in weights, runs,
claims and tables (docs/ROBUSTNESS.md, "Crashes")."""
from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import pytest
from conftest import DATA_ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
CPU = ["--preset", "cpu", "--smoke", "--dataroot", DATA_ROOT, "--set", "preset.only=ST_trigger_alone,ST,DSC",
       "--threads", "1"]
FED = ["--preset", "federated", "--smoke"]


def _reproduce(cwd: str, argv: list[str], crash: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """reproduce.py in ``cwd`` (its checkpoints/ and results/ land there); ``crash``: killed at that moment."""
    script = os.path.join(REPO, "reproduce.py")
    pre = [os.path.join(TESTS, "crash_child.py"), crash[0], str(crash[1])] if crash else []
    return subprocess.run([sys.executable, *pre, script, *argv], cwd=cwd, env=ENV, text=True, capture_output=True,
                          timeout=900)


def _killed_then_finished(cwd: str, argv: list[str], moments: list[tuple[str, int]]) -> None:
    """Each moment in turn: the same command, killed there (SIGKILL: exit -9, the moment was reached); then the same
    command once more, to the end."""
    for moment in moments:
        done = _reproduce(cwd, argv, moment)
        assert done.returncode == -9, f"{moment}: not killed (exit {done.returncode}): {done.stderr[-2000:]}"
    done = _reproduce(cwd, argv)
    assert done.returncode == 0, done.stderr[-3000:]
    left = [p for p in glob.glob(os.path.join(cwd, "**", ".tmp-*"), recursive=True)
            + glob.glob(os.path.join(cwd, "**", ".lock"), recursive=True)]
    assert left == [], f"left behind: {left}"


def _same_tables(a: str, b: str, names: tuple[str, ...]) -> None:
    """The same CSV tables, timing columns (``*_s``, ``*seconds``) aside."""
    def rows(path: str) -> list[dict]:
        return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("seconds"))}
                for r in csv.DictReader(open(path))]

    for name in names:
        assert rows(os.path.join(a, name)) == rows(os.path.join(b, name)), name


def _same_runs(a: str, b: str) -> None:
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare_runs.py"), a, b], env=ENV,
                          text=True, capture_output=True)
    assert done.returncode == 0 and "all runs identical" in done.stdout, done.stdout


def test_a_reproduction_killed_four_times_gives_the_uninterrupted_results(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    clean.mkdir(), crashed.mkdir()
    assert _reproduce(str(clean), CPU).returncode == 0
    moments = [("train_step", 2),   # burn-in 0, epoch 2 (one step per epoch at this size), before its step
               ("checkpoint", 2),   # the resumed burn-in: last.pth half-renamed (epoch2.pth was written)
               ("online_step", 2),  # the second recorded step of this process's online runs
               ("report", 1)]       # the first report file
    _killed_then_finished(str(crashed), CPU, moments)
    mine, published = crashed / "results" / "cpu_smoke", clean / "results" / "cpu_smoke"
    check = subprocess.run([sys.executable, os.path.join(REPO, "reproduce.py"), *CPU, "--published", str(published)],
                           cwd=crashed, env=ENV, text=True, capture_output=True, timeout=900)
    assert check.returncode == 0 and "==> IDENTICAL" in open(mine / "check.md").read(), check.stdout[-2000:]
    _same_runs(str(published / "runs"), str(mine / "runs"))
    _same_tables(str(published), str(mine), ("claims.csv", "table.csv", "detectors.csv"))


def test_a_federated_reproduction_killed_three_times_gives_the_uninterrupted_results(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    for cwd in (clean, crashed):  # the federated preset reads data/ of the folder it runs in (no --dataroot)
        cwd.mkdir()
        os.symlink(DATA_ROOT, cwd / "data")
    done = _reproduce(str(clean), FED)
    assert done.returncode == 0, done.stderr[-3000:]
    moments = [("checkpoint", 1),  # its burn-in's first checkpoint
               ("round", 3),       # the second run's first round
               ("report", 1)]      # the first report file
    _killed_then_finished(str(crashed), FED, moments)
    mine, published = crashed / "results" / "federated_smoke", clean / "results" / "federated_smoke"
    _same_runs(str(published / "runs"), str(mine / "runs"))
    _same_tables(str(published), str(mine), ("claims.csv", "table.csv", "scores.csv"))
