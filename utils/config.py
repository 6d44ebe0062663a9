"""Typed configuration of the online phase: one frozen dataclass per concern, each validated once, when it is
built (also by ``dataclasses.replace``). Messages name the command-line flag and the allowed range.

The flags of ``online_accu_train.py`` map onto these fields one to one (``online_accu_train.config_from_args``);
drivers build configurations in Python with ``dataclasses.replace`` on ``authors_config()``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from utils.data import DATASETS
from utils.errors import UserError
from utils.models import ARCHS

MAX_INNER_STEPS = 1000  # crafting / PGD / DSC / trigger steps per batch: more would run for hours (papers: 2-10)
SEED_MAX = 2 ** 32 - 1
RESERVED = ("config.json", "steps.jsonl", "md.jsonl", "detectors.jsonl", "summary.json")


def check_number(flag: str, value: Any, low: float | None = None, high: float | None = None, *,
                 integer: bool = False, low_open: bool = False, note: str = "") -> None:
    """One range check: a finite number (an integer if asked) within [low, high] (``low_open``: low excluded)."""
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise UserError(f"{flag} must be {kind}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        if low is not None and high is not None:
            rule = f"lie in {'(' if low_open else '['}{_num(low)}, {_num(high)}]"
        else:
            rule = f"be {'>' if low_open else '>='} {_num(low)}" if low is not None else f"be <= {_num(high)}"
        raise UserError(f"{flag} must {rule}{f' ({note})' if note else ''}, got {_num(value)}")


def _num(v: float) -> str:
    """An integer in full (seeds), anything else as %g."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"


def check_choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of a fixed set of names."""
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def _steps(flag: str, value: Any) -> None:
    check_number(flag, value, 0, MAX_INNER_STEPS, integer=True, note="more would run for hours; the papers use 2-10")


@dataclass(frozen=True)
class RunConfig:
    """Files, machine and seed (SPEC "Phase 2"): where the checkpoints, data and results are."""

    resume: str = "checkpoints_base_bn"  # --resume: the burn-in folder
    model_name: str = "epoch40.pth"  # --model_name: the online model in it
    memorized_model: str | None = None  # --memorized_model; None: <resume>/epoch20.pth
    allow_other_run: bool = False  # --allow_other_run: a memorized model from another burn-in run
    dataroot: str = "data"
    download: bool = True  # not --no_download
    device: str | None = None  # None: cuda if available, else cpu
    out: str | None = None  # None: a new folder under runs/
    overwrite: bool = False
    seed: int = 20
    deterministic: bool = False
    threads: int = 0  # --threads: torch's CPU threads; 0: torch's default (results on the CPU depend on it)
    log_name: str = "log.txt"
    dataset: str | None = None  # --dataset / --arch / --use_bn, --group_norm: assertions against the checkpoint
    arch: str | None = None
    norm: str | None = None

    def __post_init__(self) -> None:
        check_number("--seed", self.seed, 0, SEED_MAX, integer=True)
        check_number("--threads", self.threads, 0, 4096, integer=True)
        if not self.log_name or os.path.basename(self.log_name) != self.log_name or self.log_name in RESERVED:
            raise UserError(f"--log_name must be a plain file name other than {', '.join(RESERVED)}, "
                            f"got {self.log_name!r}")
        for flag, value in (("--resume", self.resume), ("--model_name", self.model_name)):
            if not value:
                raise UserError(f"{flag} must not be empty")
        if self.norm is not None:
            check_choice("--use_bn/--group_norm", self.norm, ("bn", "gn"))
        if self.dataset is not None:
            check_choice("--dataset", self.dataset, tuple(DATASETS))
        if self.arch is not None:
            check_choice("--arch", self.arch, ARCHS)

    def memorized_path(self) -> str:
        """The memorized checkpoint (SPEC quirk: default <resume>/epoch20.pth)."""
        return self.memorized_model or os.path.join(self.resume, "epoch20.pth")


@dataclass(frozen=True)
class StreamConfig:
    """The arriving batches (SPEC "Phase 2", quirk 1)."""

    batch_size: int = 100
    steps: int = 1  # --epochs: length of the accumulative phase in batches
    shuffle: bool = False
    reuse_first_batch: bool = False  # the authors' stream
    augment: bool = True  # not --no_stream_augment

    def __post_init__(self) -> None:
        check_number("--batch_size", self.batch_size, 1, integer=True)
        check_number("--epochs", self.steps, 0, 10 ** 6, integer=True)


@dataclass(frozen=True)
class LearnerConfig:
    """The online learner's SGD (SPEC "Phase 2")."""

    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    mode: str = "train"  # --onlinemode
    clip_gradnorm: bool = False  # the authors' inf-norm clipping of every online gradient
    clipvalue: float = 0.01

    def __post_init__(self) -> None:
        check_number("--lr", self.lr, 0, low_open=True)
        check_number("--momentum", self.momentum, 0, 1)
        check_number("--weight_decay", self.weight_decay, 0, 1)
        check_choice("--onlinemode", self.mode, ("eval", "train"))
        check_number("--clipvalue", self.clipvalue, 0, low_open=True)

    @property
    def clip_value(self) -> float | None:
        return self.clipvalue if self.clip_gradnorm else None


