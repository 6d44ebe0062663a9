"""The reproduction's presets: burn-ins, and the online runs of the table, one per row and replicate (a burn-in
seed and an online seed: every row runs on the same replicates, so rows compare paired), built from the authors'
base configuration (``utils.online.config.authors_config``) with ``replace``. Used by reproduce.py.

cpu: the rows the papers' claims need, on real Fashion-MNIST and the small CNN, 5 burn-ins x 2 seeds, on 2 CPU
cores in under 20 minutes; cpu_full: every row of the table on the same replicates; paper: CIFAR-10, ResNet-18
(a GPU); capacity: the first cpu protocol along model capacity (the CNN, ResNet-18 at widths 16 and 32);
``smoke(preset)``: every stage of a preset with tiny sizes, to prove a machine before the real run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from utils.burnin.config import BurnInConfig
from utils.core.train import SEED_MAX
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


Replicate = tuple[int, int]  # (burn-in seed, online seed)


@dataclass(frozen=True)
class Preset:
    """A whole reproduction: the burn-ins, which checkpoints the online phase uses, the base online configuration,
    the replicates (burn-in seeds x online seeds), and the rows (``only``: the slugs kept, empty: all)."""

    name: str
    burn_in: BurnInConfig  # every burn-in's settings; its seed and folder are the replicate's (``burn_in_for``)
    online_epoch: int = opt(0, "the burn-in epoch of the online model")  # (no default: every preset sets it)
    memorized_epoch: int = opt(0, "the burn-in epoch of the memorized model")
    base: OnlineConfig = field(default_factory=OnlineConfig)
    seeds: tuple[int, ...] = opt((20, 21, 22), "the online seeds (one run per row and replicate)", low=0,
                                 high=SEED_MAX)
    burn_in_seeds: tuple[int, ...] = opt((0,), "the burn-ins' seeds: each a starting model, every online seed run "
                                         "on each", low=0, high=SEED_MAX)
    dsc_calibrate: float = opt(0.0, "a row for DSC with τ calibrated at this quantile (0: none)", low=0, high=1,
                               note="a quantile; 0: no calibrated row")
    adaptive: tuple[float, ...] = ()  # λ of the adaptive attacker's rows (ST and the main DSC row)
    md_curve: bool = False  # the ST row also scores MD with every saved epoch as the memorized model
    detectors: bool = True  # ST and its adaptive rows also score every detector (SPEC "Detectors")
    only: tuple[str, ...] = ()  # the rows kept (slugs); empty: every row

    def __post_init__(self) -> None:
        for flag, epoch in (("--online_epoch", self.online_epoch), ("--memorized_epoch", self.memorized_epoch)):
            check_number(flag, epoch, 1, self.burn_in.epochs, integer=True, note="an epoch of the burn-in")
            if epoch % self.burn_in.save_freq:
                raise UserError(f"{flag} {epoch} is not saved by the burn-in: it must be a multiple of --save_freq "
                                f"({self.burn_in.save_freq})")
        if self.memorized_epoch > self.online_epoch:
            raise UserError(f"--memorized_epoch {self.memorized_epoch} must not be after --online_epoch "
                            f"{self.online_epoch} (the memorized model is the earlier one)")
        for flag, seeds in (("--seeds", self.seeds), ("--burn_in_seeds", self.burn_in_seeds)):
            if len(set(seeds)) != len(seeds) or not seeds:
                raise UserError(f"{flag} must be distinct (each seed is one replicate), got {list(seeds)}")
            for seed in seeds:
                check_number(flag, seed, 0, SEED_MAX, integer=True)
        check_number("--dsc_calibrate", self.dsc_calibrate, 0, 1, note="a quantile; 0: no calibrated row")
        for lam in self.adaptive:
            check_number("--adaptive", lam, 0, 1e6, low_open=True)
        if self.burn_in.kernels != self.base.run.kernels:
            raise UserError(f"the burn-in's CPU kernels ({self.burn_in.kernels}) and the runs' "
                            f"({self.base.run.kernels}) differ, and one process runs one set of kernels: set both")
        unknown = set(self.only) - {r.slug for r in self.all_rows()}
        if unknown:
            raise UserError(f"the preset keeps unknown rows {sorted(unknown)}")

    def all_rows(self) -> list[Row]:
        """Every row: ST with its two controls, both AT variants, DSC (and calibrated DSC), then the adaptive
        attacker against ST and against the main DSC row. ST and its adaptive rows also score every detector."""
        watch = {"measure": {"detectors": tuple(DETECTORS)}} if self.detectors else {}
        rows = [Row("ST (trigger alone)", "ST_trigger_alone", {"defence": "ST", "stream": {"steps": 0}}),
                Row("ST (clean stream + trigger)", "ST_clean_stream", {"defence": "ST", "attack": {"poison": False}}),
                Row("ST", "ST", {"defence": "ST", **watch}, md_curve=self.md_curve),
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

    def rows(self) -> list[Row]:
        """The preset's rows (those in ``only``, or all)."""
        return [r for r in self.all_rows() if not self.only or r.slug in self.only]

    def replicates(self) -> list[Replicate]:
        """(burn-in seed, online seed) pairs, every online seed on every burn-in."""
        return [(b, s) for b in self.burn_in_seeds for s in self.seeds]

    def burn_in_for(self, b: int) -> BurnInConfig:
        """The burn-in of seed b: in the preset's folder, suffixed _b<seed> when there are several."""
        outf = self.burn_in.outf if len(self.burn_in_seeds) == 1 else f"{self.burn_in.outf.rstrip('/')}_b{b}"
        return dataclasses.replace(self.burn_in, seed=b, outf=outf)

    def checkpoint(self, epoch: int, b: int) -> str:
        return os.path.join(self.burn_in_for(b).outf, f"epoch{epoch}.pth")

    def saved_epochs(self) -> list[int]:
        """The burn-in epochs with a checkpoint, up to the online model's."""
        return list(range(self.burn_in.save_freq, self.online_epoch + 1, self.burn_in.save_freq))

    def run_name(self, row: Row, rep: Replicate) -> str:
        """<slug>_s<seed>, with _b<burn-in seed> before it when there are several burn-ins."""
        return f"{row.slug}{f'_b{rep[0]}' if len(self.burn_in_seeds) > 1 else ''}_s{rep[1]}"

    def run_config(self, row: Row, rep: Replicate, out: str) -> OnlineConfig:
        """The configuration of one row's run on one replicate, in ``<out>/runs/<run_name>``."""
        b, seed = rep
        cfg = replace(self.base, **row.changes)
        if row.md_curve:
            cfg = replace(cfg, measure={"md_curve": tuple(self.checkpoint(e, b) for e in self.saved_epochs())})
        return replace(cfg, run={"resume": self.burn_in_for(b).outf, "model_name": f"epoch{self.online_epoch}.pth",
                                 "memorized_model": self.checkpoint(self.memorized_epoch, b), "seed": seed,
                                 "out": os.path.join(out, "runs", self.run_name(row, rep)),
                                 "dataset": self.burn_in.dataset, "arch": self.burn_in.arch})


