"""Typed configuration of one online run: ``OnlineConfig`` composes one frozen dataclass per concern, each
validated once, when it is built (also by ``dataclasses.replace``). The parts that belong to a role live with it
(``AttackConfig`` in ``utils.attack``, ``LearnerConfig`` in ``utils.core.train``, ``ATConfig``/``DSCConfig`` in
``utils.defense``, ``MeasureConfig`` in ``utils.detect``); the run's files, stream and stop rule are here. Each
field carries its flag (``utils.fields.opt``): ``utils.online.flags`` builds ``online_accu_train.py``'s command
line from them; drivers build configurations in Python with ``replace`` on ``authors_config()``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from utils.attack.attacker import AttackConfig
from utils.core.data import DATASETS
from utils.core.grads import MAX_INNER_STEPS, STEPS_NOTE
from utils.core.models import ARCHS, MEMORY_FORMAT_HELP, MEMORY_FORMATS
from utils.core.train import KERNELS, KERNELS_HELP, SEED_MAX, LearnerConfig
from utils.defense.config import ATConfig, DSCConfig
from utils.defense import defenders
from utils.detect.measure import MeasureConfig
from utils.errors import UserError
from utils.io.results import check_run_files
from utils.fields import Composite, check_choice, check_fields, opt, replace  # replace: for the importers of this module

RESERVED = ("config.json", "steps.jsonl", "md.jsonl", "detectors.jsonl", "summary.json")


@dataclass(frozen=True)
class RunConfig:
    """Files, machine and seed (SPEC "Phase 2"): where the checkpoints, data and results are."""

    resume: str = opt("checkpoints_base_bn", "burn-in checkpoint folder", metavar="DIR")
    model_name: str = opt("epoch40.pth", "online model's checkpoint in --resume", metavar="FILE")
    memorized_model: str | None = opt(None, "memorized (earlier) checkpoint; default: <--resume>/epoch20.pth. "
                                      "Needed by DSC; for ST/AT it only adds the MD measurements", metavar="FILE")
    allow_other_run: bool = opt(False, "accept a memorized model written by another burn-in run than the online "
                                "model (refused by default)")
    dataroot: str = opt("data", "dataset folder (torchvision layout)", metavar="DIR")
    download: bool = opt(True, "never download datasets", flag="--no_download", negate=True)
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda if available)")
    out: str | None = opt(None, "results folder (default: runs/<dataset>_<arch>_<med>_s<seed>_<time>)",
                           metavar="DIR")
    overwrite: bool = opt(False, "replace results already in --out")
    seed: int = opt(20, "the run's seed (validation batch, stream, trigger, poisoned positions)", low=0,
                    high=SEED_MAX)
    deterministic: bool = opt(False, "deterministic kernels only (slower on CUDA; see utils/core/train.py)")
    threads: int = opt(0, "torch's CPU threads (0: torch's default, the cores); results on the CPU depend on it",
                       low=0, high=4096)
    kernels: str = opt("native", KERNELS_HELP, flag="--cpu_kernels", choices=KERNELS)
    memory_format: str = opt("channels_last", MEMORY_FORMAT_HELP, choices=tuple(MEMORY_FORMATS))
    log_name: str = opt("log.txt", "name of the text log inside --out", metavar="FILE")
    dataset: str | None = opt(None, "assert the dataset (default: the checkpoint's)", choices=tuple(DATASETS))
    arch: str | None = opt(None, "assert the arch (default: the checkpoint's)", choices=ARCHS)
    norm: str | None = None  # --use_bn / --group_norm: assert the checkpoint's norm (utils.online.flags)

    def __post_init__(self) -> None:
        check_fields(self)
        check_run_files(self.log_name, RESERVED, {"--resume": self.resume, "--model_name": self.model_name})
        if self.norm is not None:
            check_choice("--use_bn/--group_norm", self.norm, ("bn", "gn"))

    def memorized_path(self) -> str:
        """The memorized checkpoint (SPEC quirk: default <resume>/epoch20.pth)."""
        return self.memorized_model or os.path.join(self.resume, "epoch20.pth")


@dataclass(frozen=True)
class StreamConfig:
    """The arriving batches (SPEC "Phase 2", quirk 1)."""

    batch_size: int = opt(100, "arriving batch size", low=1)
    steps: int = opt(1, "length of the accumulative phase in batches (0: the trigger alone)", flag="--epochs",
                     aliases=("--epoch",), low=0, high=10 ** 6)
    shuffle: bool = opt(False, "draw the stream from a seeded shuffle of the training set (default: dataset "
                        "order, as the authors)")
    reuse_first_batch: bool = opt(False, "the authors' stream: every arriving batch and the trigger are the first "
                                  "batch, re-augmented")
    augment: bool = opt(True, "stream batches unaugmented (default: training augmentation, as the authors)",
                        flag="--no_stream_augment", negate=True)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and the stop rule (SPEC "The attack", step 3)."""

    threshold: float | None = opt(0.18, "stop the accumulative phase once the test error exceeds this",
                                  low=0, high=1, note="a test error", by_hand=True)  # utils.online.flags
    threshold_delta: float | None = opt(None, "stop once the test error exceeds the burn-in error + this "
                                        "(replaces --threshold)", low=0, high=1, note="a test error difference")
    eval_subset: int = opt(0, "evaluate a fixed subset of this many test samples during the phase (0: full set; "
                           "before/after the trigger always use the full set)", low=0)
    eval_batch_size: int = opt(1000, "evaluation batch size (speed only)", low=1)
    niter: int = opt(1, "SGD steps on the trigger batch", low=0, high=MAX_INNER_STEPS, note=STEPS_NOTE)

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.threshold_delta is None):
            raise UserError("give exactly one of --threshold (absolute) and --threshold_delta (burn-in error + D)")
        check_fields(self)


