"""Shared test set-up, located relative to the repository (not the working directory):

- (``utils`` and the scripts are importable because the project is installed: ``pip install -e .``, as the
  Makefile does; pyproject.toml registers the ``slow`` marker and puts bench/ on the path for its reference);
- the real Fashion-MNIST files of the repository's data/ folder, loaded once (``fashion_mnist``);
- a small real-format copy of them (600 training, 200 test images) for runs that read a --dataroot
  (``small_data``);
- a tiny burn-in run on it (``tiny_run``: width-4 CNN, epochs 1 and 2 saved), and a pair of trained models
  with real batches for the attack and defence unit tests (``trained_pair``), each built once per session;
- a real small file system that fills up on demand (``small_disk``: a tmpfs, mounted per test).

Slow tests (subprocesses, end-to-end drivers) are marked ``slow``: ``pytest -m "not slow"`` skips them.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
DATA_ROOT = os.path.join(REPO, "data")
N_TRAIN, N_TEST = 600, 200  # the small Fashion-MNIST copy

# Every test process runs the portable CPU kernels (docs/REPRODUCIBILITY.md), set before its first computation,
# so the in-process runs of presets that pin them work, and the numbers the tests see are those of any x86-64 CPU
# with AVX2. Subprocesses inherit them; a test that needs the native kernels removes them from its environment.
from utils.core.train import PORTABLE_KERNELS  # noqa: E402  (imports torch, which reads them at its first use)

os.environ.update(PORTABLE_KERNELS)

# The tests use tiny tensors: one intra-op thread is fastest for them, and it keeps their speed steady when
# other work shares the CPU (several spinning threads on tiny convolutions slow down a hundredfold then).
import torch  # noqa: E402

torch.set_num_threads(1)


def write_small_fashion_mnist(dst: str, n_train: int = N_TRAIN, n_test: int = N_TEST, test: bool = True) -> str:
    """The first n images of the real IDX files (header count rewritten): a fast, real-format dataset in dst."""
    raw = os.path.join(dst, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        if split == "t10k" and not test:
            continue
        for kind, header, item in (("images-idx3", 16, 28 * 28), ("labels-idx1", 8, 1)):
            with open(os.path.join(DATA_ROOT, "FashionMNIST", "raw", f"{split}-{kind}-ubyte"), "rb") as f:
                data = f.read(header + n * item)
            with open(os.path.join(raw, f"{split}-{kind}-ubyte"), "wb") as f:
                f.write(data[:4] + n.to_bytes(4, "big") + data[8:header] + data[header:])
    return dst


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def fashion_mnist():
    """utils.data.get_data('fashion-mnist') from the real IDX files under data/ (no download)."""
    from utils.core.data import get_data

    return get_data("fashion-mnist", DATA_ROOT, "cpu", download=False)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A --dataroot with the first 600 training and 200 test images of the real Fashion-MNIST files."""
    return write_small_fashion_mnist(str(tmp_path_factory.mktemp("small_data")))


def tiny_burn_in_config(small_data: str, outf: str, **changes):
    """The cpu preset's burn-in, shrunk: width-4 CNN, 2 epochs of the small data, every epoch saved."""
    import dataclasses

    from utils.sweep.presets import cpu_preset

    return dataclasses.replace(cpu_preset().burn_in, width=4, epochs=2, save_freq=1, dataroot=small_data,
                               download=False, outf=outf, **changes)


@pytest.fixture(scope="session")
def tiny_run(small_data, tmp_path_factory) -> str:
    """A burn-in folder (epoch1.pth, epoch2.pth, last.pth of one run) of a width-4 CNN on the small data."""
    from utils.burnin.run import run_burn_in

    outf = str(tmp_path_factory.mktemp("tiny_run"))
    run_burn_in(tiny_burn_in_config(small_data, outf))
    return outf


@dataclass
class TrainedPair:
    model: torch.nn.Module  # after 3 epochs on 2000 real images (eval mode)
    memorized: torch.nn.Module  # the same run after its first epoch (eval mode)
    batches: list  # four disjoint real batches of 100 (x in [0, 1], y), not trained on


@pytest.fixture(scope="session")
def trained_pair(fashion_mnist) -> TrainedPair:
    """A width-8 CNN trained on real images, and the memorized model of the same run (SPEC "MD")."""
    from utils.core.data import BatchLoader, Split
    from utils.core.models import build_model, model_spec
    from utils.core.train import set_seed, train_epoch

    set_seed(0)
    train = fashion_mnist.train
    sub = Split(train.x[:2000], train.y[:2000])
    model = build_model(model_spec("cnn", fashion_mnist.info, width=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = BatchLoader(sub, 100, shuffle=True)
    train_epoch(model, loader, opt)
    memorized = copy.deepcopy(model).eval()
    train_epoch(model, loader, opt)
    train_epoch(model, loader, opt)
    held = Split(train.x[2000:2400], train.y[2000:2400])
    batches = [held.batch(torch.arange(i, i + 100)) for i in range(0, 400, 100)]
    return TrainedPair(model.eval(), memorized, batches)


class SmallDisk:
    """A real tmpfs file system of a few MiB: ``fill`` writes ballast until only ``leave`` bytes are free (the next
    writes meet a real ENOSPC from the kernel), ``free`` removes the ballast."""

    def __init__(self, path: str):
        self.path, self.ballast = path, os.path.join(path, "ballast")
        os.makedirs(self.ballast, exist_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Leave ``leave`` bytes (rounded down to pages) free."""
        n = len(os.listdir(self.ballast))
        with open(os.path.join(self.ballast, f"b{n}"), "wb") as f:
            need = self.free_bytes() - leave
            try:
                while need > 0:
                    need -= f.write(bytes(min(need, 1 << 20)))
                    f.flush()
            except OSError:
                pass

    def fill_when(self, predicate, leave: int = 0, timeout: float = 300):
        """Fill the disk as soon as ``predicate()`` holds (polled every 5 ms in a thread); returns the thread."""
        def watch() -> None:
            deadline = time.time() + timeout
            while time.time() < deadline:
                if predicate():
                    self.fill(leave)
                    return
                time.sleep(0.005)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def free(self) -> None:
        shutil.rmtree(self.ballast)
        os.makedirs(self.ballast)


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs mounted for one test (root only: the tests and CI run as root); skipped where mounting is not
    allowed, with the reason."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root (the tests and CI run as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the real full-disk tests "
                    f"need one")
    try:
        yield SmallDisk(str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
