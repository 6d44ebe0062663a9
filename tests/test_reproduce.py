"""The reproduction driver on a shrunk cpu preset: burn-in reuse, table, CSV and plots, numbers equal to the
runs' summaries, finished runs reused, another configuration refused."""
import builtins
import csv
import json
import os

import pytest

import reproduce
from conftest import DATA_ROOT
from utils.errors import UserError
from utils.presets import cpu_preset

pytestmark = pytest.mark.slow


def _argv(tiny_run, small_data, out, *extra):
    """The tiny burn-in (reused, so its data do not matter here) and the real test set (the validation batch
    of the preset, 500 images, needs more than the small copy's 200)."""
    return ["--ckpt", tiny_run, "--dataroot", DATA_ROOT, "--width", "4", "--burnin_epochs", "2", "--save_freq", "1",
            "--online_epoch", "2", "--memorized_epoch", "1", "--epochs", "2", "--seeds", "1", "--eval_subset", "100",
            "--threshold", "1.0", "--out", str(out), *extra]


def test_driver_writes_table_and_plots_matching_the_runs(tiny_run, small_data, tmp_path):
    assert reproduce.main(_argv(tiny_run, small_data, tmp_path)) == 0
    for name in ("table.md", "table.csv", "preset.json", "accuracy.png", "md_over_stream.png", "md_histogram.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    rows = {r["defence"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    slugs = {row.label: row.slug for row in cpu_preset().rows()}
    assert set(rows) == set(slugs) and {"AT (PGD ascent)", "AT (authors': CE+KL descent)"} <= set(rows)
    assert all(s.isascii() and " " not in s for s in os.listdir(tmp_path / "runs"))
    for label, row in rows.items():
        summary = json.load(open(tmp_path / "runs" / f"{slugs[label]}_s1" / "summary.json"))
        assert float(row["acc_after_trigger"]) == pytest.approx(100 * (1 - summary["err_after_trigger"]), abs=0.051)
        assert float(row["trigger_drop"]) == pytest.approx(
            100 * (summary["err_after_trigger"] - summary["err_before_trigger"]), abs=0.051)
        assert float(row["acc_burn_in"]) == pytest.approx(100 * (1 - summary["err_burn_in"]), abs=0.051)
    assert "MD AUROC" in open(tmp_path / "table.md").read()
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
