"""feder_accu_train.py's bad inputs through the real command line (docs/ROBUSTNESS.md, "Federated learning"): a
non-zero exit, ONE `error:` line naming the flag and what to do, no traceback, and nothing left behind (no results
folder when the run failed before its first round, no .tmp-*/.lock file, finished results untouched). And a
successful run with the authors' flags."""
from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys
import time

import pytest

from conftest import N_TEST, N_TRAIN

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FED = ["feder_accu_train.py", "--resume", "{run}", "--model_name", "epoch2.pth", "--dataroot", "{small}",
       "--no_download", "--device", "cpu", "--out", "{out}", "--clients", "4", "--malicious", "0.25", "--batch_size",
       "20", "--test_batch_size", "50", "--root_size", "20", "--rounds", "1", "--eval_subset", "100"]


@dataclasses.dataclass
class Case:
    extra: list[str]
    words: list[str]
    code: int = 1
    kept: bool = False  # {out} holds a finished run whose files must stay untouched


CASES: dict[str, Case] = {
    "clients-zero": Case(["--clients", "0"], ["--clients", "[1, 10000]", "got 0"]),
    "local-steps-zero": Case(["--local_steps", "0"], ["--local_steps", "[1, 1000]"]),
    "batch-zero": Case(["--batch_size", "0"], ["--batch_size", ">= 1"]),
    "alpha-zero": Case(["--split", "dirichlet", "--alpha", "0"], ["--alpha", "(0, 1000000]", "got 0"]),
    "alpha-nan": Case(["--alpha", "nan"], ["--alpha", "a finite number"]),
    "malicious-zero": Case(["--malicious", "0"], ["--malicious", "(0, 1]"]),
    "malicious-all": Case(["--malicious", "1"], ["4 of the 4 clients malicious", "at least one must be honest"]),
    "aggregator-unknown": Case(["--aggregator", "bulyan"], ["unknown --aggregator 'bulyan'", "fedavg, clip"]),
    "aggregator-too-few-clients": Case(["--aggregator", "krum"], ["krum needs at least 5 updates", "2f + 3",
                                                                 "--clients"]),
    "md-screen-too-few-clients": Case(["--aggregator", "md_screen", "--clients", "2", "--malicious", "0.5"],
                                      ["md_screen needs at least 3 updates"]),
    "multikrum-more-than-clients": Case(["--clients", "6", "--aggregator", "multikrum", "--multikrum_m", "8"],
                                        ["multikrum needs at least 8", "--multikrum_m 8"]),
    "trim-half": Case(["--trim", "0.5"], ["--trim", "below 0.5"]),
    "both-thresholds": Case(["--threshold", "0.3", "--threshold_delta", "0.1"], ["at most one of --threshold"]),
    "lr-nan": Case(["--lr", "nan"], ["--lr", "a finite number"]),
    "boost-negative": Case(["--boost=-2"], ["--boost", "(0, 1000000]"]),
    "lambda-zero": Case(["--feder_lambda", "0"], ["--feder_lambda", "(0, 1000000]"]),
    "server-lr-with-attacker-only": Case(["--attacker_only", "--server_lr", "0.5"], ["--attacker_only",
                                                                                   "--server_lr 1"]),
    "adaptive-without-poison": Case(["--adaptive_md", "1", "--no_poison"], ["--adaptive_md", "--no_poison"]),
    "split-unknown": Case(["--split", "pathological"], ["--split", "invalid choice"], code=2),
    "root-larger-than-data": Case(["--root_size", "100000"], ["--root_size 100000", f"{N_TRAIN}"]),
    "trigger-larger-than-shard": Case(["--batch_size", "500"], ["attacker's shard", "--batch_size 500"]),
    "validation-larger-than-test-set": Case(["--test_batch_size", "100000"], ["--test_batch_size", f"({N_TEST})"]),
    "eval-subset-larger-than-test-set": Case(["--eval_subset", "5000"], ["--eval_subset 5000", f"({N_TEST})"]),
    "dirichlet-empty-client": Case(["--split", "dirichlet", "--alpha", "0.01", "--clients", "60", "--malicious",
                                    "0.02", "--batch_size", "1"], ["Dirichlet(0.01)", "no samples", "--alpha"]),
    "flower-cpus-zero": Case(["--flower", "--flower_cpus", "0"], ["--flower_cpus", "(0, 4096]"]),
    "flower-and-superlink": Case(["--flower", "--flower_superlink", "127.0.0.1:9091"],
                                 ["give one of --flower", "--flower_superlink"]),
    "superlink-not-host-port": Case(["--flower_superlink", "localhost"], ["--flower_superlink must be HOST:PORT",
                                                                          "got 'localhost'"]),
    "results-exist": Case([], ["already holds results", "--overwrite"], kept=True),
}


def _finished(folder: str) -> dict[str, bytes]:
    os.makedirs(folder)
    files = {"rounds.jsonl": b'{"t": 1}\n', "summary.json": b'{"delta": 0.5}\n', "config.json": b"{}\n"}
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data, tiny_run, repo_root):
    """Every case as its own process, a few at a time; and one good run with the authors' flags."""
    base = tmp_path_factory.mktemp("fedcli")
    jobs, kept = {}, {}
    cases = {**CASES, "good": Case(["--attacker_only", "--epochs", "2", "--feder_lambda", "0.01", "--use_bn",
                                    "--mode", "train", "--momentum", "0.9", "--workers", "0"], [], code=0)}
    for name, case in cases.items():
        out = str(base / name / "out")
        if case.kept:
            kept[name] = _finished(out)
        argv = [a.format(run=tiny_run, small=small_data, out=out) for a in FED + case.extra]
        jobs[name] = (argv, out)
    results, pending, running = {}, list(jobs), {}
    while pending or running:
        while pending and len(running) < 6:
            name = pending.pop(0)
            proc = subprocess.Popen([sys.executable, *jobs[name][0]], cwd=repo_root, env=ENV, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            running[name] = proc
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                out, err = proc.communicate()
                results[name] = (proc.returncode, out, err, jobs[name][1])
                del running[name]
        time.sleep(0.05)
    return results, kept


@pytest.mark.parametrize("case", list(CASES))
def test_federated_bad_input(runs, case):
    results, kept = runs
    code, out, err, folder = results[case]
    spec = CASES[case]
    assert code == spec.code, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    if spec.code == 2:
        assert lines[0].startswith("usage: ") and ": error: argument" in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in spec.words:
        assert word in err, (word, err)
    parent = os.path.dirname(folder)
    assert glob.glob(os.path.join(parent, "**", ".tmp-*"), recursive=True) == []
    assert glob.glob(os.path.join(parent, "**", ".lock"), recursive=True) == []
    if spec.kept:
        assert {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)} == kept[case]
    else:
        assert not os.path.exists(folder), os.listdir(folder)


def test_the_authors_flags_run_their_experiment(runs):
    code, out, err, folder = runs[0]["good"]
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["config.json", "log.txt", "rounds.jsonl", "summary.json"]
    assert "[fedavg] start err" in out


def test_every_federated_case_is_in_the_robustness_table(repo_root):
    table = open(os.path.join(repo_root, "docs", "ROBUSTNESS.md")).read()
    tests = [f"test_federated_bad_input[{c}]" for c in CASES] + [
        "test_the_authors_flags_run_their_experiment", "test_without_flower_the_flag_says_how_to_install_it",
        "test_a_lost_flower_client_stops_the_run_and_says_which", "test_a_diverged_global_model_is_an_error"]
    assert [t for t in tests if t not in table] == []
