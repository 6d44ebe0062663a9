"""Robustness (docs/ROBUSTNESS.md): bad inputs through the real command line, runs that must not mix, signals,
corrupt inputs, atomic results, security and reproducibility.

Every bad input must give a non-zero exit, ONE line naming the problem and what to do, no traceback (unless
--debug), and nothing half-written or left behind that blocks the corrected command: no .tmp-* file, no
.lock file, and no results folder at all when the run failed before its first step. Each case below is a row
of docs/ROBUSTNESS.md.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import N_TEST, N_TRAIN, tiny_burn_in_config, write_small_fashion_mnist
from utils.burnin.run import run_burn_in
from utils.core.checkpoint import load_checkpoint, save_checkpoint
from utils.core.data import DATASETS
from utils.errors import UserError, run_cli
from utils.core.models import build_model, model_spec
from utils.io.results import append_jsonl, atomic_write, read_jsonl, write_json
from utils.core.train import set_deterministic, set_seed

pytestmark = pytest.mark.slow
INFO = DATASETS["fashion-mnist"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

ONLINE = ["online_accu_train.py", "--resume", "{ck}", "--model_name", "epoch2.pth", "--device", "cpu",
          "--dataroot", "{small}", "--no_download", "--out", "{out}", "--batch_size", "50", "--test_batch_size", "100",
          "--epochs", "2", "--threshold", "1", "--no_alignment"]
ONLINE_RUN = ONLINE + ["--resume", "{run}", "--memorized_model", "{run}/epoch1.pth"]  # a real burn-in's models
BURNIN = ["train_cifar.py", "--dataset", "fashion-mnist", "--arch", "cnn", "--width", "4", "--dataroot", "{small}",
          "--no_download", "--device", "cpu", "--outf", "{out}", "--epochs", "1", "--batch_size", "32",
          "--test_batch_size", "100", "--save_freq", "1"]
REPRO = ["reproduce.py", "--ckpt", "{run}", "--dataroot", "{small}", "--width", "4", "--burnin_epochs", "2",
         "--save_freq", "1", "--online_epoch", "2", "--memorized_epoch", "1", "--epochs", "1", "--seeds", "1",
         "--set", "preset.burn_in_seeds=0", "--eval_subset", "100", "--out", "{out}"]  # one burn-in: the fixture's
GRID = ["experiments/grid.py", "--resume", "{run}", "--model_name", "epoch2.pth", "--dataroot", "{small}",
        "--out", "{out}", "--streams", "reuse", "--seeds", "1", "--epochs", "1"]


@dataclasses.dataclass
class Case:
    base: list[str]  # ONLINE, BURNIN, ... ; later flags override earlier ones (argparse: the last one wins)
    extra: list[str]
    words: list[str]  # each must appear in the message ({...}: the paths of the fixture)
    leaves: str = "nothing"  # nothing | partial (config + finished steps) | config | kept (old files untouched)
    code: int = 1
    absent: tuple[str, ...] = ()  # words that must NOT appear in the message
    copy_run: bool = False  # {out} starts as a copy of the finished tiny burn-in (the case may change it)


def nan_case(base: list[str], flag: str, value: str = "nan", rule: str = "a finite number") -> Case:
    return Case(base, [flag, value], [flag, rule])


CASES: dict[str, Case] = {
    # checkpoints
    "ckpt-folder-missing": Case(ONLINE, ["--resume", "{nope}"], ["{nope}", "does not exist", "train_cifar.py"]),
    "ckpt-file-missing": Case(ONLINE, ["--model_name", "epoch9.pth"], ["epoch9.pth", "not found", "epoch2.pth"]),
    "ckpt-truncated": Case(ONLINE, ["--resume", "{trunc}"], ["corrupt or truncated", "re-create"], absent=("Errno",)),
    "ckpt-truncated-resume": Case(BURNIN, ["--resume", "{trunc}"], ["last.pth", "corrupt or truncated"],
                                  absent=("Errno",)),
    "ckpt-flipped-byte": Case(ONLINE, ["--resume", "{flipped}"], ["corrupt", "content hash", "changed byte"]),
    "ckpt-no-err-cls": Case(ONLINE, ["--resume", "{noerr}"], ["'err_cls'", "test error", "not written by"]),
    "ckpt-no-rng-resume": Case(BURNIN, ["--resume", "{norng}"], ["no optimizer/RNG state", "cannot be resumed"]),
    "ckpt-wrong-shapes": Case(ONLINE, ["--resume", "{shapes}"], ["do not fit", "in the file but", "in the model"]),
    "ckpt-is-a-folder": Case(ONLINE, ["--resume", "{dirck}"], ["is a folder, not a file"]),
    "ckpt-dangling-link": Case(ONLINE, ["--resume", "{dangle}"], ["broken symbolic link", "does not exist"]),
    "ckpt-text-file": Case(ONLINE, ["--resume", "{text}"], ["is not a checkpoint", "text file"]),
    "ckpt-other-arch": Case(ONLINE, ["--arch", "resnet18"], ["arch='cnn'", "arch='resnet18'"]),
    "ckpt-other-arch-resume": Case(BURNIN, ["--arch", "resnet18", "--resume", "{ck}"], ["arch='cnn'", "resnet18"]),
    "ckpt-other-dataset": Case(ONLINE, ["--dataset", "cifar10"], ["dataset='fashion-mnist'", "dataset='cifar10'"]),
    "ckpt-other-classes": Case(ONLINE, ["--resume", "{classes}"], ["5 classes", "10 classes"]),
    "ckpt-inf-weights": Case(ONLINE, ["--resume", "{inf}"], ["NaN/inf", "earlier checkpoint"]),
    "ckpt-pickled-object": Case(ONLINE, ["--resume", "{evil_ns}"], ["not plain data", "argparse.Namespace"]),
    "ckpt-pickled-code": Case(ONLINE, ["--resume", "{evil_code}"], ["not plain data", ".system", "none of it ran"]),
    "memorized-mismatch": Case(ONLINE, ["--memorized_model", "{wide}"], ["memorized model", "width=6", "width=4"]),
    "memorized-missing-dsc": Case(ONLINE, ["--med", "DSC"], ["epoch20.pth", "not found"]),
    "memorized-other-run": Case(ONLINE_RUN, ["--memorized_model", "{other_run}/epoch1.pth"],
                                ["another burn-in run", "--allow_other_run"]),
    # runs never mix
    "burnin-into-existing-outf": Case(BURNIN, [], ["already holds a burn-in", "--resume", "--overwrite"],
                                      leaves="kept", copy_run=True),
    "results-exist": Case(ONLINE, ["--out", "{results}"], ["already holds results", "--overwrite"], leaves="kept"),
    "overwrite-then-bad-input": Case(ONLINE, ["--out", "{results}", "--overwrite", "--test_batch_size", "100000"],
                                     ["--test_batch_size"], leaves="kept"),
    "burnin-resume-and-overwrite": Case(BURNIN, ["--resume", "--overwrite"], ["--resume", "--overwrite", "give one"]),
    # flags: names and types
    "unknown-dataset": Case(ONLINE, ["--dataset", "imagenet"], ["imagenet", *DATASETS]),
    "unknown-arch": Case(ONLINE, ["--arch", "vgg16"], ["vgg16", "resnet18, cnn"]),
    "unknown-med": Case(ONLINE, ["--med", "TRADES"], ["TRADES", "ST, AT, DSC"]),
    "unknown-detector": Case(ONLINE, ["--detectors", "lof"], ["--detectors", "md, md_reverse", "'lof'"]),
    "not-a-number": Case(ONLINE, ["--epsilon", "abc"], ["--epsilon", "invalid float value"], code=2),
    "log-name-a-path": Case(ONLINE, ["--log_name", "../x.txt"], ["--log_name", "plain file name"]),
    "log-name-reserved": Case(ONLINE, ["--log_name", "summary.json"], ["--log_name", "summary.json"]),
    # flags: NaN and infinities
    "nan-lr": nan_case(ONLINE, "--lr"),
    "nan-gamma": nan_case(ONLINE, "--gamma"),
    "nan-dsc-tau0": nan_case(ONLINE, "--dsc_tau0"),
    "nan-threshold": nan_case(ONLINE, "--threshold"),
    "nan-threshold-delta": nan_case([a for a in ONLINE if a not in ("--threshold", "1")], "--threshold_delta"),
    "inf-epsilon": nan_case(ONLINE, "--epsilon", "inf"),
    "nan-momentum": nan_case(ONLINE, "--momentum"),
    "nan-beta": nan_case(ONLINE, "--beta"),
    "nan-adaptive-md": Case(ONLINE, ["--adaptive_md=-inf"], ["--adaptive_md", "a finite number"]),
    "nan-burnin-lr": nan_case(BURNIN, "--lr"),
    "nan-burnin-weight-decay": nan_case(BURNIN, "--weight_decay"),
    "nan-reproduce-epsilon": nan_case(REPRO, "--epsilon"),
    "nan-grid-eps": Case(GRID, ["--eps", "nan"], ["--epsilon", "a finite number"]),
    # flags: signs and ranges
    "epsilon-out-of-range": Case(ONLINE, ["--epsilon", "1.5"], ["--epsilon", "[0, 1]", "1.5"]),
    "num-steps-negative": Case(ONLINE, ["--num-steps", "-1"], ["--num-steps", "[0, 1000]", "-1"]),
    "num-steps-hours": Case(ONLINE, ["--num-steps", "1000000"], ["--num-steps", "[0, 1000]", "run for hours"]),
    "poison-scale-out-of-range": Case(ONLINE, ["--poison_scale", "1.5"], ["--poison_scale", "[0, 1]"]),
    "clipvalue-negative": Case(ONLINE, ["--clip_gradnorm", "--clipvalue", "-1"], ["--clipvalue", "> 0", "-1"]),
    "momentum-negative": Case(ONLINE, ["--momentum", "-0.9"], ["--momentum", "[0, 1]"]),
    "weight-decay-negative": Case(ONLINE, ["--weight_decay=-1e-4"], ["--weight_decay", "[0, 1]"]),
    "at-step-negative": Case(ONLINE, ["--at_step", "-0.02"], ["--at_step", "[0, 1]"]),
    "dsc-step-negative": Case(ONLINE, ["--dsc_step", "-0.02"], ["--dsc_step", "[0, 1]"]),
    "seed-negative": Case(ONLINE, ["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    "seed-too-large": Case(BURNIN, ["--seed", str(2 ** 32)], ["--seed", "[0, 4294967295]", "4294967296"]),
    "save-freq-zero": Case(BURNIN, ["--save_freq", "0"], ["--save_freq", ">= 1"]),
    "burnin-epochs-zero": Case(BURNIN, ["--epochs", "0"], ["--epochs", ">= 1"]),
    "workers-negative": Case(ONLINE, ["--workers", "-1"], ["--workers", ">= 0"]),
    "threads-negative": Case(ONLINE, ["--threads", "-1"], ["--threads", "[0, 4096]", "-1"]),
    "burnin-threads-negative": Case(BURNIN, ["--threads", "-2"], ["--threads", "[0, 4096]", "-2"]),
    "reproduce-threads-negative": Case(REPRO, ["--threads", "-1"], ["--threads", "[0, 4096]", "-1"]),
    # flags: combinations and sizes
    "both-thresholds": Case(ONLINE, ["--threshold", "0.2", "--threshold_delta", "0.05"],
                            ["exactly one of --threshold", "--threshold_delta"]),
    "calibrate-with-zero-tau0": Case(ONLINE, ["--dsc_tau0", "0", "--dsc_calibrate", "0.9"],
                                     ["--dsc_calibrate", "--dsc_tau0 > 0"]),
    "calibration-larger-than-test-set": Case(ONLINE, ["--med", "DSC", "--memorized_model", "{ck}/epoch2.pth",
                                                      "--dsc_calibrate", "0.9", "--dsc_calibrate_batches", "100"],
                                             ["--dsc_calibrate_batches 100", f"({N_TEST})", "at most 4"]),
    "eval-subset-larger-than-test-set": Case(ONLINE, ["--eval_subset", "5000"], ["--eval_subset 5000", f"({N_TEST})"]),
    "adaptive-without-poison": Case(ONLINE, ["--adaptive_md", "1", "--no_poison"], ["--adaptive_md", "--no_poison"]),
    "batch-larger-than-data": Case(ONLINE, ["--batch_size", "100000"], ["--batch_size 100000", f"{N_TRAIN}"]),
    "batch-larger-than-data-burnin": Case(BURNIN, ["--batch_size", "100000"], ["100000", "--batch_size"]),
    "test-batch-larger-than-test-set": Case(ONLINE, ["--test_batch_size", "100000"],
                                            ["--test_batch_size", f"({N_TEST})"]),
    "label-out-of-range": Case(ONLINE, ["--dataroot", "{badlabels}"], ["label(s) outside [0, 10)", "corrupt"]),
    # reproduce.py: a table only for what ran
    "reproduce-dataset-reaches-the-runs": Case(REPRO, ["--dataset", "svhn"],
                                               ["another configuration", "--dataset 'fashion-mnist' -> 'svhn'"]),
    "reproduce-repeated-seeds": Case(REPRO, ["--seeds", "1", "1"], ["--seeds", "distinct"]),
    "reproduce-epoch-not-saved": Case(REPRO, ["--save_freq", "2"], ["is not saved by the burn-in",
                                                                   "multiple of --save_freq (2)"]),
    "reproduce-other-configuration": Case(REPRO, ["--out", "{old_repro}"], ["another configuration", "--fresh"],
                                          leaves="kept"),
    "reproduce-published-missing": Case(REPRO, ["--published", "{empty_data}"],
                                        ["--published", "{empty_data}", "no fingerprint.json"]),
    "cpu-kernels-unknown": Case(ONLINE, ["--cpu_kernels", "fast"], ["--cpu_kernels", "native, portable", "fast"]),
    # data, output folder, device
    "data-folder-empty": Case(ONLINE, ["--dataroot", "{empty_data}"], ["fashion-mnist", "{empty_data}", "To fix"],
                              absent=("download=True",)),
    "data-folder-incomplete": Case(BURNIN, ["--dataroot", "{part_data}"],
                                   ["could not load fashion-mnist", "{part_data}", "To fix"]),
    "out-unwritable": Case(ONLINE, ["--out", "{afile}/sub"], ["cannot write", "{afile}/sub", "--out"]),
    "out-unwritable-burnin": Case(BURNIN, ["--outf", "{afile}/sub"], ["cannot write", "{afile}/sub", "--outf"]),
    "device-missing": Case(ONLINE, ["--device", "cuda"], ["no CUDA GPU", "--device cpu"]),
    "device-unknown": Case(ONLINE, ["--device", "gpu0"], ["unknown device", "cpu, cuda or cuda:N"]),
    # divergence
    "nan-online": Case(ONLINE, ["--lr", "1e30", "--epochs", "5"], ["NaN/inf", "online step", "lower --lr"],
                       leaves="partial"),
    "nan-trigger": Case(ONLINE, ["--lr", "1e30", "--epochs", "0", "--niter", "3"], ["NaN/inf", "trigger step"],
                        leaves="config"),
    "nan-burnin": Case(BURNIN, ["--lr", "1e30"], ["training loss", "lower --lr"], leaves="config"),
}
SUCCESS = {  # runs that must work
    "repro-a": ONLINE + ["--deterministic", "--seed", "3", "--threads", "2"],
    "repro-b": ONLINE + ["--deterministic", "--seed", "3", "--threads", "2"],
    "burnin-deterministic": BURNIN + ["--deterministic"],
    "burnin-overwrite": BURNIN + ["--overwrite"],  # {out} starts as a copy of the tiny run (see COPY_RUN)
    "after-failed-burnin": BURNIN + ["--outf", "{failed_burnin}"],  # the corrected command after nan-burnin
    "stale-temps-removed": ONLINE + ["--out", "{stale}", "--overwrite"],
    "debug": ONLINE + ["--med", "TRADES", "--debug"],  # fails, with a traceback
}
COPY_RUN = {"burnin-overwrite"}


class Payload:
    """Unpickling this would run a shell command (it must never run)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save(path: str, spec, model=None, **extra) -> None:
    save_checkpoint(path, model if model is not None else build_model(spec), spec, epoch=2, err_cls=0.5, args={},
                    **extra)


