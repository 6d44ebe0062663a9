"""The federated preset (SPEC "Federated learning"): per aggregator the attack and its two controls (the trigger
alone, honest rounds + trigger), the MD screen against the adaptive attacker, and the authors' experiment (the
attacker alone) with its control, on paired replicates (burn-in seed, seed). It starts from the cpu preset's
burn-ins (shared with the online presets: the same checkpoints, CPU kernels and threads) and runs in this process.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from utils.core.data import Data, get_data
from utils.core.train import get_device
from utils.fed.aggregators import AGGREGATORS
from utils.fed.config import ClientsConfig, FedAttackConfig, FedConfig, FedRunConfig, ServerConfig, replace
from utils.fed.run import run_federated
from utils.io.results import FolderLock, ensure_dir, write_json
from utils.sweep.presets import CPU_THREADS, Preset, Replicate, cpu_preset, smoke
from utils.sweep.reuse import ensure_burn_in, finished_summary, refuse_other_burn_in

ALONE, HONEST = " (trigger alone)", " (honest rounds + trigger)"  # the controls' label suffixes
ANCHOR = "attacker alone (the authors' experiment)"
AUTHORS = "the authors' command"
AUTHORS_COMMAND = ("--epoch 1000 --feder_lambda 8e-2 --poisoned_trigger_step 0.01 --clip_gradnorm --clipvalue 10 "
                   "--mode train --lr 1e-1 --momentum 0.9 --threshold 0.18")  # the attack repository's README
AUTHORS_ATTACK = {"feder_lambda": 0.08, "poisoned_trigger_step": 0.01, "clip_gradnorm": True, "clipvalue": 10.0,
                  "craft_mode": "train", "boost": 1.0}
# their stop: the test error (their full test set) above 0.18, read every 10th round, at most 1000 rounds
AUTHORS_STOP = {"threshold": 0.18, "threshold_delta": None, "stop_every": 10, "eval_subset": 0}


@dataclass(frozen=True)
class FedRow:
    """One row: a label, a folder-name slug, its changes to the base configuration, and the row whose controls it
    shares (``controls``; its own label when empty)."""

    label: str
    slug: str
    changes: dict[str, Any] = field(default_factory=dict)
    controls: str = ""


def with_controls(label: str, slug: str, changes: dict[str, dict]) -> list[FedRow]:
    """A row under attack and its two controls: the trigger alone (no accumulative round), honest rounds + trigger."""
    server, attack = changes.get("server", {}), changes.get("attack", {})
    return [FedRow(label, slug, changes),
            FedRow(label + ALONE, f"{slug}_trigger_alone", {**changes, "server": {**server, "rounds": 0}}),
            FedRow(label + HONEST, f"{slug}_honest", {**changes, "attack": {**attack, "poison": False}})]


@dataclass(frozen=True)
class FedPreset:
    """The federated reproduction: the online preset whose burn-ins (and epoch) it starts from, the base
    configuration, the replicates, the aggregators (each against the base attacker), the aggregators that also face
    the attacker unboosted (boost 1: its updates no larger than an honest client's step), the unboosted adaptive
    attacker's λ against the MD screen (0: none), and the authors' experiment."""

    name: str
    source: Preset
    base: FedConfig
    burn_in_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seeds: tuple[int, ...] = (20, 21)
    aggregators: tuple[str, ...] = tuple(AGGREGATORS)
    unboosted: tuple[str, ...] = ("fedavg", "md_screen")
    adaptive: float = 10.0
    anchor: bool = True
    authors: tuple[str, ...] = ("fedavg", "md_screen")
    authors_alone_rounds: int = 1000
    authors_rounds: int = 20
    alphas: tuple[float, ...] = (0.5, 0.1)  # Dirichlet α of the non-IID rows

    def rows(self) -> list[FedRow]:
        """Per aggregator the attack and its two controls; the unboosted attacker's rows; the unboosted adaptive
        attacker against the MD screen (its controls are the unboosted MD screen's); the authors' experiment (the
        attacker alone, unboosted as theirs) with its trigger-alone control."""
        rows = []
        for a in self.aggregators:
            rows += with_controls(a, a, {"server": {"aggregator": a}})
        for a in self.unboosted:
            rows += with_controls(f"{a}, unboosted attacker", f"{a}_unboosted", {"server": {"aggregator": a},
                                                                               "attack": {"boost": 1.0}})
        if self.adaptive and "md_screen" in self.unboosted:
            rows.append(FedRow(f"md_screen, unboosted adaptive attacker λ={self.adaptive:g}",
                               f"md_screen_unboosted_adaptive_l{self.adaptive:g}",
                               {"server": {"aggregator": "md_screen"},
                                "attack": {"boost": 1.0, "adaptive_md": self.adaptive}},
                               controls="md_screen, unboosted attacker"))
        if self.anchor:
            rows += with_controls(ANCHOR, "attacker_alone", {"attack": {"attacker_only": True, "boost": 1.0},
                                                             "server": {"aggregator": "fedavg"}})[:2]
        return rows + self.authors_rows() + self.dirichlet_rows()

    def authors_rows(self) -> list[FedRow]:
        """The authors' federated command (AUTHORS_ATTACK, AUTHORS_STOP): their attacker alone for up to
        ``authors_alone_rounds`` (their 1000) with its trigger-alone control, and the same attacker among the honest clients under ``authors``
        aggregators, at most ``authors_rounds`` rounds (the honest rounds never reach their stop)."""
        if not self.authors:
            return []
        alone = {"attack": {**AUTHORS_ATTACK, "attacker_only": True},
                 "server": {**AUTHORS_STOP, "aggregator": "fedavg", "rounds": self.authors_alone_rounds}}
        rows = with_controls(f"{AUTHORS}: attacker alone", "authors_alone", alone)[:2]
        for a in self.authors:
            rows += with_controls(f"{a}, the authors' attacker", f"authors_{a}", {
                "attack": AUTHORS_ATTACK, "server": {**AUTHORS_STOP, "aggregator": a, "rounds": self.authors_rounds}})
        return rows

    def dirichlet_rows(self) -> list[FedRow]:
        """Every aggregator again with non-IID clients: the training set shared by Dirichlet(α) class proportions."""
        return [row for alpha in self.alphas for a in self.aggregators for row in with_controls(
            aggregator_row(a, alpha), f"{a}_dir{alpha:g}", {"server": {"aggregator": a},
                                                              "clients": {"split": "dirichlet", "alpha": alpha}})]

    def replicates(self) -> list[Replicate]:
        return [(b, s) for b in self.burn_in_seeds for s in self.seeds]

    def run_name(self, row: FedRow, rep: Replicate) -> str:
        return f"{row.slug}_b{rep[0]}_s{rep[1]}"

    def run_config(self, row: FedRow, rep: Replicate, out: str) -> FedConfig:
        """One row's run on one replicate, in <out>/runs/<run_name>, from the replicate's burn-in."""
        b, seed = rep
        return replace(replace(self.base, **row.changes), run={"resume": self.source.burn_in_for(b).outf, "seed": seed,
                                 "model_name": f"epoch{self.source.online_epoch}.pth",
                                 "out": os.path.join(out, "runs", self.run_name(row, rep))})


def dirichlet(alpha: float) -> str:
    """The label part of a non-IID row."""
    return f"dirichlet α={alpha:g}"


def aggregator_row(aggregator: str, alpha: float | None = None) -> str:
    """The label of an aggregator's row against the base attacker: IID clients (``alpha`` None) or Dirichlet(α)."""
    return aggregator if alpha is None else f"{aggregator}, {dirichlet(alpha)}"


def federated_preset() -> FedPreset:
    """Real Fashion-MNIST, the small CNN of the cpu preset's burn-ins (epoch 5) 0-4 x seeds 20, 21 (the online
    presets' 10 paired replicates; intervals over the 5 burn-ins' means); 10 IID clients, 2
    local SGD steps of 50 samples each (an online batch's worth per round; lr 0.1, momentum 0.9, the authors' online
    settings), one malicious client that boosts its updates by N = 10 (under FedAvg they count as if it were alone),
    λ 0.01 (the authors'), a validation batch of 500, at most 8 accumulative rounds, stop at the starting error +
    0.08 (as the cpu preset), 2000 test samples evaluated per round; FedAvg and the MD screen also against the
    attacker unboosted (and the MD screen against it adaptive, λ 10); the authors' experiment unboosted, as theirs;
    the authors' command (their attacker alone, and among the honest clients under FedAvg and the MD screen); every
    aggregator again with Dirichlet(0.5) and Dirichlet(0.1) clients; the portable CPU kernels and 2 threads, as the
    burn-ins."""
    cpu = cpu_preset()
    run = FedRunConfig(device="cpu", threads=CPU_THREADS, kernels="portable", dataroot=cpu.base.run.dataroot,
                       download=cpu.base.run.download)
    base = FedConfig(run=run, clients=ClientsConfig(clients=10, local_steps=2, batch_size=50, lr=0.1, momentum=0.9),
                     attack=FedAttackConfig(malicious=0.1, boost=10.0, feder_lambda=0.01, val_size=500),
                     server=ServerConfig(rounds=8, threshold_delta=0.08, eval_subset=2000))
    return FedPreset("federated", cpu, base)


def federated_smoke(preset: FedPreset) -> FedPreset:
    """Every stage of the preset with tiny sizes: one replicate (the source preset's smoke burn-in: two epochs on 256
    samples; one seed), two rounds of 5 clients, small batches; the authors' command for 2 rounds under FedAvg only;
    one Dirichlet α."""
    base = replace(preset.base, clients={"clients": 5, "batch_size": 20, "local_steps": 1},
                   attack={"val_size": 64, "boost": 5.0}, server={"rounds": 2, "eval_subset": 200, "root_size": 20})
    return dataclasses.replace(preset, name=f"{preset.name}_smoke", base=base, source=smoke(preset.source),
                               burn_in_seeds=preset.burn_in_seeds[:1], seeds=preset.seeds[:1], authors=("fedavg",),
                               authors_alone_rounds=2, authors_rounds=2, alphas=preset.alphas[:1])


def ensure_burn_ins(preset: FedPreset, fresh: bool) -> None:
    """The source preset's burn-ins of the replicates (reused when done; shared with the online presets)."""
    epochs = sorted({preset.source.online_epoch, preset.source.memorized_epoch})
    for b in preset.burn_in_seeds:
        refuse_other_burn_in(preset.source.burn_in_for(b), fresh)
    for b in preset.burn_in_seeds:
        ensure_burn_in(preset.source.burn_in_for(b), epochs, fresh)


def ensure_run(cfg: FedConfig, fresh: bool, data: Data) -> dict:
    """The summary of this run: reused when finished with this configuration, else run (replacing)."""
    summary = finished_summary(cfg, fresh)
    if summary is not None:
        return summary
    return run_federated(replace(cfg, run={"overwrite": True}), data=data)


def run_federated_preset(preset: FedPreset, out: str, fresh: bool) -> dict[str, dict[Replicate, dict]]:
    """Every burn-in, then every run of the preset (its results folder locked), reusing what is finished;
    {row label: {replicate: summary}}."""
    groups: dict[str, dict[Replicate, dict]] = {}
    with FolderLock(ensure_dir(out)):
        ensure_burn_ins(preset, fresh)
        run = preset.base.run
        data = get_data(preset.source.burn_in.dataset, run.dataroot, get_device(run.device), download=run.download)
        for rep in preset.replicates():
            for row in preset.rows():
                groups.setdefault(row.label, {})[rep] = ensure_run(preset.run_config(row, rep, out), fresh, data)
        write_json(os.path.join(out, "preset.json"), dataclasses.asdict(preset))
    return groups
