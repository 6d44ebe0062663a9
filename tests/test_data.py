"""utils.data: every dataset's code path on files in the real on-disk formats, errors, augmentation, loader."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

import fake_data
from utils.core.data import DATASETS, BatchLoader, Split, augment_batch, dataset_info, get_data, load_split
from utils.errors import UserError


def _assert_images(split: Split, n: int, channels: int, size: int) -> None:
    assert split.x.shape == (n, channels, size, size)
    assert split.x.dtype == torch.uint8
    assert split.x.is_contiguous()
    assert split.y.shape == (n,)
    assert split.y.dtype == torch.int64


# ------------------------------------------------------------------------------------------------- CIFAR

def _assert_as_written(data, written):
    """Both splits hold exactly the images and labels the test wrote."""
    for split in ("train", "test"):
        assert torch.equal(getattr(data, split).x, torch.from_numpy(written[split].x)), split
        assert torch.equal(getattr(data, split).y, torch.from_numpy(written[split].y)), split


def test_fake_cifar_files_have_the_real_pickle_keys(tmp_path):
    """The helper writes Python-2 pickles: byte-string keys under encoding='bytes', as the real files."""
    import pickle

    fake_data.write_cifar10(str(tmp_path), per_batch=2, n_test=2)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert {b"data", b"labels"} <= set(entry)
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (2, 3072)


def test_cifar10_real_format(tmp_path, monkeypatch):
    root = str(tmp_path)
    written = fake_data.install_cifar10(root, monkeypatch, per_batch=8, n_test=12)
    # A known pixel, set through the flat CIFAR row layout itself: image 3 of data_batch_1,
    # green plane (channel 1), row 2, column 5 -> index 1 * 1024 + 2 * 32 + 5 of the 3072 bytes.
    import pickle
    batch1 = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch1, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert entry["data"][3, 1 * 1024 + 2 * 32 + 5] == written["train"].x[3, 1, 2, 5]

    data = get_data("cifar10", root, "cpu", download=False)
    assert data.info is DATASETS["cifar10"]
    _assert_images(data.train, 40, 3, 32)
    _assert_images(data.test, 12, 3, 32)
    # Batches 1..5 in order, then the test batch; every pixel as written.
    _assert_as_written(data, written)
    assert data.train.x[3, 1, 2, 5].item() == entry["data"][3, 1 * 1024 + 2 * 32 + 5]
    # Row and column are not swapped (the data is random, so a transposed image differs).
    assert not torch.equal(data.train.x, data.train.x.transpose(2, 3))


def test_cifar10_known_pixel_chw(tmp_path, monkeypatch):
    """One pixel written at (channel 2, row 30, column 1) of the first test image must land there in CHW."""
    import pickle

    root = str(tmp_path)
    fake_data.write_cifar10(root, per_batch=2, n_test=3)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        raw = f.read()
    entry = pickle.loads(raw, encoding="bytes")
    flat = entry[b"data"]
    flat[0, :] = 0
    flat[0, 2 * 1024 + 30 * 32 + 1] = 255  # blue plane, row 30, column 1
    fake_data._write_py2_pickle(str(path), {fake_data._s(k.decode()): v for k, v in entry.items()})
    fake_data.patch_cifar10_md5(monkeypatch, root)

    test = load_split("cifar10", root, train=False, download=False)
    img = test.x[0]
    assert img[2, 30, 1].item() == 255
    assert int(img.sum()) == 255  # nothing else lit: not at (1, 30) nor in another channel


def test_cifar10_integrity_check_runs(tmp_path, monkeypatch):
    """torchvision's md5 check is live: a file changed after the md5s were taken is refused (UserError)."""
    root = str(tmp_path)
    fake_data.install_cifar10(root, monkeypatch, per_batch=2, n_test=2)
    assert len(load_split("cifar10", root, train=False, download=False)) == 2
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="cifar10"):
        load_split("cifar10", root, train=False, download=False)


def test_cifar100_real_format(tmp_path, monkeypatch):
    root = str(tmp_path)
    written = fake_data.write_cifar100(root, n_train=20, n_test=10)
    fake_data.patch_cifar100_md5(monkeypatch, root)
    data = get_data("cifar100", root, "cpu", download=False)
    assert data.info.num_classes == 100
    _assert_images(data.train, 20, 3, 32)
    _assert_images(data.test, 10, 3, 32)
    _assert_as_written(data, written)  # labels: the fine ones (0..99), not the coarse ones
    assert int(data.train.y.min()) >= 0 and int(data.train.y.max()) < 100