def checkpoint_folder(dataset: str, arch: str, width: int, normalize: bool = True) -> str:
    """Where a preset's burn-in lives: checkpoints/<dataset>_<arch>[_w<width>][_raw] (_raw: no input
    normalisation)."""
    return os.path.join("checkpoints", f"{dataset}_{arch}{f'_w{width}' if width else ''}{'' if normalize else '_raw'}")


# The cpu presets' torch threads, pinned: results on the CPU depend on the thread count (it splits the float sums),
# so a machine with more cores gets the numbers of docs/results/cpu (measured on 2 cores) only with the same count.
CPU_THREADS = 2
# The rows the papers' claims need (utils/report/claims.py): the cpu preset runs these only.
CLAIM_ROWS = ("ST_trigger_alone", "ST_clean_stream", "ST", "AT_authors", "DSC", "DSC_calibrated", "ST_adaptive_l10")


def cpu_preset() -> Preset:
    """The rows the papers' claims need on real Fashion-MNIST and the small CNN, as paired replicates: 5 burn-ins
    (5 epochs each; memorized: epoch 2) x online seeds 20, 21, with the CPU kernels pinned (portable) and 2
    threads, so that any x86-64 CPU with AVX2 gets the published floats. The authors' stream (the grid in
    experiments/grid.py found the effect only there at this scale), ε 0.05, lr 0.1, at most 20 batches, stop at
    burn-in + 0.08; every detector on the ST rows; the adaptive attacker at λ 10."""
    burn_in = BurnInConfig(dataset="fashion-mnist", arch="cnn", epochs=5, save_freq=1, device="cpu",
                           threads=CPU_THREADS, kernels="portable", outf=checkpoint_folder("fashion-mnist", "cnn", 0))
    base = authors_config(run={"device": "cpu", "threads": CPU_THREADS, "kernels": "portable"},
                          stream={"steps": 20, "reuse_first_batch": True}, attack={"epsilon": 0.05},
                          eval={"threshold": None, "threshold_delta": 0.08, "eval_subset": 2000})
    return Preset("cpu", burn_in, 5, 2, base, seeds=(20, 21), burn_in_seeds=(0, 1, 2, 3, 4), dsc_calibrate=0.9,
                  adaptive=(10.0,), only=CLAIM_ROWS)


