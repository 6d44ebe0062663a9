"""Run one of the project's scripts and kill it with SIGKILL at a chosen moment (a real ``kill -9``: no handler,
no clean-up, the kernel ends the process mid-work). Used by tests/test_crash_consistency.py:

  python tests/crash_child.py MOMENT N SCRIPT [ARGS...]

MOMENT (the N-th occurrence in this process, counted from 1):
  train_step   before an SGD step (a burn-in epoch, an online step or a client's local step is under way)
  checkpoint   while a checkpoint (*.pth) is written: its temporary file is complete, the rename has not happened
  online_step  before a step's line is appended to steps.jsonl (the step is computed, not yet recorded)
  round        before a federated round's line is appended to rounds.jsonl
  report       while a report file (.md/.csv/.png outside runs/) is written: temporary file complete, not renamed
"""
from __future__ import annotations

import os
import runpy
import signal
import sys

import torch

import utils.io.results as results

MOMENT, N, SCRIPT = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = 0


def reached() -> bool:
    global seen
    seen += 1
    return seen == N


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def is_report(path: str) -> bool:
    return path.endswith((".md", ".csv", ".png")) and f"{os.sep}runs{os.sep}" not in path


atomic_write, append_jsonl, sgd_step = results.atomic_write, results.append_jsonl, torch.optim.SGD.step


def killing_atomic_write(path, write):
    if (MOMENT == "checkpoint" and path.endswith(".pth")) or (MOMENT == "report" and is_report(path)):
        if reached():
            return atomic_write(path, lambda tmp: (write(tmp), die()))
    return atomic_write(path, write)


def killing_append_jsonl(path, obj):
    name = {"online_step": "steps.jsonl", "round": "rounds.jsonl"}.get(MOMENT)
    if name is not None and os.path.basename(path) == name and reached():
        die()
    return append_jsonl(path, obj)


def killing_sgd_step(self, *args, **kwargs):
    if MOMENT == "train_step" and reached():
        die()
    return sgd_step(self, *args, **kwargs)


if MOMENT not in ("train_step", "checkpoint", "online_step", "round", "report"):
    sys.exit(f"unknown moment {MOMENT!r}")
results.atomic_write, results.append_jsonl, torch.optim.SGD.step = (killing_atomic_write, killing_append_jsonl,
                                                                     killing_sgd_step)
sys.argv = sys.argv[3:]
sys.path.insert(0, os.path.dirname(os.path.abspath(SCRIPT)))
runpy.run_path(SCRIPT, run_name="__main__")