# -------------------------------------------------------------------------------------------------- SVHN

def test_svhn_real_format(tmp_path, monkeypatch):
    root = str(tmp_path)
    written = fake_data.write_svhn(root, n_train=15, n_test=7)
    fake_data.patch_svhn_md5(monkeypatch, root)
    data = get_data("svhn", root, "cpu", download=False)
    _assert_images(data.train, 15, 3, 32)
    _assert_images(data.test, 7, 3, 32)
    for name, split in (("train", data.train), ("test", data.test)):
        w = written[name]
        # Label 10 is the digit 0; every other label is kept.
        assert split.y[0].item() == 0 and w.raw_y[0] == 10
        assert split.y[1].item() == 3
        raw_y = torch.from_numpy(w.raw_y.astype(np.int64))
        assert torch.equal(split.y, torch.where(raw_y == 10, torch.zeros_like(raw_y), raw_y))
        assert int(split.y.min()) >= 0 and int(split.y.max()) <= 9
        # 'X' is indexed [row, column, channel, sample]; the split is [sample, channel, row, column].
        X = w.raw_X
        for n, c, r, col in ((0, 0, 0, 0), (1, 2, 3, 17), (len(split) - 1, 1, 31, 4)):
            assert split.x[n, c, r, col].item() == X[r, col, c, n]
        assert torch.equal(split.x, torch.from_numpy(w.x))


# ----------------------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_real_files(fashion_mnist):
    data = fashion_mnist
    assert data.info.name == "fashion-mnist" and data.info.num_classes == 10
    _assert_images(data.train, 60000, 1, 28)
    _assert_images(data.test, 10000, 1, 28)
    counts = torch.bincount(data.train.y, minlength=10)
    assert counts.tolist() == [6000] * 10
    assert int(data.test.y.min()) == 0 and int(data.test.y.max()) == 9
    # Real images, not blank: both black background and bright pixels occur.
    assert int(data.train.x.min()) == 0 and int(data.train.x.max()) == 255


def test_a_dataset_is_loaded_once_while_its_files_are_unchanged(tmp_path):
    """get_data again: the same splits, not read again; a file rewritten (another size or time): read again, and
    the new contents are what it returns."""
    from conftest import write_small_fashion_mnist

    root = write_small_fashion_mnist(str(tmp_path), n_train=300, n_test=100)
    first = get_data("fashion-mnist", root, "cpu", download=False)
    assert get_data("fashion-mnist", root, "cpu", download=False) is first
    with open(os.path.join(root, "another_dataset.bin"), "wb") as f:  # only the dataset's own folder counts
        f.write(b"x")
    assert get_data("fashion-mnist", root, "cpu", download=False) is first
    write_small_fashion_mnist(root, n_train=200, n_test=100)
    again = get_data("fashion-mnist", root, "cpu", download=False)
    assert again is not first and len(again.train) == 200
    assert torch.equal(again.train.x, first.train.x[:200]) and torch.equal(again.test.y, first.test.y)


def test_a_remembered_evaluation_is_the_evaluation_and_follows_the_weights(fashion_mnist):
    """evaluate_remembered equals evaluate, is computed once per exact model on a split, and a weight change (also
    one autograd does not see) is another model."""
    from utils.core.models import build_model, model_spec
    from utils.core.train import evaluate, evaluate_remembered

    torch.manual_seed(0)
    split = Split(fashion_mnist.test.x[:500], fashion_mnist.test.y[:500])
    model = build_model(model_spec("cnn", fashion_mnist.info, width=4))
    err = evaluate_remembered(model, split, 100)
    assert err == evaluate(model, split, 100) and len(split.errors) == 1
    assert evaluate_remembered(model, split, 100) == err and len(split.errors) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(-1.0)
    assert evaluate_remembered(model, split, 100) == evaluate(model, split, 100) and len(split.errors) == 2


# ------------------------------------------------------------------------------------------------ errors

def test_unknown_dataset_lists_known_names(tmp_path):
    for call in (lambda: dataset_info("imagenet"),
                 lambda: load_split("imagenet", str(tmp_path), download=False),
                 lambda: get_data("imagenet", str(tmp_path), download=False)):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "imagenet" in msg
        for name in DATASETS:
            assert name in msg
    assert os.listdir(tmp_path) == []  # nothing was created or downloaded


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "fashion-mnist"])
def test_missing_dataset_folder_is_user_error(tmp_path, name):
    for root in (tmp_path / "does-not-exist", tmp_path):  # missing folder, then an empty one
        with pytest.raises(UserError) as e:
            load_split(name, str(root), train=True, download=False)
        msg = str(e.value)
        assert name in msg and str(root) in msg
        assert "not found" in msg.lower()
        assert "To fix" in msg
    assert not (tmp_path / "does-not-exist").exists()