def cpu_full_preset() -> Preset:
    """Every row of the table on the cpu preset's replicates and burn-ins (both AT variants, the adaptive attacker
    at λ 1 and 10 against ST and calibrated DSC, MD with every burn-in epoch memorized)."""
    cpu = cpu_preset()
    return dataclasses.replace(cpu, name="cpu_full", adaptive=(1.0, 10.0), md_curve=True, only=())


def paper_preset() -> Preset:
    """The papers: CIFAR-10, ResNet-18, 40 burn-in epochs (memorized: epoch 20), 100 batches, ε 0.2, lr 0.1;
    every detector on the ST rows, the adaptive attacker at λ 1 and 10, MD with the epoch-10/20/30/40
    checkpoints memorized; one burn-in, seeds 20-22."""
    burn_in = BurnInConfig(dataset="cifar10", arch="resnet18", epochs=40, save_freq=10,
                           outf=checkpoint_folder("cifar10", "resnet18", 0))
    return Preset("paper", burn_in, 40, 20, authors_config(), adaptive=(1.0, 10.0), md_curve=True)


# The capacity ladder (the effects along model capacity), measured with the first cpu protocol (one burn-in of
# seed 0, seeds 20-22, at most 30 batches, the native kernels): name -> (arch, width, burn-in epochs). The memorized
# model is the burn-in's middle epoch, as the paper's 20 of 40.
LADDER = {"cnn": ("cnn", 0, 10), "resnet18_w16": ("resnet18", 16, 12), "resnet18_w32": ("resnet18", 32, 12)}


def capacity_rung(name: str) -> Preset:
    """One rung: the first cpu protocol's burn-in and runs for another model (no detectors, adaptive rows or
    curve)."""
    arch, width, epochs = LADDER[name]
    burn_in = BurnInConfig(dataset="fashion-mnist", arch=arch, width=width, epochs=epochs, save_freq=1,
                           device="cpu", threads=CPU_THREADS, outf=checkpoint_folder("fashion-mnist", arch, width))
    base = authors_config(run={"device": "cpu", "threads": CPU_THREADS}, stream={"steps": 30, "reuse_first_batch": True},
                          attack={"epsilon": 0.05}, eval={"threshold": None, "threshold_delta": 0.08,
                                                          "eval_subset": 2000})
    return Preset(f"capacity/{name}", burn_in, epochs, epochs // 2, base, dsc_calibrate=0.9, detectors=False)


def smoke(preset: Preset) -> Preset:
    """Every stage of the preset with tiny sizes, on its own dataset, architecture, norm, kernels and device: burn-ins
    of two epochs on 256 training samples (two of them when the preset has several), two online steps, one seed,
    small batches; results kept apart."""
    burn_in = dataclasses.replace(preset.burn_in, epochs=2, save_freq=1, subset=256,
                                  outf=preset.burn_in.outf.rstrip("/") + "_smoke")
    base = replace(preset.base, stream={"steps": 2, "batch_size": 32}, attack={"val_size": 64},
                   eval={"eval_subset": 64}, dsc={"calibrate_batches": 2},
                   measure={"detector_fit_samples": 128})
    return dataclasses.replace(preset, name=f"{preset.name}_smoke", burn_in=burn_in, online_epoch=2,
                               memorized_epoch=1, base=base, seeds=preset.seeds[:1],
                               burn_in_seeds=preset.burn_in_seeds[:2])


PRESETS = {"cpu": cpu_preset, "cpu_full": cpu_full_preset, "paper": paper_preset}
