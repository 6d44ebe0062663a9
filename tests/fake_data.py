"""Tiny CIFAR-10 / CIFAR-100 / SVHN files in the real on-disk formats, for tests (never downloads).

The real CIFAR "python version" files were pickled by Python 2: dict keys and label names are Python 2
``str`` objects (SHORT_BINSTRING opcodes), which read back as ``b'data'`` with ``encoding='bytes'`` and as
``'data'`` with ``encoding='latin1'`` (what torchvision uses). ``_Py2Pickler`` writes exactly those opcodes,
so the fake files behave like the real ones under both readers.

torchvision checks the md5 of every file against class attributes; ``patch_*_md5`` point those attributes at
the md5 of the files written here, so torchvision's real integrity check still runs on them.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np


class _Py2Str(bytes):
    """A byte string to be pickled as a Python 2 ``str``."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj: _Py2Str) -> None:
        raw = bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _s(text: str) -> _Py2Str:
    return _Py2Str(text.encode("latin1"))


def _write_py2_pickle(path: str, obj) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def md5_of(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


@dataclass
class FakeSplit:
    """What was written: images as (N, 3, 32, 32) uint8 CHW and labels (N,) int64."""

    x: np.ndarray
    y: np.ndarray
    raw_X: np.ndarray | None = None  # SVHN only: 'X' as written, (32, 32, 3, N)
    raw_y: np.ndarray | None = None  # SVHN only: 'y' as written, 1..10


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """The CIFAR row layout: 3072 bytes per image, the R, G, B planes one after another, each row-major."""
    return np.ascontiguousarray(x.reshape(len(x), 3 * 32 * 32))


# ----------------------------------------------------------------------------------------------- CIFAR-10

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: str, per_batch: int = 8, n_test: int = 12, seed: int = 0) -> dict[str, FakeSplit]:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns {'train', 'test'}."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    xs, ys = [], []
    for b in range(1, 6):
        x = _images(rng, per_batch)
        y = rng.integers(0, 10, size=per_batch)
        _write_py2_pickle(os.path.join(folder, f"data_batch_{b}"), {
            _s("batch_label"): _s(f"training batch {b} of 5"),
            _s("labels"): [int(v) for v in y],
            _s("data"): _cifar_rows(x),
            _s("filenames"): [_s(f"img_{b}_{i}.png") for i in range(per_batch)],
        })
        xs.append(x)
        ys.append(y)
    xt = _images(rng, n_test)
    yt = rng.integers(0, 10, size=n_test)
    _write_py2_pickle(os.path.join(folder, "test_batch"), {
        _s("batch_label"): _s("testing batch 1 of 1"),
        _s("labels"): [int(v) for v in yt],
        _s("data"): _cifar_rows(xt),
        _s("filenames"): [_s(f"test_{i}.png") for i in range(n_test)],
    })
    _write_py2_pickle(os.path.join(folder, "batches.meta"), {
        _s("num_cases_per_batch"): per_batch,
        _s("label_names"): [_s(n) for n in CIFAR10_LABEL_NAMES],
        _s("num_vis"): 3072,
    })
    return {"train": FakeSplit(np.concatenate(xs), np.concatenate(ys).astype(np.int64)),
            "test": FakeSplit(xt, yt.astype(np.int64))}


def patch_cifar10_md5(monkeypatch, root: str) -> None:
    from torchvision.datasets import CIFAR10

    folder = os.path.join(root, CIFAR10.base_folder)
    monkeypatch.setattr(CIFAR10, "train_list",
                        [[f"data_batch_{b}", md5_of(os.path.join(folder, f"data_batch_{b}"))] for b in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5_of(os.path.join(folder, "test_batch"))]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5_of(os.path.join(folder, "batches.meta"))})


def install_cifar10(root: str, monkeypatch, **kw) -> dict[str, FakeSplit]:
    """Write fake CIFAR-10 under root and make torchvision accept exactly these files."""
    written = write_cifar10(root, **kw)
    patch_cifar10_md5(monkeypatch, root)
    return written


# ---------------------------------------------------------------------------------------------- CIFAR-100

def write_cifar100(root: str, n_train: int = 20, n_test: int = 10, seed: int = 1) -> dict[str, FakeSplit]:
    """root/cifar-100-python/{train, test, meta}; the returned labels are the fine labels."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n)
        fine = rng.integers(0, 100, size=n)
        coarse = (fine + 7) % 20  # deliberately not equal to the fine labels
        _write_py2_pickle(os.path.join(folder, name), {
            _s("filenames"): [_s(f"{name}_{i}.png") for i in range(n)],
            _s("batch_label"): _s(f"{name}ing batch 1 of 1"),
            _s("fine_labels"): [int(v) for v in fine],
            _s("coarse_labels"): [int(v) for v in coarse],
            _s("data"): _cifar_rows(x),
        })
        out[name] = FakeSplit(x, fine.astype(np.int64))
    _write_py2_pickle(os.path.join(folder, "meta"), {
        _s("fine_label_names"): [_s(f"fine_{i}") for i in range(100)],
        _s("coarse_label_names"): [_s(f"coarse_{i}") for i in range(20)],
    })
    return out


def patch_cifar100_md5(monkeypatch, root: str) -> None:
    from torchvision.datasets import CIFAR100

    folder = os.path.join(root, CIFAR100.base_folder)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5_of(os.path.join(folder, "train"))]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5_of(os.path.join(folder, "test"))]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                           "md5": md5_of(os.path.join(folder, "meta"))})


# --------------------------------------------------------------------------------------------------- SVHN

def write_svhn(root: str, n_train: int = 15, n_test: int = 7, seed: int = 2) -> dict[str, FakeSplit]:
    """root/svhn/{train,test}_32x32.mat: 'X' (32, 32, 3, N) uint8 indexed [row, col, channel, n], 'y' (N, 1)
    with 10 standing for the digit 0. The returned FakeSplit has CHW images and labels with 10 -> 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "svhn")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=n).astype(np.uint8)  # SVHN's labels are 1..10
        y[0] = 10  # at least one digit 0 and one other digit in every split
        y[1] = 3
        savemat(os.path.join(folder, f"{name}_32x32.mat"), {"X": X, "y": y.reshape(n, 1)})
        out[name] = FakeSplit(np.ascontiguousarray(X.transpose(3, 2, 0, 1)), np.where(y == 10, 0, y).astype(np.int64),
                              raw_X=X, raw_y=y)
    return out


def patch_svhn_md5(monkeypatch, root: str) -> None:
    from torchvision.datasets import SVHN

    folder = os.path.join(root, "svhn")
    new = {k: list(v) for k, v in SVHN.split_list.items()}
    for split in ("train", "test"):
        new[split][2] = md5_of(os.path.join(folder, f"{split}_32x32.mat"))
    monkeypatch.setattr(SVHN, "split_list", new)