def _bad_checkpoints(p: dict[str, str], spec, model) -> None:
    """Checkpoints that are broken in one way each, at <folder>/epoch2.pth (or last.pth)."""
    for name in ("epoch2.pth", "last.pth"):
        _save(os.path.join(p["trunc"], name), spec, model)
        raw = open(os.path.join(p["trunc"], name), "rb").read()
        open(os.path.join(p["trunc"], name), "wb").write(raw[:len(raw) // 2])
    _save(os.path.join(p["flipped"], "epoch2.pth"), spec, model)
    raw = bytearray(open(os.path.join(p["flipped"], "epoch2.pth"), "rb").read())
    at = raw.find(model.fc.weight.detach().numpy().tobytes()[:64]) + 9  # a byte inside fc.weight's data
    raw[at] ^= 0x10
    open(os.path.join(p["flipped"], "epoch2.pth"), "wb").write(bytes(raw))
    torch.save({"net": model.state_dict(), "model": spec.to_dict(), "epoch": 2},
               os.path.join(p["noerr"], "epoch2.pth"))
    _save(os.path.join(p["norng"], "last.pth"), spec, model, optimizer=None, rng=None)
    wide = build_model(model_spec("cnn", INFO, width=6))
    _save(os.path.join(p["shapes"], "epoch2.pth"), spec, wide)  # the description says width 4, the weights are 6
    os.makedirs(os.path.join(p["dirck"], "epoch2.pth"))
    os.symlink(os.path.join(p["dangle"], "gone.pth"), os.path.join(p["dangle"], "epoch2.pth"))
    open(os.path.join(p["text"], "epoch2.pth"), "w").write("lr: 0.1\nepochs: 40\n")
    _save(os.path.join(p["classes"], "epoch2.pth"), dataclasses.replace(spec, num_classes=5))
    broken = build_model(spec)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("inf")
    _save(os.path.join(p["inf"], "epoch2.pth"), spec, broken)
    state = {"net": model.state_dict(), "model": spec.to_dict(), "epoch": 2, "err_cls": 0.5}
    torch.save({**state, "args": argparse.Namespace(lr=0.1)}, os.path.join(p["evil_ns"], "epoch2.pth"))
    torch.save({**state, "args": Payload(p["marker"])}, os.path.join(p["evil_code"], "epoch2.pth"))


def _bad_labels(folder: str) -> None:
    """The small data, with the first test label set to 10 (Fashion-MNIST has 0..9)."""
    write_small_fashion_mnist(folder)
    path = os.path.join(folder, "FashionMNIST", "raw", "t10k-labels-idx1-ubyte")
    raw = bytearray(open(path, "rb").read())
    raw[8] = 10
    open(path, "wb").write(bytes(raw))


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_data):
    """The small dataset, two real tiny burn-ins, good and bad checkpoints, and the paths the cases name."""
    base = tmp_path_factory.mktemp("robust")
    names = ("ck", "empty_data", "part_data", "trunc", "flipped", "noerr", "norng", "shapes", "dirck", "dangle",
             "text", "classes", "inf", "evil_ns", "evil_code", "nope", "afile", "marker", "badlabels", "run",
             "other_run", "old_repro", "failed_burnin", "stale")
    p = {k: str(base / k) for k in names}
    p["small"] = small_data
    for k in names[:15]:
        if k not in ("empty_data", "part_data"):
            os.makedirs(p[k])
    write_small_fashion_mnist(p["part_data"], test=False)
    os.makedirs(p["empty_data"])
    _bad_labels(p["badlabels"])
    set_seed(0)
    spec = model_spec("cnn", INFO, width=4)
    model = build_model(spec)
    _save(os.path.join(p["ck"], "epoch2.pth"), spec, model)
    p["wide"] = os.path.join(p["ck"], "wide.pth")
    _save(p["wide"], model_spec("cnn", INFO, width=6))
    _bad_checkpoints(p, spec, model)
    open(p["afile"], "w").write("a regular file, not a folder\n")
    run_burn_in(tiny_burn_in_config(small_data, p["run"]))
    run_burn_in(tiny_burn_in_config(small_data, p["other_run"], seed=1))
    _old_results(p["old_repro"] + "/runs/ST_trigger_alone_s1", config={"config": {"defence": "ST"}})
    os.makedirs(p["failed_burnin"])
    open(os.path.join(p["failed_burnin"], "log.txt"), "w").write("epoch 1 diverged\n")
    open(os.path.join(p["failed_burnin"], "config.json"), "w").write("{}\n")
    os.makedirs(p["stale"])
    open(os.path.join(p["stale"], ".tmp-summary.json"), "w").write('{"half": ')
    return base, p


def _argv(argv: list[str], paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) for a in argv]


