"""Real faults, not simulated ones: every writer on a real full disk (a small tmpfs that the kernel fills), and the
scripts that run them. After the fault: one ``error:`` line naming the file, every ``.jsonl`` ends in a whole line,
no temporary file, earlier files intact; with space freed the same command gives the results of a run that never
failed (docs/ROBUSTNESS.md, "A full disk")."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DATA_ROOT

from utils.core.checkpoint import load_checkpoint, save_checkpoint
from utils.core.data import DATASETS
from utils.core.models import build_model, model_spec
from utils.errors import UserError
from utils.io.results import FolderLock, append_jsonl, append_line, copy_folder, read_jsonl, write_json
from utils.report.plots import pyplot, save_figure

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FULL = "No space left on device"


def _whole_lines(path: str) -> list[dict]:
    """Every line of a .jsonl file is whole JSON and the file ends in a newline (or is empty)."""
    data = open(path, "rb").read()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends in the middle of a line: {data[-40:]!r}"
    return [json.loads(line) for line in data.decode().splitlines()]


def _no_temporaries(folder: str) -> None:
    left = glob.glob(os.path.join(folder, "**", ".tmp-*"), recursive=True)
    left += glob.glob(os.path.join(folder, "**", ".lock"), recursive=True)
    assert left == [], f"left behind: {left}"


def _model():
    return build_model(model_spec("cnn", DATASETS["fashion-mnist"]))  # 29 k parameters: a ~120 KB checkpoint


# ------------------------------------------------------------------------------ each writer, in process

@pytest.mark.parametrize("append", [append_jsonl, append_line], ids=["jsonl", "log-line"])
def test_appends_on_a_real_full_disk_keep_whole_lines(small_disk, append):
    path = os.path.join(small_disk.path, "steps.jsonl")
    small_disk.fill(leave=64 * 1024)
    written = []
    with pytest.raises(UserError) as e:
        for i in range(10_000):  # lines of ~3 KB: one of them meets the end of the disk part-way
            line = {"t": i, "pad": "x" * 3000}
            append(path, line if append is append_jsonl else json.dumps(line))
            written.append(line)
    assert repr(path) in str(e.value) and FULL in str(e.value) and "free some space" in str(e.value)
    assert 0 < len(written) < 10_000 and _whole_lines(path) == written  # the cut line is gone, the rest intact
    small_disk.free()
    append(path, {"t": "after"} if append is append_jsonl else json.dumps({"t": "after"}))
    assert _whole_lines(path) == written + [{"t": "after"}]


def test_a_checkpoint_on_a_real_full_disk_is_one_clear_error(small_disk):
    """torch.save reports a full disk as 'unexpected pos …' (a RuntimeError); the writer names the file instead."""
    model, spec = _model(), model_spec("cnn", DATASETS["fashion-mnist"])
    first = os.path.join(small_disk.path, "epoch1.pth")
    save_checkpoint(first, model, spec, epoch=1, err_cls=0.5, args={})
    small_disk.fill(leave=16 * 1024)
    second = os.path.join(small_disk.path, "epoch2.pth")
    with pytest.raises(UserError) as e:
        save_checkpoint(second, model, spec, epoch=2, err_cls=0.4, args={})
    assert repr(second) in str(e.value) and "free some space" in str(e.value)
    assert not os.path.exists(second) and load_checkpoint(first)["epoch"] == 1
    _no_temporaries(small_disk.path)
    small_disk.free()
    save_checkpoint(second, model, spec, epoch=2, err_cls=0.4, args={})
    assert load_checkpoint(second)["epoch"] == 2


def test_a_rewritten_json_on_a_real_full_disk_keeps_the_old_file(small_disk):
    path = os.path.join(small_disk.path, "summary.json")
    write_json(path, {"old": True})
    small_disk.fill(leave=0)
    with pytest.raises(UserError, match="summary.json"):
        write_json(path, {"new": "x" * 100_000})
    assert json.load(open(path)) == {"old": True}
    _no_temporaries(small_disk.path)


def test_a_figure_on_a_real_full_disk_leaves_no_half_drawn_file(small_disk):
    plt = pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig, ax = plt.subplots()
    ax.imshow(torch.rand(400, 400).numpy())  # a PNG of ~100 KB
    small_disk.fill(leave=8 * 1024)
    path = os.path.join(small_disk.path, "accuracy.png")
    with pytest.raises(UserError, match="accuracy.png"):
        save_figure(plt, fig, path)
    assert not os.path.exists(path) and plt.get_fignums() == []
    _no_temporaries(small_disk.path)


def test_a_copied_run_on_a_real_full_disk_is_whole_or_absent(small_disk, tmp_path):
    source = tmp_path / "run"
    source.mkdir()
    for i in range(8):
        (source / f"part{i}.bin").write_bytes(os.urandom(64 * 1024))
    small_disk.fill(leave=200 * 1024)
    dest = os.path.join(small_disk.path, "copy")
    with pytest.raises(UserError, match="copy"):
        copy_folder(str(source), dest)
    assert not os.path.exists(dest) and os.listdir(small_disk.path) == ["ballast"]
    small_disk.free()
    copy_folder(str(source), dest)
    assert sorted(os.listdir(dest)) == sorted(os.listdir(source))


def test_the_folder_lock_on_a_real_full_disk_is_one_clear_error(small_disk):
    folder = os.path.join(small_disk.path, "out")
    os.makedirs(folder)
    small_disk.fill(leave=0)
    with pytest.raises(UserError, match=r"\.lock.*free some space"):
        with FolderLock(folder):
            pass
    _no_temporaries(folder)


# ------------------------------------------------------------------------------ the scripts, as a user runs them

def _run(argv: list[str], cwd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=ENV, text=True, capture_output=True, timeout=600,
                          **kw)


def _one_error_line(done: subprocess.CompletedProcess, folder: str) -> str:
    """Exit 1 and one ``error:`` line (no traceback) naming a file under ``folder`` and saying what to do."""
    err = done.stderr.strip()
    assert done.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: could not write '{folder}") and FULL in err and "free some space" in err, err
    return err


def _online(tiny_run: str, small_data: str, out: str) -> list[str]:
    return ["online_accu_train.py", "--resume", tiny_run, "--model_name", "epoch2.pth", "--memorized_model",
            os.path.join(tiny_run, "epoch1.pth"), "--device", "cpu", "--dataroot", small_data, "--no_download",
            "--out", out, "--batch_size", "50", "--test_batch_size", "100", "--epochs", "8", "--threshold", "1",
            "--detectors", "md", "loss", "lid", "--detector_fit_samples", "200"]


@pytest.mark.slow
def test_an_online_run_whose_disk_fills_then_the_same_command(small_disk, tiny_run, small_data, repo_root, tmp_path):
    out = os.path.join(small_disk.path, "runs", "run")
    steps = os.path.join(out, "steps.jsonl")
    small_disk.fill_when(lambda: os.path.exists(steps) and open(steps).read().count("\n") >= 2, leave=0)
    err = _one_error_line(_run(_online(tiny_run, small_data, out), repo_root), out)
    for path in glob.glob(os.path.join(out, "*.jsonl")):
        _whole_lines(path)
    assert not os.path.exists(os.path.join(out, "summary.json")) and json.load(open(os.path.join(out, "config.json")))
    _no_temporaries(out)
    small_disk.free()
    again = _run(_online(tiny_run, small_data, out), repo_root)
    assert again.returncode == 0 and "replacing the unfinished run" in again.stdout, again.stderr
    clean = str(tmp_path / "clean" / "run")
    assert _run(_online(tiny_run, small_data, clean), repo_root).returncode == 0
    same = _run(["scripts/compare_runs.py", os.path.dirname(clean), os.path.dirname(out)], repo_root)
    assert same.returncode == 0 and "run -> run: identical" in same.stdout, (err, same.stdout)


def _burn_in(small_data: str, outf: str) -> list[str]:
    return ["train_cifar.py", "--dataset", "fashion-mnist", "--arch", "cnn", "--dataroot", small_data,
            "--no_download", "--device", "cpu", "--outf", outf, "--epochs", "3", "--batch_size", "100",
            "--test_batch_size", "100", "--save_freq", "1", "--threads", "1"]


@pytest.mark.slow
def test_a_burn_in_whose_disk_fills_during_a_checkpoint_then_resume(small_disk, small_data, repo_root, tmp_path):
    """The disk fills after epoch 1's checkpoints, leaving room for the log and history lines of epoch 2 but not its
    ~120 KB checkpoint; --resume with space freed ends with the weights of a burn-in that never failed."""
    outf = os.path.join(small_disk.path, "burn")
    small_disk.fill_when(lambda: os.path.exists(os.path.join(outf, "last.pth")), leave=24 * 1024)
    err = _one_error_line(_run(_burn_in(small_data, outf), repo_root), outf)
    assert ".pth'" in err, err  # the checkpoint write is what met the full disk
    assert load_checkpoint(os.path.join(outf, "epoch1.pth"))["epoch"] == 1
    assert [h["epoch"] for h in _whole_lines(os.path.join(outf, "history.jsonl"))][0] == 1
    _no_temporaries(outf)
    small_disk.free()
    resumed = _run(_burn_in(small_data, outf) + ["--resume"], repo_root)
    assert resumed.returncode == 0, resumed.stderr
    clean = str(tmp_path / "clean")
    assert _run(_burn_in(small_data, clean), repo_root).returncode == 0
    for name in ("epoch2.pth", "epoch3.pth", "last.pth"):
        assert load_checkpoint(os.path.join(outf, name))["net_sha256"] == \
            load_checkpoint(os.path.join(clean, name))["net_sha256"], name
    assert [h["epoch"] for h in _whole_lines(os.path.join(outf, "history.jsonl"))] == [1, 2, 3]


def _reproduce(run: str, out: str) -> list[str]:
    """The cpu preset's claims rows on the tiny burn-in (reused) and the real test set (the preset's validation
    batch needs more than the small copy's 200 images)."""
    return ["reproduce.py", "--ckpt", run, "--dataroot", DATA_ROOT, "--width", "4", "--burnin_epochs", "2",
            "--save_freq", "1", "--online_epoch", "2", "--memorized_epoch", "1", "--epochs", "1", "--seeds", "1",
            "--set", "preset.burn_in_seeds=0", "--set", "preset.only=ST_trigger_alone,ST_clean_stream,ST,DSC",
            "--eval_subset", "100", "--out", out]


