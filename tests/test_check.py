"""The check against the published runs (utils/report/check.py) and the pinned CPU kernels it relies on: two
fingerprints compared (constructed cases), then through the real command line: a re-run of the same configuration
is identical, a run under other CPU kernels differs from the first burn-in epoch, and the portable kernels make
the other kernel setting give the same floats."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from utils.core.train import PORTABLE_KERNELS
from utils.report.check import compare, first_step_difference
from utils.report.reproduction import check_published


def fingerprint() -> dict:
    return {"preset": {"name": "cpu", "base": {"run": {"seed": 20, "out": "a"}}},
            "burn_ins": {"0": [{"epoch": 1, "test_err": 0.2, "sha256": "a1"}, {"epoch": 2, "test_err": 0.1, "sha256": "a2"}]},
            "runs": {"ST_s20": {"steps": [[0.1, -2.0, 0.3], [0.12, -2.5, 0.4]], "summary": {"steps": 2}},
                     "DSC_s20": {"steps": [[0.1, -2.0, 0.3]], "summary": {"steps": 1}}},
            "claims": [{"key": "k", "claim": "c", "mean": 1.0, "low": 0.5, "high": 1.5, "verdict": "holds"}]}


def test_identical_fingerprints_are_identical_and_places_do_not_count():
    mine = fingerprint()
    mine["preset"]["base"]["run"]["out"] = "elsewhere"  # a results folder is a place, not a setting
    c = compare(mine, fingerprint())
    assert c.identical and c.runs_identical == c.runs_compared == 2 and c.burn_ins_compared == 1
    assert c.claims[0]["inside"] and c.claims[0]["agree"]


def test_a_setting_the_published_preset_predates_counts_at_its_old_value():
    """burn_in.normalize did not exist when a fingerprint was published: it counts as True (the behaviour then), so
    the same runs are identical with True here and a configuration difference with False."""
    published, mine = fingerprint(), fingerprint()
    mine["preset"]["burn_in"] = {"normalize": True, "memory_format": "contiguous"}
    assert compare(mine, published).identical
    mine["preset"]["burn_in"]["normalize"] = False
    assert compare(mine, published).config_diff == ["burn_in.normalize: True published, False here"]
    mine["preset"]["burn_in"] = {"memory_format": "channels_last"}  # published before it: contiguous then
    assert compare(mine, published).config_diff == ["burn_in.memory_format: 'contiguous' published, 'channels_last' here"]


def test_the_first_difference_is_located_in_burn_in_runs_and_claims():
    mine = fingerprint()
    mine["burn_ins"]["0"][1] = {"epoch": 2, "test_err": 0.11, "sha256": "b2"}
    mine["runs"]["ST_s20"]["steps"][1][1] = -2.4
    mine["runs"]["DSC_s20"]["summary"]["steps"] = 9
    mine["claims"][0].update(mean=2.0, verdict="inconclusive")
    mine["preset"]["base"]["run"]["seed"] = 21
    c = compare(mine, fingerprint())
    assert not c.identical
    assert c.burn_ins == ["burn-in 0: weights differ from epoch 2 on (test error 0.11 here, 0.1 published)"]
    assert c.runs_identical == 0 and c.first_run_difference == "ST_s20, step 1: alignment -2.4 here, -2.5 published"
    assert c.config_diff == ["base.run.seed: 20 published, 21 here"]
    assert not c.claims[0]["inside"] and not c.claims[0]["agree"]
    assert first_step_difference([[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]) == "1 steps here, 2 published"


def _reproduce(repo_root, small_data, tmp_path, name, env_extra, native, published=None):
    """A tiny cpu preset (two burn-ins, one seed, two rows) through the command line, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    env.update(env_extra)
    kernels = ["--set", "run.kernels=native", "--set", "burn_in.kernels=native"] if native else []
    argv = [sys.executable, "reproduce.py", "--ckpt", str(tmp_path / f"ck_{name}"), "--out", str(tmp_path / name),
            "--dataroot", small_data, "--width", "4", "--burnin_epochs", "2", "--save_freq", "1", "--online_epoch", "2",
            "--memorized_epoch", "1", "--epochs", "2", "--seeds", "1", "--eval_subset", "100", "--threshold", "1.0",
            "--set", "preset.burn_in_seeds=0,1", "--set", "preset.only=ST_trigger_alone,ST", "--set",
            "attack.val_size=100", "--set", "measure.detector_fit_samples=100", *kernels,
            *(["--published", str(tmp_path / published)] if published else [])]
    done = subprocess.run(argv, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_with_no_published_fingerprint_the_check_says_so_and_writes_check_md(tmp_path):
    text = check_published(fingerprint(), str(tmp_path / "nothing"), str(tmp_path))
    assert text.startswith("(no published runs to check against") and "fingerprint.json does not exist" in text
    assert (tmp_path / "check.md").read_text() == text and not (tmp_path / "check.json").exists()


@pytest.mark.slow
def test_the_check_says_identical_on_a_re_run_and_where_other_kernels_first_differ(repo_root, small_data, tmp_path):
    first = _reproduce(repo_root, small_data, tmp_path, "a", {}, native=True)
    # without --published it checks against docs/results/cpu, a run of another configuration, and says so
    assert "configuration: DIFFERENT from the published one" in first and "==> DIFFERENT" in first
    again = _reproduce(repo_root, small_data, tmp_path, "b", {}, native=True, published="a")
    assert "==> IDENTICAL" in again and "all 4 identical to the published ones" in again
    other = _reproduce(repo_root, small_data, tmp_path, "c", {"ATEN_CPU_CAPABILITY": "default"}, native=True,
                       published="a")
    assert "==> DIFFERENT" in other and "burn-in 0: weights differ from epoch 1 on" in other
    check = json.load(open(tmp_path / "c" / "check.json"))
    assert check["identical"] is False and check["config_diff"] == []  # the same configuration, other kernels


@pytest.mark.slow
def test_portable_kernels_give_the_same_floats_whatever_kernels_the_environment_asks_for(repo_root, small_data,
                                                                                            tmp_path):
    _reproduce(repo_root, small_data, tmp_path, "p", {}, native=False)
    imitation = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}
    other = _reproduce(repo_root, small_data, tmp_path, "q", imitation, native=False, published="p")
    assert "==> IDENTICAL" in other
    env = json.load(open(next((tmp_path / "q" / "runs").iterdir()) / "config.json"))["environment"]
    assert env["cpu_kernels"]["aten_capability"] == "AVX2" and env["cpu_kernels"]["MKL_CBWR"] == "AVX2,STRICT"


@pytest.mark.slow
def test_portable_kernels_refuse_a_process_that_already_chose_others(repo_root):
    code = ("import torch; torch.ones(4).exp().sum()\n"
            "from utils.core.train import use_cpu_kernels\n"
            "from utils.errors import UserError\n"
            "try:\n    use_cpu_kernels('portable')\nexcept UserError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    env["ATEN_CPU_CAPABILITY"] = "default"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "refused:" in done.stdout and "DEFAULT" in done.stdout and "start a new one" in done.stdout, done.stderr
