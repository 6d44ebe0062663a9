"""The online phase: the stream, the result files, controls, reproducibility (SPEC "Phase 2", quirks)."""
import json
import os

import pytest
import torch

import online_accu_train
from utils.checkpoint import save_checkpoint
from utils.data import DATASETS, Split, load_split
from utils.errors import UserError
from utils.models import build_model, model_spec
from utils.online import Stream
from utils.results import read_jsonl
from utils.train import set_seed

INFO = DATASETS["fashion-mnist"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A tiny untrained-but-valid fashion-mnist CNN checkpoint (online phase mechanics only)."""
    set_seed(0)
    spec = model_spec("cnn", INFO, width=4)
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(str(folder / "epoch2.pth"), build_model(spec), spec, epoch=2, err_cls=0.5, args={})
    return str(folder)


def run(ckpt_dir, out, *extra):
    argv = ["--resume", ckpt_dir, "--model_name", "epoch2.pth", "--device", "cpu", "--out", str(out),
            "--batch_size", "50", "--test_batch_size", "100", "--lr", "0.1", "--threshold", "1.0",
            "--use_advtrigger", *extra]
    assert online_accu_train.main(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    steps = read_jsonl(os.path.join(out, "steps.jsonl")) if os.path.exists(os.path.join(out, "steps.jsonl")) else []
    return summary, steps


def _split(n=1000):
    train = load_split("fashion-mnist", "data", True, download=False)
    return Split(train.x[:n], train.y[:n])


def test_default_stream_is_distinct_batches():
    stream = Stream(_split(), 100, shuffle=False, reuse_first=False, augment=None, generator=torch.Generator())
    trigger = set(stream.indices(0).tolist())
    seen = []
    for _, (k, x, y) in zip(range(5), stream):
        idx = set(stream.indices(k).tolist())
        assert not idx & trigger
        assert all(not idx & s for s in seen)
        seen.append(idx)


def test_reuse_first_batch_is_the_trigger_batch_reaugmented():
    stream = Stream(_split(), 100, shuffle=False, reuse_first=True, augment=INFO, generator=torch.Generator())
    arrivals = [x for _, (k, x, y) in zip(range(3), stream) if k == 0]
    assert len(arrivals) == 3
    assert torch.equal(stream.indices(0), torch.arange(100))
    assert not torch.equal(arrivals[0], arrivals[1])  # same images, new augmentation


def test_end_to_end_writes_the_three_files(ckpt_dir, tmp_path):
    summary, steps = run(ckpt_dir, tmp_path / "r", "--epochs", "3")
    config = json.load(open(tmp_path / "r" / "config.json"))
    assert config["args"]["med"] == "ST" and len(config["val_indices"]) == 100
    assert {"torch", "torchvision", "numpy"} <= set(config["environment"])
    assert [s["t"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert {"t", "batch", "test_err", "alignment", "craft_s", "defend_s", "eval_s"} <= set(s)
    for key in ("err_burn_in", "err_end_accumulative", "err_before_trigger", "err_after_trigger", "delta",
                "steps", "stop_reason", "total_seconds"):
        assert key in summary
    assert summary["steps"] == 3 and summary["stop_reason"] == "epochs"
    assert summary["delta"] == pytest.approx(summary["err_after_trigger"] - summary["err_before_trigger"])


def test_same_seed_same_run_and_controls_differ(ckpt_dir, tmp_path):
    a, sa = run(ckpt_dir, tmp_path / "a", "--epochs", "2", "--seed", "3")
    b, sb = run(ckpt_dir, tmp_path / "b", "--epochs", "2", "--seed", "3")
    clean, sc = run(ckpt_dir, tmp_path / "c", "--epochs", "2", "--seed", "3", "--no_poison")
    timing = ("total_seconds", "trigger_step_s")
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert [s["test_err"] for s in sa] == [s["test_err"] for s in sb]
    assert [s["alignment"] for s in sa] != [s["alignment"] for s in sc]


def test_threshold_stops_the_phase(ckpt_dir, tmp_path):
    summary, steps = run(ckpt_dir, tmp_path / "t", "--epochs", "5", "--threshold", "0.0")
    assert summary["stop_reason"] == "threshold" and summary["steps"] == 1 and len(steps) == 1


def test_trigger_alone_control(ckpt_dir, tmp_path):
    summary, steps = run(ckpt_dir, tmp_path / "z", "--epochs", "0")
    assert summary["steps"] == 0 and steps == []
    assert summary["err_before_trigger"] == summary["err_burn_in"]


@pytest.mark.parametrize("flags,message", [
    (["--med", "XYZ"], "unknown --med"),
    (["--arch", "resnet18"], "arch"),
    (["--dataset", "cifar10"], "dataset"),
    (["--group_norm", "32"], "norm"),
    (["--epsilon", "1.5"], "epsilon"),
    (["--poison_scale", "-0.1"], "poison_scale"),
    (["--only_reg", "--only_second"], "at most one"),
    (["--model_name", "epoch99.pth"], "not found"),
])
def test_bad_input_is_refused(ckpt_dir, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        run(ckpt_dir, tmp_path / "bad", "--epochs", "1", *flags)


def test_existing_results_are_not_overwritten_silently(ckpt_dir, tmp_path):
    run(ckpt_dir, tmp_path / "o", "--epochs", "0")
    with pytest.raises(UserError, match="--overwrite"):
        run(ckpt_dir, tmp_path / "o", "--epochs", "0")
    run(ckpt_dir, tmp_path / "o", "--epochs", "0", "--overwrite")