@dataclass(frozen=True)
class AttackConfig:
    """The attacker (SPEC "The attack"; ``adaptive_md``: SPEC "Detectors", the adaptive attacker)."""

    poison: bool = True  # not --no_poison: the clean-stream control
    epsilon: float = 0.2
    num_steps: int = 2
    gamma: float = 1.0
    objective: str = "reg"  # --only_reg / --only_normal / --only_second
    round_sign: bool = False
    poison_scale: float = 1.0
    use_advtrigger: bool = False
    online_advtrigger: bool = False  # --use_online_advtrigger
    craft_mode: str = "eval"  # --mode
    val_size: int = 500  # --test_batch_size: the attacker's validation batch
    adaptive_md: float = 0.0  # --adaptive_md λ

    def __post_init__(self) -> None:
        check_number("--epsilon", self.epsilon, 0, 1, note="pixel units")
        _steps("--num-steps", self.num_steps)
        check_number("--gamma", self.gamma, 0, 1e6)
        check_choice("--only_reg/--only_normal/--only_second", self.objective, ("reg", "normal", "second"))
        check_number("--poison_scale", self.poison_scale, 0, 1)
        check_choice("--mode", self.craft_mode, ("eval", "train"))
        check_number("--test_batch_size", self.val_size, 1, integer=True)
        check_number("--adaptive_md", self.adaptive_md, 0, 1e6)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and the stop rule (SPEC "The attack", step 3)."""

    threshold: float | None = 0.18  # stop once the test error exceeds this ...
    threshold_delta: float | None = None  # ... or the checkpoint's error + this (exactly one of the two)
    eval_subset: int = 0  # a fixed subset of this many test samples during the phase (0: all)
    eval_batch_size: int = 1000  # speed only
    niter: int = 1  # SGD steps on the trigger batch

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.threshold_delta is None):
            raise UserError("give exactly one of --threshold (absolute) and --threshold_delta (burn-in error + D)")
        if self.threshold is not None:
            check_number("--threshold", self.threshold, 0, 1, note="a test error")
        if self.threshold_delta is not None:
            check_number("--threshold_delta", self.threshold_delta, 0, 1, note="a test error difference")
        check_number("--eval_subset", self.eval_subset, 0, integer=True)
        check_number("--eval_batch_size", self.eval_batch_size, 1, integer=True)
        _steps("--niter", self.niter)


@dataclass(frozen=True)
class ATConfig:
    """Adversarial training (SPEC "Baselines"); ``descent_kl``: the authors' variant (SPEC quirk 2)."""

    epsilon: float = 0.2
    step_size: float = 0.02
    steps: int = 10
    descent_kl: bool = False

    def __post_init__(self) -> None:
        check_number("--at_epsilon", self.epsilon, 0, 1, note="pixel units")
        check_number("--at_step", self.step_size, 0, 1)
        _steps("--at_steps", self.steps)


@dataclass(frozen=True)
class DSCConfig:
    """DSC (SPEC "DSC"); ``calibrate`` > 0: our extension, τ0 from clean held-out batches."""

    tau0: float = 0.5
    kappa: float = 0.02
    epsilon: float = 0.2
    step_size: float = 0.02
    max_steps: int = 10
    calibrate: float = 0.0  # Q: τ0 := the Q-quantile of clean batches' mean MD, κ scaled alike (0: off)
    calibrate_batches: int = 20

    def __post_init__(self) -> None:
        check_number("--dsc_tau0", self.tau0, 0, 1e6)
        check_number("--dsc_kappa", self.kappa, 0, 1e6)
        check_number("--dsc_epsilon", self.epsilon, 0, 1, note="pixel units")
        check_number("--dsc_step", self.step_size, 0, 1)
        _steps("--dsc_max_steps", self.max_steps)
        check_number("--dsc_calibrate", self.calibrate, 0, 1, note="a quantile; 0: off")
        if self.calibrate >= 1:
            raise UserError(f"--dsc_calibrate must lie in [0, 1) (a quantile; 0: off), got {self.calibrate:g}")
        check_number("--dsc_calibrate_batches", self.calibrate_batches, 1, 10000, integer=True)
        if self.calibrate and self.tau0 == 0:
            raise UserError("--dsc_calibrate scales κ by (calibrated τ0) / --dsc_tau0, so it needs --dsc_tau0 > 0")


