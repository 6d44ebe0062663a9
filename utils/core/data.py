"""Datasets by name, kept as uint8 tensors on the device, with a small batch loader (SPEC phase 1)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from utils.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding of the training augmentation (0: none)
    hflip: bool  # random horizontal flip in the training augmentation


DATASETS: dict[str, DatasetInfo] = {
    # CIFAR: the authors' augmentation (random crop, padding 4, horizontal flip) and their mean/std.
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 4, True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
    # SVHN: digits, so no flip; crop with padding 4 as for CIFAR.
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 4, False),
    # Fashion-MNIST: clothing is left/right symmetric, so flip; 28-pixel images get padding 2.
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), 2, True),
}


def dataset_info(name: str) -> DatasetInfo:
    """The DatasetInfo of a dataset name, or a UserError listing the known names."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class Split:
    """One split as tensors: images uint8 (N, C, H, W), labels int64 (N,), on one device; ``errors``: test errors
    already measured on it (``utils.core.train.evaluate_remembered``)."""

    x: torch.Tensor
    y: torch.Tensor
    errors: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (float32) and labels at the given indices."""
        idx = idx.to(self.x.device)
        return self.x[idx].float().div_(255), self.y[idx]

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


def _torchvision_split(name: str, root: str, train: bool, download: bool):
    import torchvision.datasets as tvd

    if name == "cifar10":
        return tvd.CIFAR10(root, train=train, download=download)
    if name == "cifar100":
        return tvd.CIFAR100(root, train=train, download=download)
    if name == "svhn":
        return tvd.SVHN(os.path.join(root, "svhn"), split="train" if train else "test", download=download)
    if name == "fashion-mnist":
        return tvd.FashionMNIST(root, train=train, download=download)
    raise AssertionError(name)


def _to_split(name: str, ds) -> Split:
    if name in ("cifar10", "cifar100"):
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()
        y = torch.as_tensor(ds.targets, dtype=torch.long)
    elif name == "svhn":
        x = torch.as_tensor(ds.data).contiguous()
        y = torch.as_tensor(ds.labels, dtype=torch.long)
    else:  # fashion-mnist
        x = ds.data.unsqueeze(1).contiguous()
        y = ds.targets.long()
    return Split(x.to(torch.uint8), y)


def load_split(name: str, root: str = "data", train: bool = True, download: bool = True) -> Split:
    """One split of a dataset as uint8 tensors on the CPU, read by torchvision's own dataset class."""
    dataset_info(name)
    hint = ("run `make data` (it installs Debian's dataset-fashion-mnist and unpacks it under data/)"
            if name == "fashion-mnist" else
            "check --dataroot, or allow the download (drop --no_download) on a machine with internet access")
    try:
        ds = _torchvision_split(name, root, train, download)
    except Exception as e:  # torchvision raises RuntimeError (missing/corrupt) or URLError (offline)
        reason = re.sub(r"\s*You can use download=True to download it\.?", "", str(e)).strip().rstrip(".")
        raise UserError(f"could not load {name} ({'train' if train else 'test'}) from {root!r}: {reason}. "
                        f"To fix: {hint}") from e
    split = _to_split(name, ds)
    check_labels(split, dataset_info(name), f"{name} ({'train' if train else 'test'}) in {root!r}")
    return split


def check_labels(split: Split, info: DatasetInfo, where: str) -> None:
    """Every label lies in [0, num_classes): a wrong one would silently count as an error."""
    if len(split) and not (0 <= int(split.y.min()) and int(split.y.max()) < info.num_classes):
        bad = int(((split.y < 0) | (split.y >= info.num_classes)).sum())
        raise UserError(f"{where} has {bad} label(s) outside [0, {info.num_classes}) (e.g. "
                        f"{int(split.y.max()) if split.y.max() >= info.num_classes else int(split.y.min())}); "
                        f"the files are corrupt or of another dataset: download or unpack them again")


def augment_batch(x: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample (SPEC phase 1)."""
    n, c, h, w = x.shape
    p = info.crop_padding
    if p > 0:  # one gather of each sample's window out of the padded images (the same pixels as indexing them)
        padded = F.pad(x, (p, p, p, p)).flatten(2)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = dy[:, None, None] + torch.arange(h, device=x.device)[None, :, None]
        cols = dx[:, None, None] + torch.arange(w, device=x.device)[None, None, :]
        index = (rows * (w + 2 * p) + cols).flatten(1)[:, None, :].expand(n, c, h * w)
        x = padded.gather(2, index).view(n, c, h, w)
    if info.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


class BatchLoader:
    """Batches of a Split in [0, 1]: optional seeded shuffling and augmentation; data never leaves its device."""

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, augment: DatasetInfo | None = None,
                 generator: torch.Generator | None = None, drop_last: bool = False):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if batch_size > len(split):
            raise UserError(f"batch size {batch_size} is larger than the data ({len(split)} samples); "
                            f"use a smaller --batch_size")
        self.split, self.batch_size, self.shuffle, self.augment = split, batch_size, shuffle, augment
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> torch.Tensor:
        """The sample order of one pass (draws from the generator when shuffling)."""
        n = len(self.split)
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        for i in range(len(self)):
            x, y = self.split.batch(order[i * self.batch_size:(i + 1) * self.batch_size])
            if self.augment is not None:
                x = augment_batch(x, self.augment, self.generator)
            yield x, y


@dataclass
class Data:
    """A dataset's info and both splits, on the device."""

    info: DatasetInfo
    train: Split
    test: Split


_LOADED: dict[tuple, tuple[tuple, Data]] = {}  # get_data's last loads, while their files are unchanged
LOADED_KEEP = 2


# the folder under --dataroot where torchvision's class for each dataset reads its files (``_torchvision_split``)
DATA_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "svhn",
                "fashion-mnist": "FashionMNIST"}


def files_stamp(name: str, root: str) -> tuple:
    """Every file of a dataset's folder under ``root`` with its size and modification time: a load stays valid
    while this holds (only that folder is listed, however much else ``root`` holds)."""
    folder = os.path.join(root, DATA_FOLDERS[name])
    return tuple(sorted((os.path.join(d, f), st.st_size, st.st_mtime_ns) for d, _, files in os.walk(folder)
                        for f in files for st in [os.stat(os.path.join(d, f))]))


def get_data(name: str, root: str = "data", device: torch.device | str = "cpu", download: bool = True) -> Data:
    """Train and test splits of a dataset by name (cifar10, cifar100, svhn, fashion-mnist), on the device.

    Loaded once per process while the dataset's files under ``root`` stay as they were (the runs of a sweep share
    it; nothing writes into a split)."""
    info = dataset_info(name)
    key = (name, os.path.abspath(root), str(torch.device(device)))
    found = _LOADED.get(key)
    if found is not None and found[0] == files_stamp(name, root):
        return found[1]
    train = load_split(name, root, True, download).to(device)
    test = load_split(name, root, False, download).to(device)
    data = Data(info, train, test)
    _LOADED.pop(key, None)
    while len(_LOADED) >= LOADED_KEEP:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = (files_stamp(name, root), data)
    return data


def train_loader(data: Data, batch_size: int, generator: torch.Generator) -> BatchLoader:
    """The burn-in loader: shuffled, augmented as the dataset's info says."""
    return BatchLoader(data.train, batch_size, shuffle=True, augment=data.info, generator=generator)
