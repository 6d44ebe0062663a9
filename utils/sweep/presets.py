"""The reproduction's presets: a burn-in, the online runs of the table (one per row and seed), built from the
authors' base configuration (``utils.config.authors_config``) with ``replace``. Used by reproduce.py.

cpu: real Fashion-MNIST, the small CNN (minutes on 2 CPU cores); paper: CIFAR-10, ResNet-18 (a GPU);
capacity: the cpu protocol along model capacity (the CNN, ResNet-18 at widths 16 and 32); ``smoke(preset)``:
every stage of a preset with tiny sizes, to prove a machine before the real run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from utils.burnin.config import BurnInConfig
from utils.detect.detectors import DETECTORS
from utils.errors import UserError
from utils.fields import check_number, opt
from utils.online.config import OnlineConfig, authors_config, replace


@dataclass(frozen=True)
class Row:
    """One row of the table: a label, a folder-name slug (ASCII, no spaces) and its changes to the base."""

    label: str
    slug: str
    changes: dict[str, Any] = field(default_factory=dict)
    md_curve: bool = False  # also score MD with every saved burn-in epoch as the memorized model


@dataclass(frozen=True)
class Preset:
    """A whole reproduction: the burn-in, which checkpoints the online phase uses, the base online
    configuration, the seeds, and the optional rows (calibrated DSC, the adaptive attacker, the MD curve)."""

    name: str
    burn_in: BurnInConfig
    online_epoch: int = opt(0, "the burn-in epoch of the online model")  # (no default: every preset sets it)
    memorized_epoch: int = opt(0, "the burn-in epoch of the memorized model")
    base: OnlineConfig = field(default_factory=OnlineConfig)
    seeds: tuple[int, ...] = opt((20, 21, 22), "the online seeds (one run per row and seed)", low=0, high=2 ** 32 - 1)
    dsc_calibrate: float = opt(0.0, "a row for DSC with τ calibrated at this quantile (0: none)", low=0, high=1,
                               note="a quantile; 0: no calibrated row")
    adaptive: tuple[float, ...] = ()  # λ of the adaptive attacker's rows (ST and the main DSC row)
    md_curve: bool = False  # the ST row also scores MD with every saved epoch as the memorized model

    def __post_init__(self) -> None:
        for flag, epoch in (("--online_epoch", self.online_epoch), ("--memorized_epoch", self.memorized_epoch)):
            check_number(flag, epoch, 1, self.burn_in.epochs, integer=True, note="an epoch of the burn-in")
            if epoch % self.burn_in.save_freq:
                raise UserError(f"{flag} {epoch} is not saved by the burn-in: it must be a multiple of --save_freq "
                                f"({self.burn_in.save_freq})")
        if self.memorized_epoch > self.online_epoch:
            raise UserError(f"--memorized_epoch {self.memorized_epoch} must not be after --online_epoch "
                            f"{self.online_epoch} (the memorized model is the earlier one)")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise UserError(f"--seeds must be distinct (each seed is one run per row), got {list(self.seeds)}")
        for seed in self.seeds:
            check_number("--seeds", seed, 0, 2 ** 32 - 1, integer=True)
        check_number("--dsc_calibrate", self.dsc_calibrate, 0, 1, note="a quantile; 0: no calibrated row")
        for lam in self.adaptive:
            check_number("--adaptive", lam, 0, 1e6, low_open=True)

    def rows(self) -> list[Row]:
        """The table's rows: ST with its two controls, both AT variants, DSC (and calibrated DSC), then the
        adaptive attacker against ST and against the main DSC row."""
        rows = [Row("ST (trigger alone)", "ST_trigger_alone", {"defence": "ST", "stream": {"steps": 0}}),
                Row("ST (clean stream + trigger)", "ST_clean_stream", {"defence": "ST", "attack": {"poison": False}}),
                Row("ST", "ST", {"defence": "ST"}, md_curve=self.md_curve),
                Row("AT (PGD ascent)", "AT", {"defence": "AT"}),
                Row("AT (authors': CE+KL descent)", "AT_authors", {"defence": "AT", "at": {"descent_kl": True}}),
                Row("DSC (paper's τ)", "DSC", {"defence": "DSC"})]
        if self.dsc_calibrate:
            rows.append(Row("DSC (calibrated τ)", "DSC_calibrated",
                            {"defence": "DSC", "dsc": {"calibrate": self.dsc_calibrate}}))
        attacked = (rows[2], rows[-1])  # ST and the main DSC row (calibrated when there is one)
        for lam in self.adaptive:
            for main in attacked:
                rows.append(Row(f"{main.label}, adaptive attacker λ={lam:g}", f"{main.slug}_adaptive_l{lam:g}",
                                {**main.changes, "attack": {"adaptive_md": lam}}))
        return rows

    def checkpoint(self, epoch: int) -> str:
        return os.path.join(self.burn_in.outf, f"epoch{epoch}.pth")

    def saved_epochs(self) -> list[int]:
        """The burn-in epochs with a checkpoint, up to the online model's."""
        return list(range(self.burn_in.save_freq, self.online_epoch + 1, self.burn_in.save_freq))

    def run_config(self, row: Row, seed: int, out: str) -> OnlineConfig:
        """The configuration of one row's run for one seed, in ``<out>/runs/<slug>_s<seed>``."""
        cfg = replace(self.base, **row.changes)
        if row.md_curve:
            cfg = replace(cfg, measure={"md_curve": tuple(self.checkpoint(e) for e in self.saved_epochs())})
        return replace(cfg, run={"resume": self.burn_in.outf, "model_name": f"epoch{self.online_epoch}.pth",
                                 "memorized_model": self.checkpoint(self.memorized_epoch), "seed": seed,
                                 "out": os.path.join(out, "runs", f"{row.slug}_s{seed}"),
                                 "dataset": self.burn_in.dataset, "arch": self.burn_in.arch})


