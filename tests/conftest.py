"""Shared test set-up: the repository root (for ``utils`` and ``train_cifar``) and tests/ (for ``fake_data``)
on sys.path, and the real Fashion-MNIST files of the repository's data/ folder, loaded once."""
from __future__ import annotations

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for path in (REPO, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

DATA_ROOT = os.path.join(REPO, "data")

# The tests use tiny tensors: one intra-op thread is fastest for them, and it keeps their speed steady when
# other work shares the CPU (several spinning threads on tiny convolutions slow down a hundredfold then).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def fashion_mnist():
    """utils.data.get_data('fashion-mnist') from the real IDX files under data/ (no download)."""
    from utils.data import get_data

    return get_data("fashion-mnist", DATA_ROOT, "cpu", download=False)