@dataclass(frozen=True)
class MeasureConfig:
    """What is measured on every arriving batch besides the test error (SPEC "Detectors")."""

    md: bool = True  # not --no_md: MD of poisoned / clean / noise samples (needs the memorized model)
    alignment: bool = True  # not --no_alignment: A(g_trigger, g_val) after every step
    detectors: tuple[str, ...] = ()  # --detectors: the per-sample detector scores (SPEC "Detectors")
    detector_fit_samples: int = 5000  # clean training samples the fitted detectors use
    md_curve: tuple[str, ...] = ()  # --md_curve: MD's AUROC with each of these checkpoints as the memorized model

    def __post_init__(self) -> None:
        from utils.detectors import DETECTORS  # the detectors' names live with their code

        object.__setattr__(self, "detectors", tuple(self.detectors))
        object.__setattr__(self, "md_curve", tuple(self.md_curve))
        for name in self.detectors:
            check_choice("--detectors", name, tuple(DETECTORS))
        check_number("--detector_fit_samples", self.detector_fit_samples, 100, 10 ** 6, integer=True)


ALIASES = {"OURS": "DSC"}


def defence_name(name: str) -> str:
    """A registered defender's name from a --med value (case-insensitive; the authors' OURS means DSC)."""
    from utils.defenses import DEFENDERS  # the defenders' names live with their code

    key = ALIASES.get(str(name).upper(), str(name).upper())
    if key not in DEFENDERS:
        raise UserError(f"unknown --med {name!r}; known: {', '.join(DEFENDERS)} (OURS = DSC)")
    return key


@dataclass(frozen=True)
class OnlineConfig:
    """One online run: every concern's settings (SPEC "Phase 2", "The attack", "Baselines", "DSC")."""

    run: RunConfig = field(default_factory=RunConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    defence: str = "ST"  # --med
    at: ATConfig = field(default_factory=ATConfig)
    dsc: DSCConfig = field(default_factory=DSCConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defence", defence_name(self.defence))
        if self.attack.adaptive_md and not self.attack.poison:
            raise UserError("--adaptive_md shapes the poisons, so it cannot go with --no_poison")

    def to_dict(self) -> dict:
        """The whole configuration as plain JSON data (config.json)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "OnlineConfig":
        """The inverse of ``to_dict`` (a configuration read back from config.json)."""
        parts = {f.name: f.type for f in dataclasses.fields(OnlineConfig)}
        kinds = {"run": RunConfig, "stream": StreamConfig, "learner": LearnerConfig, "attack": AttackConfig,
                 "eval": EvalConfig, "at": ATConfig, "dsc": DSCConfig, "measure": MeasureConfig}
        return OnlineConfig(**{k: kinds[k](**d[k]) if k in kinds else d[k] for k in parts if k in d})


def replace(cfg: OnlineConfig, **changes: dict | Any) -> OnlineConfig:
    """``dataclasses.replace`` one level down: ``replace(cfg, attack={"epsilon": 0.05}, defence="AT")``."""
    top = {}
    for name, value in changes.items():
        if isinstance(value, dict):
            top[name] = dataclasses.replace(getattr(cfg, name), **value)
        else:
            top[name] = value
    return dataclasses.replace(cfg, **top)


def authors_config(**changes: dict | Any) -> OnlineConfig:
    """The authors' run_*.sh command (SPEC "Phase 2": batch 100, validation batch 500, crafting in eval mode,
    learning in train mode, lr 0.1, momentum 0.9, objective reg, threshold 0.18, the poisoned trigger),
    with ``changes`` applied as in ``replace``. The one place these base settings are written."""
    base = OnlineConfig(stream=StreamConfig(batch_size=100, steps=100),
                        learner=LearnerConfig(lr=0.1, momentum=0.9, mode="train"),
                        attack=AttackConfig(val_size=500, craft_mode="eval", objective="reg", use_advtrigger=True),
                        eval=EvalConfig(threshold=0.18))
    return replace(base, **changes)