# ---------------------------------------------------------------------------------------------- augment

def _which_crop(out: torch.Tensor, img: torch.Tensor, p: int, flips: bool) -> tuple[int, int, bool] | None:
    """The (row offset, column offset, flipped) of the crop of the zero-padded ``img`` equal to ``out``, if any."""
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (p, p, p, p))
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flip in ((False, True) if flips else (False,)):
                if torch.equal(out, crop.flip(2) if flip else crop):
                    return dy, dx, flip
    return None


@pytest.mark.parametrize("name,channels,size", [("cifar10", 3, 32), ("svhn", 3, 32), ("fashion-mnist", 1, 28)])
def test_augment_batch(name, channels, size):
    info = dataset_info(name)
    x = torch.rand(24, channels, size, size, generator=torch.Generator().manual_seed(1))
    out = augment_batch(x, info, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    # Each output is a crop of its own zero-padded input (flipped only where the dataset allows flips) ...
    found = [_which_crop(out[i], x[i], info.crop_padding, info.hflip) for i in range(len(x))]
    assert all(f is not None for f in found), found
    # ... at row and column offsets drawn independently of each other.
    dys, dxs = {f[0] for f in found}, {f[1] for f in found}
    assert len(dys) > 2 and len(dxs) > 2 and any(f[0] != f[1] for f in found), found
    # Same generator seed, same augmentation; another seed, another one.
    assert torch.equal(out, augment_batch(x, info, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment_batch(x, info, torch.Generator().manual_seed(1)))


def test_augment_flips_only_where_allowed():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    def no_crop(info):
        return dataclasses.replace(info, crop_padding=0)

    flipped = augment_batch(x, no_crop(dataset_info("cifar10")), torch.Generator().manual_seed(0))
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(2)) for i in range(len(x)))
    n_same = sum(torch.equal(flipped[i], x[i]) for i in range(len(x)))
    assert n_flipped + n_same == len(x) and 0 < n_flipped < len(x)
    assert torch.equal(augment_batch(x, no_crop(dataset_info("svhn")), torch.Generator().manual_seed(0)), x)


# ----------------------------------------------------------------------------------------------- loader

def _indexed_split(n: int = 103) -> Split:
    """Images whose pixels encode the sample index, labels = index (so pairing can be checked)."""
    x = (torch.arange(n, dtype=torch.uint8) % 251).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return Split(x, torch.arange(n))


def test_batch_loader_shuffle_visits_every_sample_once():
    split = _indexed_split(103)
    loader = BatchLoader(split, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 11
    orders = []
    for _ in range(2):
        ys = []
        sizes = []
        for x, y in loader:
            assert x.dtype == torch.float32 and float(x.max()) <= 1.0
            assert torch.equal(x, split.x[y].float() / 255)  # images stay paired with their labels
            ys.append(y)
            sizes.append(len(y))
        order = torch.cat(ys)
        assert sizes == [10] * 10 + [3]
        assert torch.equal(order.sort().values, torch.arange(103))
        orders.append(order)
    assert not torch.equal(orders[0], torch.arange(103))  # shuffled
    assert not torch.equal(orders[0], orders[1])  # a new order every pass


def test_batch_loader_without_shuffle_and_drop_last():
    split = _indexed_split(25)
    ys = torch.cat([y for _, y in BatchLoader(split, 10)])
    assert torch.equal(ys, torch.arange(25))
    loader = BatchLoader(split, 10, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 2
    ys = torch.cat([y for _, y in loader])
    assert len(ys) == 20 and len(set(ys.tolist())) == 20


def test_batch_loader_same_seed_same_batches():
    split = _indexed_split(50)
    info = dataset_info("fashion-mnist")

    def passes(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = BatchLoader(split, 8, shuffle=True, augment=info, generator=torch.Generator().manual_seed(seed))
        return [b for _ in range(2) for b in loader]

    a, b, c = passes(3), passes(3), passes(4)
    assert len(a) == len(b) == 14
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_batch_loader_rejects_bad_batch_size():
    split = _indexed_split(5)
    with pytest.raises(UserError, match="batch size"):
        BatchLoader(split, 0)
    with pytest.raises(UserError, match="larger than the data"):
        BatchLoader(split, 6)
