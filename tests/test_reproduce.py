"""The reproduction driver on a shrunk cpu preset: burn-in reuse, table, CSV and plots, numbers equal to the
runs' summaries, finished runs reused, another configuration refused."""
import builtins
import csv
import json
import os

import pytest

import fake_data
import reproduce
from conftest import DATA_ROOT
from utils.errors import UserError
from utils.sweep.presets import cpu_full_preset, paper_preset, smoke

pytestmark = pytest.mark.slow


def _argv(tiny_run, small_data, out, *extra):
    """The tiny burn-in (reused, so its data do not matter here) and the real test set (the validation batch
    of the preset, 500 images, needs more than the small copy's 200)."""
    return ["--preset", "cpu_full", "--ckpt", tiny_run, "--dataroot", DATA_ROOT, "--width", "4", "--burnin_epochs",
            "2", "--save_freq", "1", "--online_epoch", "2", "--memorized_epoch", "1", "--epochs", "2", "--seeds", "1",
            "--set", "preset.burn_in_seeds=0", "--eval_subset", "100", "--threshold", "1.0", "--out", str(out), *extra]


def test_driver_writes_table_and_plots_matching_the_runs(tiny_run, small_data, tmp_path):
    assert reproduce.main(_argv(tiny_run, small_data, tmp_path)) == 0
    for name in ("table.md", "table.csv", "preset.json", "accuracy.png", "md_over_stream.png", "md_histogram.png",
                 "detectors.md", "detectors.csv", "detectors_roc.png", "md_curve.md", "md_curve.csv", "md_curve.png",
                 "claims.md", "claims.csv", "fingerprint.json", "check.md"):
        assert os.path.getsize(tmp_path / name) > 0, name
    detectors = {r["detector"]: r for r in csv.DictReader(open(tmp_path / "detectors.csv"))}
    st = json.load(open(tmp_path / "runs" / "ST_s1" / "summary.json"))
    for name, row in detectors.items():  # the table is the ST run's figures (one seed: no ± part)
        assert float(row["auroc_poison_vs_clean"]) == pytest.approx(  # printed to 3 digits: within half a unit
            st["detectors"][name]["auroc_poison_vs_clean"], abs=5e-4 + 1e-9)  # (+ the float of e.g. 0.3995)
        assert row["auroc_poison_vs_clean_adaptive_l10"]
    curve = list(csv.DictReader(open(tmp_path / "md_curve.csv")))
    assert [int(r["epoch"]) for r in curve] == [1, 2]
    rows = {r["defence"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    slugs = {row.label: row.slug for row in cpu_full_preset().rows()}
    assert set(rows) == set(slugs) and {"AT (PGD ascent)", "AT (authors': CE+KL descent)"} <= set(rows)
    assert all(s.isascii() and " " not in s for s in os.listdir(tmp_path / "runs"))
    for label, row in rows.items():
        summary = json.load(open(tmp_path / "runs" / f"{slugs[label]}_s1" / "summary.json"))
        assert float(row["acc_after_trigger"]) == pytest.approx(100 * (1 - summary["err_after_trigger"]), abs=0.051)
        assert float(row["trigger_drop"]) == pytest.approx(
            100 * (summary["err_after_trigger"] - summary["err_before_trigger"]), abs=0.051)
        assert float(row["acc_burn_in"]) == pytest.approx(100 * (1 - summary["err_burn_in"]), abs=0.051)
    assert "MD AUROC" in open(tmp_path / "table.md").read()
    claims = {r["key"]: r for r in csv.DictReader(open(tmp_path / "claims.csv"))}
    assert claims["attack_vs_trigger_alone"]["verdict"] == "not measured"  # one replicate: no interval
    assert len(json.load(open(tmp_path / "fingerprint.json"))["runs"]) == len(rows)
    # a second call reuses the finished runs; a changed configuration is refused, --fresh replaces it
    mtime = os.path.getmtime(tmp_path / "runs" / "ST_s1" / "summary.json")
    reproduce.main(_argv(tiny_run, small_data, tmp_path))
    assert os.path.getmtime(tmp_path / "runs" / "ST_s1" / "summary.json") == mtime
    with pytest.raises(UserError, match="--fresh") as e:
        reproduce.main(_argv(tiny_run, small_data, tmp_path, "--lr", "0.05"))
    assert "learner.lr: 0.1 -> 0.05" in str(e.value)


def test_driver_completes_without_matplotlib(tiny_run, small_data, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert reproduce.main(_argv(tiny_run, small_data, tmp_path, "--dsc_calibrate", "0", "--epochs", "1")) == 0
    assert os.path.exists(tmp_path / "table.md") and not os.path.exists(tmp_path / "accuracy.png")
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_paper_preset_smoke_runs_every_stage_on_cifar10_files(tmp_path, monkeypatch):
    """--preset paper --smoke: ResNet-18 on CIFAR-10-format files the test writes, every stage tiny, on the CPU."""
    root = str(tmp_path / "data")
    fake_data.install_cifar10(root, monkeypatch, per_batch=60, n_test=100)
    monkeypatch.chdir(tmp_path)  # the preset's relative checkpoints/ and results/ folders land here
    assert reproduce.main(["--preset", "paper", "--smoke", "--dataroot", root, "--device", "cpu"]) == 0
    ckpt, out = tmp_path / "checkpoints" / "cifar10_resnet18_smoke", tmp_path / "results" / "paper_smoke"
    assert {"epoch1.pth", "epoch2.pth", "last.pth"} <= set(os.listdir(ckpt))
    preset = smoke(paper_preset())
    assert preset.burn_in.arch == "resnet18" and preset.burn_in.dataset == "cifar10" and preset.seeds == (20,)
    for row in preset.rows():
        summary = json.load(open(out / "runs" / f"{row.slug}_s20" / "summary.json"))
        steps = summary["steps"]  # random images: the absolute threshold 0.18 may stop a run after its first step
        assert steps == 0 if row.slug == "ST_trigger_alone" else 1 <= steps <= 2, row.slug
    for name in ("table.md", "detectors.md", "md_curve.md", "accuracy.png", "detectors_roc.png", "md_curve.png"):
        assert os.path.getsize(out / name) > 0, name
    assert len(json.load(open(out / "runs" / "ST_s20" / "summary.json"))["detectors"]) == 11
