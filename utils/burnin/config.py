"""The burn-in's settings (SPEC "Phase 1"; paper defaults): one frozen dataclass whose fields carry the flags of
``train_cifar.py`` (``utils.fields.opt``)."""
from __future__ import annotations

from dataclasses import dataclass

from utils.core.data import DATASETS, dataset_info
from utils.core.models import ARCHS, MEMORY_FORMAT_HELP, MEMORY_FORMATS, ModelSpec, model_spec
from utils.core.train import KERNELS, KERNELS_HELP, SEED_MAX
from utils.errors import UserError
from utils.fields import check_fields, opt

# the settings a resumed run must share with the run it continues (they decide its weights)
SAME_ON_RESUME = ("dataset", "arch", "width", "group_norm", "batch_size", "lr", "momentum", "weight_decay", "seed",
                  "subset", "clip_gradnorm", "clipvalue", "kernels", "memory_format", "normalize")
# what a checkpoint written before a setting existed was made with
LEGACY_ARGS = {"memory_format": "contiguous", "normalize": True}


def checkpoint_args(ckpt: dict) -> dict:
    """The burn-in flags a checkpoint was written with, a setting it predates at the value it then had."""
    return {**LEGACY_ARGS, **(ckpt.get("args") or {})}


@dataclass(frozen=True)
class BurnInConfig:
    """The burn-in's settings (flags of train_cifar.py; paper defaults, SPEC "Phase 1")."""

    dataset: str = opt("cifar10", f"one of {', '.join(DATASETS)}")
    arch: str = opt("resnet18", f"one of {', '.join(ARCHS)}")
    width: int = opt(0, "base width (0: the arch's default, resnet18 64, cnn 16)", low=0, high=4096)
    group_norm: int = opt(0, "0 (default): BatchNorm, as the authors' burn-in trains; N>0: GroupNorm with N groups",
                          low=0, high=4096)
    dataroot: str = opt("data", "dataset folder (torchvision layout)", metavar="DIR")
    download: bool = opt(True, "never download; fail if files are missing", flag="--no_download", negate=True)
    batch_size: int = opt(256, "training batch size", low=1)
    test_batch_size: int = opt(256, "evaluation batch size (speed only)", low=1)
    epochs: int = opt(40, "epochs to train", low=1)
    save_freq: int = opt(10, "write epoch{N}.pth every N epochs", low=1)
    lr: float = opt(0.1, "initial LR; x0.1 every 50 epochs (the authors' schedule)", low=0, low_open=True)
    momentum: float = opt(0.9, "SGD momentum", low=0, high=1)
    weight_decay: float = opt(1e-4, "SGD weight decay", low=0, high=1)
    outf: str = opt("checkpoints_base_bn", "checkpoint and log folder", metavar="DIR")
    resume: str | None = opt(None, "continue an interrupted run from the last checkpoint in DIR (default: --outf)",
                             nargs="?", const="", metavar="DIR")  # None: a new run; "": the run in outf
    overwrite: bool = opt(False, "replace a burn-in already in --outf")
    clip_gradnorm: bool = opt(False, "clip the gradient's L2 norm to --clipvalue")
    clipvalue: float = opt(1.0, "the L2 norm --clip_gradnorm clips to", low=0, low_open=True)
    seed: int = opt(0, "the burn-in's seed (initialisation, shuffling, augmentation)", low=0, high=SEED_MAX)
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda if available)")
    deterministic: bool = opt(False, "deterministic kernels only (slower on CUDA; see utils/core/train.py)")
    threads: int = opt(0, "torch's CPU threads (0: torch's default, the cores); results on the CPU depend on it",
                       low=0, high=4096)
    kernels: str = opt("native", KERNELS_HELP, flag="--cpu_kernels", choices=KERNELS)
    memory_format: str = opt("channels_last", MEMORY_FORMAT_HELP, choices=tuple(MEMORY_FORMATS))
    subset: int = opt(0, "train on the first N training samples only (0: all)", low=0)
    normalize: bool = opt(True, "no input normalisation: the model sees [0, 1] pixels, as the authors' ResNet-18 "
                          "(default: the dataset's mean/std inside the model)", flag="--no_normalize", negate=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.resume is not None and self.overwrite:
            raise UserError("--resume continues the run in the folder and --overwrite replaces it: give one")
        self.spec()  # a known dataset and arch

    def spec(self) -> ModelSpec:
        info = dataset_info(self.dataset)
        return model_spec(self.arch, info, "gn" if self.group_norm else "bn", self.group_norm or 32, self.width,
                          self.normalize)
