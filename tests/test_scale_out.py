"""Scale-out (README "Scaling out"): the burn-in under torchrun (DDP, gloo on the CPU) against one process, and
its resume; sweeps as Ray tasks on a local instance against the sequential run, and the reuse of finished cells."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATA_ROOT
from utils.core.checkpoint import load_checkpoint
from utils.core.models import ModelSpec, build_model
from utils.core.train import set_seed

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _burn_in(repo_root: str, small_data: str, outf: str, epochs: int, ranks: int, *extra: str) -> None:
    """train_cifar.py on 128 samples of the small data, batches of 32 (4 steps an epoch), a GroupNorm CNN."""
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    argv = ["train_cifar.py", "--dataset", "fashion-mnist", "--arch", "cnn", "--width", "4", "--group_norm", "2",
            "--dataroot", small_data, "--no_download", "--device", "cpu", "--batch_size", "32", "--test_batch_size",
            "100", "--save_freq", "1", "--subset", "128", "--outf", outf, "--epochs", str(epochs), *extra]
    done = subprocess.run(launcher + argv, cwd=repo_root, env=ENV, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(path: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["net"]


def test_torchrun_burn_in_matches_one_process(repo_root, small_data, tmp_path):
    """Same global batch, same order, same augmentation draws: the averaged gradient is the global batch's, so the
    weights agree up to the order of floating-point sums (GroupNorm: no per-rank batch statistics)."""
    _burn_in(repo_root, small_data, str(tmp_path / "one"), 1, 1)
    _burn_in(repo_root, small_data, str(tmp_path / "two"), 1, 2)
    one, two = _weights(str(tmp_path / "one" / "last.pth")), _weights(str(tmp_path / "two" / "last.pth"))
    set_seed(0)  # the burn-in's seed: its initial weights
    start = build_model(ModelSpec.from_dict(load_checkpoint(str(tmp_path / "one" / "last.pth"))["model"])).state_dict()
    assert max((one[k].float() - start[k].float()).abs().max() for k in one) > 1e-3  # training moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=k)
    assert json.load(open(tmp_path / "two" / "config.json"))["ranks"] == 2
    history = [json.loads(line) for line in open(tmp_path / "two" / "history.jsonl")]
    assert [h["epoch"] for h in history] == [1]  # rank 0 alone writes


def test_torchrun_resume_equals_uninterrupted(repo_root, small_data, tmp_path):
    _burn_in(repo_root, small_data, str(tmp_path / "whole"), 2, 2)
    _burn_in(repo_root, small_data, str(tmp_path / "parts"), 1, 2)
    _burn_in(repo_root, small_data, str(tmp_path / "parts"), 2, 2, "--resume")
    whole, parts = _weights(str(tmp_path / "whole" / "last.pth")), _weights(str(tmp_path / "parts" / "last.pth"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert load_checkpoint(str(tmp_path / "parts" / "last.pth"))["run_id"] == \
        load_checkpoint(str(tmp_path / "parts" / "epoch1.pth"))["run_id"]


def test_ray_grid_equals_the_sequential_grid_and_reuses_finished_cells(repo_root, tiny_run, tmp_path):
    """A 2-cell grid (its validation batch of 500 needs the real test set) on a local Ray instance of 2 CPUs. The
    grid pins 2 torch threads: a task takes the configuration's count, not its 1 CPU (results depend on it)."""
    pytest.importorskip("ray")
    grid = os.path.join(repo_root, "experiments", "grid.py")
    argv = [grid, "--resume", tiny_run, "--model_name", "epoch2.pth", "--dataroot", DATA_ROOT, "--streams",
            "reuse", "--eps", "0.05", "0.1", "--lr", "0.1", "--seeds", "1", "--epochs", "2", "--conditions",
            "poison", "--eval_subset", "100", "--device", "cpu", "--threads", "2"]
    seq = subprocess.run([sys.executable, *argv, "--out", "seq"], cwd=tmp_path, env=ENV, text=True,
                         capture_output=True, timeout=300)
    assert seq.returncode == 0, seq.stderr[-3000:]
    ray = [sys.executable, *argv, "--out", str(tmp_path / "ray"), "--ray", "--ray_local_cpus", "2"]
    par = subprocess.run(ray, cwd=tmp_path, env=ENV, text=True, capture_output=True, timeout=600)
    assert par.returncode == 0, par.stderr[-3000:]
    timing = ("total_seconds", "trigger_step_s")
    runs = sorted(os.path.relpath(os.path.join(d, "summary.json"), tmp_path / "seq")
                  for d, _, files in os.walk(tmp_path / "seq") if "summary.json" in files)
    assert len(runs) == 2
    for run in runs:
        a, b = (json.load(open(tmp_path / side / run)) for side in ("seq", "ray"))
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert open(tmp_path / "seq" / "table.md").read() == open(tmp_path / "ray" / "table.md").read()
    stamp = {run: os.path.getmtime(tmp_path / "ray" / run) for run in runs}
    again = subprocess.run(ray, cwd=tmp_path, env=ENV, text=True, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert stamp == {run: os.path.getmtime(tmp_path / "ray" / run) for run in runs}  # finished cells reused
    config = json.load(open(tmp_path / "ray" / os.path.dirname(runs[0]) / "config.json"))
    assert config["config"]["run"]["threads"] == 2 and config["environment"]["threads"] == 2
    stamp = {run: os.path.getmtime(tmp_path / "seq" / run) for run in runs}
    over_seq = subprocess.run([*ray[:-5], "--out", "seq", *ray[-3:]], cwd=tmp_path, env=ENV,
                              text=True, capture_output=True, timeout=600)
    assert over_seq.returncode == 0, over_seq.stderr[-3000:]  # relative paths there, absolute in the tasks: same runs
    assert stamp == {run: os.path.getmtime(tmp_path / "seq" / run) for run in runs}