@pytest.mark.slow
def test_reports_whose_disk_fills_then_the_same_command(small_disk, tiny_run, repo_root, tmp_path):
    """The runs finished, the disk full when the reports are written (room for small files, not the figures): one
    line; with space freed the same command reuses the runs and writes the reports of a run that never failed."""
    run = str(tmp_path / "burn")
    shutil.copytree(tiny_run, run)
    clean, out = str(tmp_path / "clean"), os.path.join(small_disk.path, "results")
    assert _run(_reproduce(run, clean), repo_root).returncode == 0
    assert _run(_reproduce(run, out), repo_root).returncode == 0
    reports = [n for n in os.listdir(out) if os.path.isfile(os.path.join(out, n)) and n != "preset.json"]
    for name in reports:
        os.remove(os.path.join(out, name))
    small_disk.fill(leave=24 * 1024)
    _one_error_line(_run(_reproduce(run, out), repo_root), out)
    _no_temporaries(out)
    small_disk.free()
    again = _run(_reproduce(run, out) + ["--published", clean], repo_root)
    assert again.returncode == 0, again.stderr
    assert sorted(n for n in os.listdir(out) if n in reports) == sorted(reports)
    check = json.load(open(os.path.join(out, "check.json")))
    assert check["runs_identical"] == check["runs_compared"] > 0 and not check["burn_ins"], check
    for name in ("claims.csv", "table.csv"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(clean, name)).read(), name