def _old_results(folder: str, config: dict | None = None) -> dict[str, str]:
    os.makedirs(folder)
    files = {"steps.jsonl": '{"t": 0, "test_err": 0.25}\n', "summary.json": '{"delta": 0.5}\n'}
    if config is not None:
        files["config.json"] = json.dumps(config) + "\n"
    for name, text in files.items():
        open(os.path.join(folder, name), "w").write(text)
    return files


def _snapshot(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def _jobs(base, paths: dict[str, str]) -> tuple[dict, dict]:
    """(name -> (argv, paths)) of every case and success run, and the files that must stay untouched."""
    jobs, old = {}, {}
    for name, case in {**CASES, **{k: Case(v, [], []) for k, v in SUCCESS.items()}}.items():
        if name == "device-missing" and torch.cuda.is_available():
            continue
        p = {**paths, "out": str(base / name / "out"), "results": str(base / name / "results")}
        if case.copy_run or name in COPY_RUN:
            shutil.copytree(paths["run"], p["out"])
        if case.leaves == "kept":
            folder = {"results": p["results"], "out": p["out"]}.get("results" if "{results}" in case.extra
                                                                     else "out")
            if "{old_repro}" in case.extra:
                folder = os.path.join(paths["old_repro"], "runs", "ST_trigger_alone_s1")
            elif "{results}" in case.extra:
                _old_results(p["results"])
            old[name] = (folder, _snapshot(folder))
        jobs[name] = (_argv(case.base + case.extra, p), p)
    return jobs, old


@pytest.fixture(scope="module")
def runs(world, repo_root):
    """Every case and success run as its own process, a few at a time (each pays torch's import)."""
    base, paths = world
    jobs, old = _jobs(base, paths)
    results, pending, running = {}, list(jobs), {}
    while pending or running:
        while pending and len(running) < 6:
            name = pending.pop(0)
            logs = [open(base / f"{name}.{stream}", "w+") for stream in ("stdout", "stderr")]  # pipes could fill
            proc = subprocess.Popen([sys.executable, *jobs[name][0]], cwd=repo_root, env=ENV, text=True,
                                    stdout=logs[0], stderr=logs[1])
            running[name] = (proc, time.time(), logs)
        for name, (proc, started, logs) in list(running.items()):
            if proc.poll() is None and time.time() - started > 300:
                proc.kill()  # a hung case fails its own test, not the whole module
                proc.wait()
            if proc.poll() is not None:
                texts = []
                for f in logs:
                    f.seek(0)
                    texts.append(f.read())
                    f.close()
                results[name] = (proc.returncode, *texts, jobs[name][1])
                del running[name]
        time.sleep(0.05)
    return results, old


def _no_leftovers(folder: str) -> None:
    """No half-written file (.tmp-*) and no lock file anywhere below ``folder``."""
    assert glob.glob(os.path.join(folder, "**", ".tmp-*"), recursive=True) == []
    assert glob.glob(os.path.join(folder, "**", ".lock"), recursive=True) == []


def _check_message(case: Case, code: int, out: str, err: str, p: dict) -> None:
    assert code == case.code, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    if case.code == 2:  # argparse's own refusal: the usage, then one error line
        assert lines[0].startswith("usage: ") and ": error: argument" in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in case.words:
        assert word.format(**p) in err, (word, err)
    for word in case.absent:
        assert word not in err, (word, err)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(runs, case):
    results, old = runs
    if case not in results:
        pytest.skip("a CUDA GPU is available here, so --device cuda is valid")
    code, out, err, p = results[case]
    spec = CASES[case]
    _check_message(spec, code, out, err, p)
    # nothing half-written anywhere: not in this case's folder, nor next to the checkpoints
    _no_leftovers(os.path.dirname(p["out"]))
    _no_leftovers(p["ck"])
    if spec.leaves == "nothing":
        assert not os.path.exists(p["out"]), os.listdir(p["out"])
    elif spec.leaves == "partial":  # the run failed at a step: config and the finished steps, no summary
        assert sorted(os.listdir(p["out"])) == ["config.json", "steps.jsonl"]
        assert len(read_jsonl(os.path.join(p["out"], "steps.jsonl"))) >= 1
    elif spec.leaves == "config":  # failed before its first result (trigger step, first epoch): no summary
        assert sorted(f for f in os.listdir(p["out"]) if f != "log.txt") == ["config.json"]
    else:  # "kept": the files already there are untouched
        folder, files = old[case]
        assert _snapshot(folder) == files
    assert not os.path.exists(p["marker"])  # the pickled payload never ran


def test_debug_shows_the_traceback(runs):
    code, out, err, _ = runs[0]["debug"]
    assert code == 1
    assert "Traceback" in err and "UserError: unknown --med 'TRADES'" in err


def test_burn_in_overwrite_replaces_the_whole_run(runs):
    """--overwrite: the old run's files go (its epoch2.pth too), the new run's checkpoints carry a new run id."""
    code, out, err, p = runs[0]["burnin-overwrite"]
    assert code == 0, err
    assert sorted(os.listdir(p["out"])) == ["config.json", "epoch1.pth", "history.jsonl", "last.pth", "log.txt"]
    assert [h["epoch"] for h in read_jsonl(os.path.join(p["out"], "history.jsonl"))] == [1]
    new_id = load_checkpoint(os.path.join(p["out"], "epoch1.pth"))["run_id"]
    assert new_id and new_id != load_checkpoint(os.path.join(p["run"], "epoch1.pth"))["run_id"]
    assert json.load(open(os.path.join(p["out"], "config.json")))["run_id"] == new_id


def test_a_failed_burn_in_does_not_block_the_corrected_command(runs):
    code, out, err, p = runs[0]["after-failed-burnin"]
    assert code == 0, err
    assert "diverged" not in open(os.path.join(p["failed_burnin"], "log.txt")).read()
    assert load_checkpoint(os.path.join(p["failed_burnin"], "last.pth"))["epoch"] == 1


def test_stale_temporary_files_are_removed_on_the_next_start(runs):
    code, out, err, p = runs[0]["stale-temps-removed"]
    assert code == 0, err
    assert not any(f.startswith(".tmp-") for f in os.listdir(p["stale"])) and "summary.json" in os.listdir(p["stale"])


# ---------------------------------------------------------------------------------------- runs never mix

def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out after {timeout} s")
        time.sleep(0.05)


def _lines(path: str) -> int:
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def _start(argv: list[str], cwd: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=ENV, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kw)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_two_online_runs_on_one_folder_the_second_is_refused(world, repo_root, tmp_path):
    _, paths = world
    out = str(tmp_path / "shared")
    first = _start(_argv(ONLINE, {**paths, "out": out}) + ["--epochs", "100000"], repo_root)
    _wait_for(lambda: _lines(os.path.join(out, "steps.jsonl")) >= 1, first)
    second = subprocess.run([sys.executable, *_argv(ONLINE, {**paths, "out": out}), "--overwrite"], cwd=repo_root,
                            env=ENV, text=True, capture_output=True, timeout=180)
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"another process (pid {first.pid}) is writing to" in second.stderr
    code, err = _stop(first)
    assert code == 130, err
    kept = read_jsonl(os.path.join(out, "steps.jsonl"))  # the first run's lines, whole, in order
    assert [s["t"] for s in kept] == list(range(len(kept))) and len(kept) >= 1
    assert json.load(open(os.path.join(out, "config.json")))["config"]["stream"]["steps"] == 100000
    assert sorted(os.listdir(out)) == ["config.json", "steps.jsonl"]


def test_two_burn_ins_on_one_folder_the_second_is_refused(world, repo_root, tmp_path):
    _, paths = world
    outf = str(tmp_path / "burn")
    first = _start(_argv(BURNIN, {**paths, "out": outf}) + ["--epochs", "1000"], repo_root)
    _wait_for(lambda: os.path.exists(os.path.join(outf, "last.pth")), first)
    second = subprocess.run([sys.executable, *_argv(BURNIN, {**paths, "out": outf}), "--overwrite"], cwd=repo_root,
                            env=ENV, text=True, capture_output=True, timeout=180)
    assert second.returncode == 1 and f"another process (pid {first.pid})" in second.stderr, second.stderr
    code, err = _stop(first)
    assert code == 130, err
    assert os.path.exists(os.path.join(outf, "last.pth"))  # --overwrite of the refused run deleted nothing
    assert load_checkpoint(os.path.join(outf, "last.pth"))["epoch"] >= 1


def test_default_results_folders_are_unique(world, repo_root, tmp_path):
    """Two runs started at once without --out (timestamps to the second) get two folders."""
    _, paths = world
    argv = [os.path.join(repo_root, a) if a.endswith(".py") else a
            for a in _argv(ONLINE, {**paths, "out": "x"})]
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    procs = [_start(argv, str(tmp_path)) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    folders = os.listdir(tmp_path / "runs")
    assert len(folders) == 2 and all(f.isascii() and " " not in f for f in folders)
    assert all(os.path.exists(tmp_path / "runs" / f / "summary.json") for f in folders)


# ------------------------------------------------------------------------------------------- signals

def test_ctrl_c_online_keeps_finished_steps(world, repo_root, tmp_path):
    _, paths = world
    out = str(tmp_path / "out")
    proc = _start(_argv(ONLINE, {**paths, "out": out}) + ["--epochs", "100000"], repo_root)
    _wait_for(lambda: _lines(os.path.join(out, "steps.jsonl")) >= 1, proc)
    code, err = _stop(proc)
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted (Ctrl-C): ") and "steps.jsonl" in err and "same command runs it again" in err
    kept = read_jsonl(os.path.join(out, "steps.jsonl"))  # every line is whole JSON
    assert len(kept) >= 1 and [s["t"] for s in kept] == list(range(len(kept)))
    assert sorted(os.listdir(out)) == ["config.json", "steps.jsonl"]  # no summary.json, no .tmp-*, no .lock


def test_sigterm_online_is_handled_like_ctrl_c(world, repo_root, tmp_path):
    _, paths = world
    out = str(tmp_path / "out")
    proc = _start(_argv(ONLINE, {**paths, "out": out}) + ["--epochs", "100000"], repo_root)
    _wait_for(lambda: _lines(os.path.join(out, "steps.jsonl")) >= 1, proc)
    code, err = _stop(proc, signal.SIGTERM)
    assert code == 143 and len(err.strip().splitlines()) == 1 and err.startswith("interrupted (SIGTERM): "), err
    assert "steps.jsonl" in err and read_jsonl(os.path.join(out, "steps.jsonl"))
    assert sorted(os.listdir(out)) == ["config.json", "steps.jsonl"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_interrupted_burn_in_then_resume_continues(world, repo_root, tmp_path, sig, code):
    _, paths = world
    outf = str(tmp_path / "burn")
    argv = _argv(BURNIN, {**paths, "out": outf})
    proc = _start(argv + ["--epochs", "1000"], repo_root)
    _wait_for(lambda: os.path.exists(os.path.join(outf, "last.pth")), proc)
    got, err = _stop(proc, sig)
    assert got == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted (") and "--resume" in err
    _no_leftovers(outf)
    done = load_checkpoint(os.path.join(outf, "last.pth"))["epoch"]  # a whole checkpoint, never a partial one
    assert done >= 1
    resumed = subprocess.run([sys.executable, *argv, "--epochs", str(done + 1), "--resume"], cwd=repo_root, env=ENV,
                             text=True, capture_output=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(os.path.join(outf, "last.pth"))["epoch"] == done + 1
    # one history line per epoch, even if the signal fell between an epoch's line and its checkpoint
    assert [h["epoch"] for h in read_jsonl(os.path.join(outf, "history.jsonl"))] == list(range(1, done + 2))
    assert f"resumed from {os.path.join(outf, 'last.pth')} (epoch {done}" in open(os.path.join(outf, "log.txt")).read()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_interrupt_while_torch_is_imported_prints_one_line(repo_root, sig, code):
    proc = subprocess.Popen([sys.executable, "train_cifar.py", "--help"], cwd=repo_root, env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.4)  # Python is up and utils.errors installed its handlers; torch takes seconds to import
    assert proc.poll() is None, "the script finished before it could be interrupted"
    got, err = _stop(proc, sig)
    assert got == code and err.strip().splitlines() == [
        f"interrupted: {'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'} while starting; nothing was written"], err


# ------------------------------------------------------------------------------------------ run_*.sh

def test_run_script_resolves_relative_paths_against_the_callers_folder(world, repo_root, tmp_path):
    _, paths = world
    shutil.copytree(paths["run"], tmp_path / "mine" / "ckpt")
    env = {**ENV, "CKPT": "mine/ckpt", "MODEL": "epoch2.pth", "OUT": "mine/out", "EPOCHS": "1",
           "EXTRA": f"--dataroot {paths['small']} --no_download --test_batch_size 100 --device cpu"}
    done = subprocess.run(["bash", os.path.join(repo_root, "run_st.sh")], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.path.exists(tmp_path / "mine" / "out" / "summary.json")
    assert os.path.exists(tmp_path / "mine" / "out" / "log_test_online_adv.txt")


def test_run_script_without_a_virtual_environment_says_how_to_make_one(repo_root, tmp_path):
    os.makedirs(tmp_path / "scripts")
    shutil.copy(os.path.join(repo_root, "run_at.sh"), tmp_path)
    shutil.copy(os.path.join(repo_root, "scripts", "run_online.sh"), tmp_path / "scripts")
    env = {k: v for k, v in ENV.items() if k != "PY"}
    done = subprocess.run(["bash", str(tmp_path / "run_at.sh")], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "make venv" in done.stderr


# ------------------------------------------------------------------------------------ machine faults

def _cli(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    return e.value.code, capsys.readouterr().err


def test_full_disk_during_a_run_is_one_line(capsys):
    def main(_):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/steps.jsonl")

    code, err = _cli(main, capsys)
    assert code == 1 and err.strip().splitlines() == [err.strip()]
    assert err.startswith("error: could not write '/results/steps.jsonl': No space left on device; free some space")


def test_gpu_out_of_memory_is_one_line(capsys):
    def main(_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79 GiB total)")

    code, err = _cli(main, capsys)
    assert code == 1 and "the GPU ran out of memory" in err and "--batch_size" in err and "Traceback" not in err


def test_a_full_disk_never_leaves_half_a_line(tmp_path, monkeypatch):
    path = str(tmp_path / "md.jsonl")
    append_jsonl(path, {"t": 0, "poison": [0.1, 0.2]})

    def disk_full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="could not write .* free some space"):
        append_jsonl(path, {"t": 1, "poison": [0.3] * 1000})
    monkeypatch.undo()
    assert read_jsonl(path) == [{"t": 0, "poison": [0.1, 0.2]}]


# ---------------------------------------------------------------------------------------------- nothing lost

def test_interrupted_writes_keep_the_old_file(tmp_path, monkeypatch):
    """Ctrl-C while a result or a checkpoint is being written: the previous file is intact, no temp file remains."""
    path = str(tmp_path / "summary.json")
    write_json(path, {"delta": 0.5})

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"delta": 0.9})
    monkeypatch.undo()
    assert json.load(open(path)) == {"delta": 0.5}
    spec = model_spec("cnn", INFO, width=4)
    ckpt = str(tmp_path / "last.pth")
    _save(ckpt, spec)
    real_save = torch.save

    def half_then_interrupt(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, build_model(spec), spec, epoch=3, err_cls=0.1, args={})
    monkeypatch.undo()
    assert load_checkpoint(ckpt)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last.pth", "summary.json"]


def test_atomic_write_flushes_and_append_jsonl_syncs_every_line(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write(str(tmp_path / "a.txt"), lambda tmp: open(tmp, "w").write("x"))
    assert len(synced) == 1
    for t in range(3):
        append_jsonl(str(tmp_path / "steps.jsonl"), {"t": t})
    assert len(synced) == 4 and read_jsonl(str(tmp_path / "steps.jsonl")) == [{"t": 0}, {"t": 1}, {"t": 2}]


# -------------------------------------------------------------------------------------------------- security

def _repo_python_files(repo_root: str) -> list[str]:
    skip = {".venv", ".git", "data", "results", "runs", "__pycache__", ".pytest_cache"}
    files = []
    for folder, dirs, names in os.walk(repo_root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith("checkpoints")]
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return files


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else ""


def test_every_torch_load_is_weights_only_and_nothing_is_evaluated(repo_root):
    loads, problems = 0, []
    for path in _repo_python_files(repo_root):
        rel = os.path.relpath(path, repo_root)
        for node in ast.walk(ast.parse(open(path).read(), rel)):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name == "torch.load":
                loads += 1
                if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords):
                    problems.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            elif name in ("eval", "exec"):
                problems.append(f"{rel}:{node.lineno}: {name}()")
            elif name in ("pickle.load", "pickle.loads") and not rel.startswith("tests"):
                problems.append(f"{rel}:{node.lineno}: {name}() outside the tests")
    assert loads >= 2  # the scan sees utils/checkpoint.py's and utils/measure.py's loads
    assert problems == []


# ------------------------------------------------------------------------------------------- reproducibility

def test_same_seed_same_summary_through_the_cli(runs):
    results, _ = runs
    summaries, configs = [], []
    for name in ("repro-a", "repro-b"):
        code, out, err, p = results[name]
        assert code == 0, err
        summaries.append(json.load(open(os.path.join(p["out"], "summary.json"))))
        configs.append(json.load(open(os.path.join(p["out"], "config.json"))))
    timing = ("total_seconds", "trigger_step_s")
    a, b = ({k: v for k, v in s.items() if k not in timing} for s in summaries)
    assert a == b
    config = configs[0]
    run = config["config"]["run"]
    assert run["seed"] == 3 and run["deterministic"] is True and config["device"] == "cpu"
    env = config["environment"]
    assert env["torch"] == torch.__version__ and {"torchvision", "numpy", "python", "platform", "threads"} <= set(env)
    assert env["deterministic"] is True
    assert run["threads"] == 2 and env["threads"] == 2  # --threads reached torch (the tests' processes start with 1)


def test_burn_in_records_its_configuration(runs):
    code, out, err, p = runs[0]["burnin-deterministic"]
    assert code == 0, err
    ckpt = load_checkpoint(os.path.join(p["out"], "last.pth"))
    assert ckpt["args"]["deterministic"] is True and ckpt["run_id"]
    config = json.load(open(os.path.join(p["out"], "config.json")))
    assert config["config"]["deterministic"] is True and config["run_id"] == ckpt["run_id"]
    assert "'deterministic': True" in open(os.path.join(p["out"], "log.txt")).read()


def test_deterministic_on_cuda_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        set_deterministic(torch.device("cuda"))  # sets flags only; touches no GPU
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        torch.backends.cudnn.deterministic = False


# ------------------------------------------------------------------------------------------------------ docs

def test_every_case_is_in_the_robustness_table(repo_root):
    table = open(os.path.join(repo_root, "docs", "ROBUSTNESS.md")).read()
    tests = [f"test_bad_input[{c}]" for c in CASES] + [
        name for name in globals() if name.startswith("test_") and name != "test_bad_input"]
    assert [t for t in tests if t not in table] == []
