"""The online phase: the stream, the result files, controls, measurements, reproducibility (SPEC "Phase 2",
"The attack", "Detectors", quirks). Runs go through online_accu_train's flags, in process."""
import json
import os
import sys

import pytest
import torch

import online_accu_train
from utils.online.config import OnlineConfig
from utils.core.data import DATASETS, Split
from utils.detect.detectors import DETECTORS
from utils.io.results import read_jsonl
from utils.core.stream import Stream

INFO = DATASETS["fashion-mnist"]
TIMING = ("total_seconds", "trigger_step_s")


def run(tiny_run, small_data, out, *extra):
    argv = ["--resume", tiny_run, "--model_name", "epoch2.pth", "--memorized_model",
            os.path.join(tiny_run, "epoch1.pth"), "--dataroot", small_data, "--no_download", "--device", "cpu",
            "--out", str(out), "--batch_size", "50", "--test_batch_size", "100", "--lr", "0.1", "--threshold",
            "1.0", "--use_advtrigger", "--epsilon", "0.05", *extra]
    assert online_accu_train.main(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    steps = read_jsonl(os.path.join(out, "steps.jsonl")) if os.path.exists(os.path.join(out, "steps.jsonl")) else []
    return summary, steps


@pytest.fixture
def go(tiny_run, small_data, tmp_path):
    return lambda name, *extra: run(tiny_run, small_data, tmp_path / name, *extra)


def _split(fashion_mnist, n=1000):
    return Split(fashion_mnist.train.x[:n], fashion_mnist.train.y[:n])


def test_default_stream_is_distinct_batches(fashion_mnist):
    stream = Stream(_split(fashion_mnist), 100, shuffle=False, reuse_first=False, augment=None,
                    generator=torch.Generator())
    trigger = set(stream.indices(0).tolist())
    seen = []
    for _, (k, x, y) in zip(range(5), stream):
        idx = set(stream.indices(k).tolist())
        assert not idx & trigger
        assert all(not idx & s for s in seen)
        seen.append(idx)


def test_reuse_first_batch_is_the_trigger_batch_reaugmented(fashion_mnist):
    stream = Stream(_split(fashion_mnist), 100, shuffle=False, reuse_first=True, augment=INFO,
                    generator=torch.Generator())
    arrivals = [x for _, (k, x, y) in zip(range(3), stream) if k == 0]
    assert len(arrivals) == 3
    assert torch.equal(stream.indices(0), torch.arange(100))
    assert not torch.equal(arrivals[0], arrivals[1])  # same images, new augmentation


def test_end_to_end_writes_its_files_and_the_whole_config(go, tmp_path):
    summary, steps = go("r", "--epochs", "3")
    config = json.load(open(tmp_path / "r" / "config.json"))
    cfg = OnlineConfig.from_dict(config["config"])
    assert cfg.defence == "ST" and cfg.stream.steps == 3 and cfg.attack.epsilon == 0.05
    assert len(config["val_indices"]) == 100 and config["checkpoint"]["run_id"]
    assert {"torch", "torchvision", "numpy", "git_commit", "git_dirty"} <= set(config["environment"])
    assert [s["t"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert {"t", "batch", "test_err", "alignment", "md_poison", "md_clean", "md_noise"} <= set(s)
    for key in ("err_burn_in", "err_end_accumulative", "err_before_trigger", "err_after_trigger", "delta",
                "steps", "stop_reason", "total_seconds", "md_auroc_poison_vs_clean", "alignment_start"):
        assert key in summary
    assert summary["steps"] == 3 and summary["stop_reason"] == "epochs"
    assert summary["delta"] == pytest.approx(summary["err_after_trigger"] - summary["err_before_trigger"])
    assert len(read_jsonl(tmp_path / "r" / "md.jsonl")) == 3
    assert sorted(os.listdir(tmp_path / "r")) == ["config.json", "log.txt", "md.jsonl", "steps.jsonl", "summary.json"]


def test_step_timings_add_up_to_the_step(go):
    _, steps = go("t", "--epochs", "2", "--med", "DSC", "--detectors", "loss", "spectral")
    for s in steps:
        parts = [v for k, v in s.items() if k.endswith("_s") and k != "step_s"]
        assert {"stream_s", "craft_s", "md_s", "detectors_s", "defend_s", "eval_s", "alignment_s"} <= set(s)
        assert sum(parts) == pytest.approx(s["step_s"], rel=1e-9)


def test_same_seed_same_run_and_controls_differ(go):
    a, sa = go("a", "--epochs", "2", "--seed", "3")
    b, sb = go("b", "--epochs", "2", "--seed", "3")
    clean, sc = go("c", "--epochs", "2", "--seed", "3", "--no_poison")
    assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    assert [s["test_err"] for s in sa] == [s["test_err"] for s in sb]
    assert [s["alignment"] for s in sa] != [s["alignment"] for s in sc]


def test_threshold_stops_the_phase(go):
    summary, steps = go("t", "--epochs", "5", "--threshold", "0.0")
    assert summary["stop_reason"] == "threshold" and summary["steps"] == 1 and len(steps) == 1


def test_trigger_alone_control(go):
    summary, steps = go("z", "--epochs", "0")
    assert summary["steps"] == 0 and steps == []
    assert summary["err_before_trigger"] == summary["err_burn_in"]


def test_dsc_reports_md_and_its_steps(go):
    s, steps = go("d", "--epochs", "2", "--med", "OURS", "--dsc_tau0", "0", "--dsc_kappa", "0",
                  "--dsc_max_steps", "3")
    assert s["dsc_mean_steps"] == 3 and [x["dsc_steps"] for x in steps] == [3, 3]
    assert 0.0 <= s["md_auroc_poison_vs_clean"] <= 1.0 and 0.0 <= s["md_auroc_poison_vs_noise"] <= 1.0


def test_calibrated_dsc_sets_tau_from_clean_batches(go, tmp_path):
    go("c", "--epochs", "1", "--med", "DSC", "--dsc_calibrate", "0.5", "--dsc_calibrate_batches", "4")
    cal = json.load(open(tmp_path / "c" / "config.json"))["dsc"]
    assert cal["calibrated"] and len(cal["clean_batch_md"]) == 4
    assert cal["kappa"] == pytest.approx(0.02 * cal["tau0"] / 0.5)


def test_detectors_are_scored_on_every_batch(go, tmp_path):
    s, _ = go("det", "--epochs", "2", "--detectors", "all", "--detector_fit_samples", "300")
    assert list(s["detectors"]) == list(DETECTORS)
    for name, figures in s["detectors"].items():
        for key in ("auroc_poison_vs_clean", "auroc_poison_vs_noise", "tpr_at_5fpr_poison_vs_clean"):
            assert 0.0 <= figures[key] <= 1.0, (name, key)
    lines = read_jsonl(tmp_path / "det" / "detectors.jsonl")
    assert [line["t"] for line in lines] == [0, 1] and len(lines[0]["kd"]["poison"]) == 50
    # MD as a detector is the MD measurement, sample for sample
    md = read_jsonl(tmp_path / "det" / "md.jsonl")
    assert lines[0]["md"]["poison"] == pytest.approx(md[0]["poison"], rel=1e-5, abs=1e-7)
    assert s["detectors"]["md"]["auroc_poison_vs_clean"] == pytest.approx(s["md_auroc_poison_vs_clean"])


def test_adaptive_attacker_run(go):
    plain, _ = go("p", "--epochs", "2", "--epsilon", "0.1")
    adaptive, _ = go("a", "--epochs", "2", "--epsilon", "0.1", "--adaptive_md", "10")
    assert adaptive["md_mean"]["poison"] < plain["md_mean"]["poison"]


def test_the_readme_example_adds_a_measurement_and_a_defender(go, repo_root, monkeypatch):
    """examples/custom_parts.py, which docs/LIBRARY.md shows whole: one class each, registered, nothing else."""
    from utils.defense import defenders as defenses
    from utils.detect import measure

    monkeypatch.setattr(measure, "MEASUREMENTS", list(measure.MEASUREMENTS))
    monkeypatch.setattr(defenses, "DEFENDERS", dict(defenses.DEFENDERS))
    monkeypatch.syspath_prepend(os.path.join(repo_root, "examples"))
    monkeypatch.delitem(sys.modules, "custom_parts", raising=False)
    import custom_parts  # noqa: F401  (registers its two classes)

    summary, steps = go("ex", "--epochs", "2", "--med", "half")
    assert all(s["received_loss"] > 0 and "received_loss_s" in s for s in steps)
    assert summary["steps"] == 2
    readme = open(os.path.join(repo_root, "docs", "LIBRARY.md")).read()
    assert open(os.path.join(repo_root, "examples", "custom_parts.py")).read().strip() in readme