def checkpoint_folder(dataset: str, arch: str, width: int) -> str:
    """Where a preset's burn-in lives: checkpoints/<dataset>_<arch>[_w<width>]."""
    return os.path.join("checkpoints", f"{dataset}_{arch}{f'_w{width}' if width else ''}")


# The cpu preset's torch threads, pinned: results on the CPU depend on the thread count (it splits the float sums),
# so a machine with more cores gets the numbers of docs/results/cpu (measured on 2 cores) only with the same count.
CPU_THREADS = 2


def cpu_preset() -> Preset:
    """Real Fashion-MNIST, the small CNN, on 2 CPU cores in minutes. The authors' stream (the grid in
    experiments/grid.py found the effect only there at this scale), ε 0.05, lr 0.1, stop at burn-in + 0.08;
    every detector measured, the adaptive attacker at λ 1 and 10, MD with every burn-in epoch memorized."""
    burn_in = BurnInConfig(dataset="fashion-mnist", arch="cnn", epochs=10, save_freq=1, device="cpu",
                           threads=CPU_THREADS, outf=checkpoint_folder("fashion-mnist", "cnn", 0))
    base = authors_config(run={"device": "cpu", "threads": CPU_THREADS}, stream={"steps": 30, "reuse_first_batch": True},
                          attack={"epsilon": 0.05}, eval={"threshold": None, "threshold_delta": 0.08,
                                                          "eval_subset": 2000},
                          measure={"detectors": tuple(DETECTORS)})
    return Preset("cpu", burn_in, 10, 5, base, dsc_calibrate=0.9, adaptive=(1.0, 10.0), md_curve=True)


def paper_preset() -> Preset:
    """The papers: CIFAR-10, ResNet-18, 40 burn-in epochs (memorized: epoch 20), 100 batches, ε 0.2, lr 0.1;
    every detector, the adaptive attacker at λ 1 and 10, MD with the epoch-10/20/30/40 checkpoints memorized."""
    burn_in = BurnInConfig(dataset="cifar10", arch="resnet18", epochs=40, save_freq=10,
                           outf=checkpoint_folder("cifar10", "resnet18", 0))
    base = authors_config(measure={"detectors": tuple(DETECTORS)})
    return Preset("paper", burn_in, 40, 20, base, adaptive=(1.0, 10.0), md_curve=True)


# The capacity ladder (the effects along model capacity): the cpu protocol, without its extra rows; name ->
# (arch, width, burn-in epochs). The memorized model is the burn-in's middle epoch, as the paper's 20 of 40.
LADDER = {"cnn": ("cnn", 0, 10), "resnet18_w16": ("resnet18", 16, 12), "resnet18_w32": ("resnet18", 32, 12)}


def capacity_rung(name: str) -> Preset:
    """One rung: the cpu preset's burn-in and runs for another model (no detectors, adaptive rows or curve)."""
    arch, width, epochs = LADDER[name]
    cpu = cpu_preset()
    burn_in = dataclasses.replace(cpu.burn_in, arch=arch, width=width, epochs=epochs,
                                  outf=checkpoint_folder("fashion-mnist", arch, width))
    base = replace(cpu.base, measure={"detectors": ()})
    return dataclasses.replace(cpu, name=f"capacity/{name}", burn_in=burn_in, online_epoch=epochs,
                               memorized_epoch=epochs // 2, base=base, adaptive=(), md_curve=False)


def smoke(preset: Preset) -> Preset:
    """Every stage of the preset with tiny sizes, on its own dataset, architecture, norm and device: a burn-in of
    two epochs on 256 training samples, two online steps, one seed, small batches; results kept apart."""
    burn_in = dataclasses.replace(preset.burn_in, epochs=2, save_freq=1, subset=256,
                                  outf=preset.burn_in.outf.rstrip("/") + "_smoke")
    base = replace(preset.base, stream={"steps": 2, "batch_size": 32}, attack={"val_size": 64},
                   eval={"eval_subset": 64}, dsc={"calibrate_batches": 2},
                   measure={"detector_fit_samples": 128})
    return dataclasses.replace(preset, name=f"{preset.name}_smoke", burn_in=burn_in, online_epoch=2,
                               memorized_epoch=1, base=base, seeds=preset.seeds[:1])


PRESETS = {"cpu": cpu_preset, "paper": paper_preset}
