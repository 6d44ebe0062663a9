"""The reproduction driver on a tiny preset: table, CSV and plots, numbers equal to the runs' summaries."""
import builtins
import csv
import json
import os

import pytest

import reproduce
from utils.checkpoint import save_checkpoint
from utils.data import DATASETS
from utils.models import build_model, model_spec
from utils.train import set_seed


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    set_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    spec = model_spec("cnn", DATASETS["fashion-mnist"], width=4)
    for epoch in (1, 2):
        save_checkpoint(str(folder / f"epoch{epoch}.pth"), build_model(spec), spec, epoch=epoch, err_cls=0.5,
                        args={})
    return str(folder)


def _argv(ckpt, out):
    return ["--ckpt", ckpt, "--width", "4", "--save_freq", "1", "--online_epoch", "2", "--memorized_epoch", "1",
            "--epochs", "2", "--seeds", "1", "--eval_subset", "500", "--threshold", "1.0", "--out", str(out)]


def test_driver_writes_table_and_plots_matching_the_runs(tiny_ckpt, tmp_path):
    assert reproduce.main(_argv(tiny_ckpt, tmp_path)) == 0
    for name in ("table.md", "table.csv", "preset.json", "accuracy.png", "md_over_stream.png", "md_histogram.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    rows = {r["defence"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert set(rows) == {"ST (trigger alone)", "ST (clean stream + trigger)", "ST", "AT", "DSC", "DSC (calibrated τ)"}
    for label, row in rows.items():
        summary = json.load(open(tmp_path / "runs" / f"{reproduce.slug(label)}_s1" / "summary.json"))
        assert float(row["acc_after_trigger"]) == pytest.approx(100 * (1 - summary["err_after_trigger"]), abs=0.051)
        assert float(row["trigger_drop"]) == pytest.approx(
            100 * (summary["err_after_trigger"] - summary["err_before_trigger"]), abs=0.051)
        assert float(row["acc_burn_in"]) == pytest.approx(100 * (1 - summary["err_burn_in"]), abs=0.051)
    assert "MD AUROC" in open(tmp_path / "table.md").read()
    # a second call reuses the finished runs and a changed configuration is refused
    mtime = os.path.getmtime(tmp_path / "runs" / "ST_s1" / "summary.json")
    reproduce.main(_argv(tiny_ckpt, tmp_path))
    assert os.path.getmtime(tmp_path / "runs" / "ST_s1" / "summary.json") == mtime
    with pytest.raises(reproduce.UserError, match="--fresh"):
        reproduce.main(_argv(tiny_ckpt, tmp_path) + ["--lr", "0.05"])


def test_driver_completes_without_matplotlib(tiny_ckpt, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert reproduce.main(_argv(tiny_ckpt, tmp_path) + ["--dsc_calibrate", "0"]) == 0
    assert os.path.exists(tmp_path / "table.md") and not os.path.exists(tmp_path / "accuracy.png")
    assert "matplotlib is not installed" in capsys.readouterr().out