ALIASES = {"OURS": "DSC"}


def defence_name(name: str) -> str:
    """A registered defender's name from a --med value (case-insensitive; the authors' OURS means DSC)."""
    key, known = ALIASES.get(str(name).upper(), str(name).upper()), defenders.DEFENDERS  # with what users registered
    if key not in known:
        raise UserError(f"unknown --med {name!r}; known: {', '.join(known)} (OURS = DSC)")
    return key


@dataclass(frozen=True)
class OnlineConfig(Composite):
    """One online run: every concern's settings (SPEC "Phase 2", "The attack", "Baselines", "DSC")."""

    run: RunConfig = field(default_factory=RunConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    defence: str = opt("ST", f"defence: {', '.join(defenders.DEFENDERS)} (OURS = DSC)", flag="--med")
    at: ATConfig = field(default_factory=ATConfig)
    dsc: DSCConfig = field(default_factory=DSCConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defence", defence_name(self.defence))
        if self.attack.adaptive_md and not self.attack.poison:
            raise UserError("--adaptive_md shapes the poisons, so it cannot go with --no_poison")


# the parts of an OnlineConfig: field name -> its dataclass
PARTS: dict[str, type] = {"run": RunConfig, "stream": StreamConfig, "learner": LearnerConfig, "attack": AttackConfig,
                          "eval": EvalConfig, "at": ATConfig, "dsc": DSCConfig, "measure": MeasureConfig}


def authors_config(**changes: dict | Any) -> OnlineConfig:
    """The authors' run_*.sh command (SPEC "Phase 2": batch 100, validation batch 500, crafting in eval mode,
    learning in train mode, lr 0.1, momentum 0.9, objective reg, threshold 0.18, the poisoned trigger),
    with ``changes`` applied as in ``replace``. The one place these base settings are written."""
    base = OnlineConfig(stream=StreamConfig(batch_size=100, steps=100),
                        learner=LearnerConfig(lr=0.1, momentum=0.9, mode="train"),
                        attack=AttackConfig(val_size=500, craft_mode="eval", objective="reg", use_advtrigger=True),
                        eval=EvalConfig(threshold=0.18))
    return replace(base, **changes)
