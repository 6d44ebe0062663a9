"""Burn-in (train_cifar.py): learning, checkpoints, resume == uninterrupted (its bad inputs through the command
line are in test_robustness.py)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import fake_data
import train_cifar
from utils.core.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.core.data import BatchLoader, Split, train_loader
from utils.errors import UserError
from utils.core.models import build_model, model_spec
from utils.core.train import evaluate, train_epoch


def _subset(split: Split, n: int) -> Split:
    return Split(split.x[:n].clone(), split.y[:n].clone())


@torch.no_grad()
def _loss(model, split: Split) -> float:
    model.eval()
    x, y = split.batch(torch.arange(len(split)))
    return F.cross_entropy(model(x), y).item()


# ---------------------------------------------------------------------------------------------- burn-in

def test_short_burn_in_lowers_training_loss(fashion_mnist):
    sub = _subset(fashion_mnist.train, 2000)
    assert torch.bincount(sub.y, minlength=10).min() > 100  # a subset with every class
    torch.manual_seed(0)
    model = build_model(model_spec("cnn", fashion_mnist.info, width=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loader = BatchLoader(sub, 64, shuffle=True, augment=fashion_mnist.info, generator=torch.Generator().manual_seed(0))
    before, err_before = _loss(model, sub), evaluate(model, sub)
    losses = [train_epoch(model, loader, optimizer)[0] for _ in range(2)]
    after, err_after = _loss(model, sub), evaluate(model, sub)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    assert after < 0.7 * before, (before, after)
    assert err_after < err_before and err_after < 0.5  # well below chance (0.9)


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.fixture
def trained_cnn(fashion_mnist):
    """A tiny cnn after a few SGD steps (so BatchNorm statistics and momentum buffers are not defaults)."""
    spec = model_spec("cnn", fashion_mnist.info, width=4)
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    sub = _subset(fashion_mnist.train, 256)
    train_epoch(model, BatchLoader(sub, 64, shuffle=True, generator=generator), optimizer)
    return spec, model, optimizer, generator, sub


def test_checkpoint_round_trip(tmp_path, trained_cnn):
    spec, model, optimizer, generator, sub = trained_cnn
    path = str(tmp_path / "run" / "last.pth")  # the folder does not exist yet
    rng = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    save_checkpoint(path, model, spec, epoch=3, err_cls=0.25, args={"lr": 0.05, "resume": None},
                    optimizer=optimizer, rng=rng)
    assert os.listdir(tmp_path / "run") == ["last.pth"]  # no temporary file left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert raw["epoch"] == 3 and raw["err_cls"] == 0.25 and raw["model"] == spec.to_dict()
    assert torch.equal(raw["rng"]["loader"], generator.get_state())

    ckpt = load_checkpoint(path)
    restored, rspec = model_from_checkpoint(ckpt, path)
    assert rspec == spec
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k
    model.eval()
    restored.eval()
    x, _ = sub.batch(torch.arange(32))
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    fresh = torch.optim.SGD(restored.parameters(), lr=1.0)
    fresh.load_state_dict(ckpt["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.05 and fresh.param_groups[0]["momentum"] == 0.9
    for p_old, p_new in zip(model.parameters(), restored.parameters()):
        assert torch.equal(optimizer.state[p_old]["momentum_buffer"], fresh.state[p_new]["momentum_buffer"])


def test_truncated_checkpoint_is_refused(tmp_path, trained_cnn):
    spec, model, *_ = trained_cnn
    path = tmp_path / "last.pth"
    save_checkpoint(str(path), model, spec, epoch=1, err_cls=0.5, args={})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt or truncated") as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value)


_MARKER: list[str] = []


def _would_run(marker: str) -> str:
    _MARKER.append(marker)
    return marker


class Payload:
    """A custom class whose unpickling would run code (it calls _would_run)."""

    def __reduce__(self):
        return (_would_run, ("unpickled",))


class Plain:
    def __init__(self):
        self.weights = torch.zeros(3)


@pytest.mark.parametrize("obj", [Payload(), Plain()], ids=["reduce-payload", "custom-class"])
def test_checkpoint_with_custom_objects_is_refused(tmp_path, trained_cnn, obj):
    spec, model, *_ = trained_cnn
    path = tmp_path / "evil.pth"
    state = {"net": model.state_dict(), "model": spec.to_dict(), "extra": obj}
    torch.save(state, str(path))
    with open(tmp_path / "evil.pkl", "wb") as f:  # a plain pickle (torch's legacy, non-zip format) too
        pickle.dump(state, f, protocol=2)
    for p in (path, tmp_path / "evil.pkl"):
        # Refused as holding non-plain objects (weights_only=True), not reported as merely corrupt.
        with pytest.raises(UserError, match="not plain data") as e:
            load_checkpoint(str(p))
        assert str(p) in str(e.value)
    assert _MARKER == []  # nothing of the payload ran


def test_missing_or_foreign_checkpoint(tmp_path):
    (tmp_path / "epoch5.pth").write_bytes(b"")
    with pytest.raises(UserError, match="not found") as e:
        load_checkpoint(str(tmp_path / "last.pth"))
    assert "epoch5.pth" in str(e.value)  # the hint lists what the folder holds
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope" / "last.pth"))
    torch.save({"weights": torch.zeros(2)}, str(tmp_path / "other.pth"))
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(str(tmp_path / "other.pth"))


# -------------------------------------------------------------------------------- resume == uninterrupted

def _argv(root: str, outf: str, epochs: int, *extra: str) -> list[str]:
    return ["--dataset", "cifar10", "--dataroot", root, "--no_download", "--arch", "cnn", "--width", "4",
            "--epochs", str(epochs), "--batch_size", "16", "--test_batch_size", "64", "--save_freq", "1",
            "--lr", "0.05", "--seed", "3", "--outf", outf, "--device", "cpu", *extra]


def _history(outf) -> list[dict]:
    with open(os.path.join(outf, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    fake_data.install_cifar10(root, monkeypatch, per_batch=12, n_test=16)
    a, b = str(tmp_path / "A"), str(tmp_path / "B")

    assert train_cifar.main(_argv(root, a, 2)) == 0
    assert train_cifar.main(_argv(root, b, 1)) == 0
    assert load_checkpoint(os.path.join(b, "last.pth"))["epoch"] == 1
    assert train_cifar.main(_argv(root, b, 2, "--resume")) == 0

    ca, cb = load_checkpoint(os.path.join(a, "last.pth")), load_checkpoint(os.path.join(b, "last.pth"))
    assert ca["epoch"] == cb["epoch"] == 2
    assert ca["net"].keys() == cb["net"].keys()
    for k in ca["net"]:
        assert torch.equal(ca["net"][k], cb["net"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(ca["rng"]["loader"], cb["rng"]["loader"])
    assert ca["err_cls"] == cb["err_cls"]

    # B really resumed (epoch 2 only), rather than training both epochs again from scratch.
    assert [h["epoch"] for h in _history(b)] == [1, 2]
    assert _history(a)[1]["loss"] == _history(b)[1]["loss"]
    with open(os.path.join(b, "log.txt")) as f:
        assert "resumed from" in f.read()
    # Training changed the weights between epochs, so the equality above is not trivial.
    e1 = load_checkpoint(os.path.join(a, "epoch1.pth"))
    assert any(not torch.equal(e1["net"][k], ca["net"][k]) for k in ca["net"] if ca["net"][k].is_floating_point())


def test_train_loader_uses_the_dataset_augmentation(fashion_mnist):
    loader = train_loader(fashion_mnist, 32, torch.Generator().manual_seed(0))
    assert loader.shuffle and loader.augment is fashion_mnist.info
