"""Typed configuration of one federated run (SPEC "Federated learning"): ``FedConfig`` composes one frozen dataclass
per concern, each field carrying its flag (``utils.fields.opt``), so ``utils.fed.flags`` generates
``feder_accu_train.py``'s command line from them. Flags the authors' ``feder_accu_train.py`` has keep their names
where they mean the same (``--feder_lambda``, ``--poisoned_trigger_step``, ``--clip_gradnorm``, ``--clipvalue``,
``--epochs``, ``--test_batch_size``, ``--mode``, ``--threshold``). Every value is checked once, when it is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from utils.core.grads import MAX_INNER_STEPS, STEPS_NOTE
from utils.core.train import KERNELS, KERNELS_HELP, SEED_MAX
from utils.errors import UserError
from utils.fed import aggregators
from utils.io.results import check_run_files
from utils.fields import Composite, check_fields, opt, replace  # replace: for the importers of this module

RESERVED = ("config.json", "rounds.jsonl", "summary.json")


@dataclass(frozen=True)
class FedRunConfig:
    """Files, machine and seed: where the burn-in checkpoint, the data and the results are."""

    resume: str = opt("checkpoints_base_bn", "burn-in checkpoint folder (the starting global model)",
                      metavar="DIR")
    model_name: str = opt("epoch40.pth", "the starting global model's checkpoint in --resume", metavar="FILE")
    dataroot: str = opt("data", "dataset folder (torchvision layout)", metavar="DIR")
    download: bool = opt(True, "never download datasets", flag="--no_download", negate=True)
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda if available)")
    out: str | None = opt(None, "results folder (default: runs/fed_<dataset>_<arch>_<aggregator>_s<seed>_<time>)",
                           metavar="DIR")
    overwrite: bool = opt(False, "replace results already in --out")
    seed: int = opt(20, "the run's seed (split, trigger, validation and root batches, local batches)", low=0,
                    high=SEED_MAX)
    threads: int = opt(0, "torch's CPU threads (0: torch's default); results on the CPU depend on it", low=0,
                       high=4096)
    kernels: str = opt("native", KERNELS_HELP, flag="--cpu_kernels", choices=KERNELS)
    log_name: str = opt("log.txt", "name of the text log inside --out", metavar="FILE")

    def __post_init__(self) -> None:
        check_fields(self)
        check_run_files(self.log_name, RESERVED, {"--resume": self.resume, "--model_name": self.model_name})


@dataclass(frozen=True)
class ClientsConfig:
    """The clients, their data and their local SGD (SPEC "Federated learning", the protocol)."""

    clients: int = opt(10, "number of clients N (every client takes part in every round)", low=1, high=10000)
    split: str = opt("iid", "how the training set is shared: iid (equal random shards) or dirichlet (per class "
                     "proportions ~ Dirichlet(--alpha))", choices=("iid", "dirichlet"), parse_choices=True)
    alpha: float = opt(0.5, "the Dirichlet concentration of --split dirichlet (smaller: less alike clients)", low=0,
                       high=1e6, low_open=True)
    local_steps: int = opt(2, "local SGD steps E of an honest client per round", low=1, high=MAX_INNER_STEPS,
                           note=STEPS_NOTE)
    batch_size: int = opt(100, "local batch size B, and the size of the attacker's trigger batch", low=1)
    lr: float = opt(0.1, "SGD learning rate of every client (and of the attacker's steps)", low=0, low_open=True)
    momentum: float = opt(0.9, "SGD momentum of every client (the attacker keeps its buffer across rounds)", low=0,
                          high=1)
    weight_decay: float = opt(0.0, "SGD weight decay of every client", low=0, high=1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FedAttackConfig:
    """The malicious clients (SPEC "Federated learning", the attacker)."""

    malicious: float = opt(0.1, "fraction of the clients that are malicious: ceil(fraction x N) of them, the "
                           "first ones", low=0, high=1, low_open=True)
    attacker_only: bool = opt(False, "the authors' experiment: the attacker's updates alone, no honest clients "
                              "(one client, FedAvg, server lr 1)")
    poison: bool = opt(True, "control: the malicious clients train honestly in the accumulative rounds (they still "
                       "send the trigger)", flag="--no_poison", negate=True)
    feder_lambda: float = opt(0.01, "λ: weight of the alignment objective in the accumulative update", low=0,
                              high=1e6, low_open=True)
    clip_gradnorm: bool = opt(False, "bound the attacker's gradients (as the authors: the accumulative gradient's "
                              "L2 norm, the trigger gradient's inf-norm) to --clipvalue")
    clipvalue: float = opt(1.0, "the bound of --clip_gradnorm", low=0, low_open=True)
    poisoned_trigger_step: float = opt(1.0, "p: the trigger update descends -p x CE of the trigger batch (a "
                                       "reversed-gradient step)", low=0, high=1e6, low_open=True)
    boost: float = opt(1.0, "the attacker multiplies each update it sends by this (N: under FedAvg its update "
                       "counts as if it were alone)", low=0, high=1e6, low_open=True)
    adaptive_md: float = opt(0.0, "an attacker who knows the MD screen: add LAMBDA x mean MD of its validation batch "
                             "(memorized global model vs the current one) to its accumulative objective", low=0,
                             high=1e6, metavar="LAMBDA")
    val_size: int = opt(500, "size of the attacker's validation batch (a seeded draw from the test set)",
                        flag="--test_batch_size", low=1)
    craft_mode: str = opt("train", "model mode of the attacker's accumulative update (the authors': train)",
                          flag="--mode", choices=("eval", "train"), parse_choices=True)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ServerConfig:
    """The server: its aggregator, its step, the stop rule and its clean root batch (SPEC "Federated learning")."""

    aggregator: str = opt("fedavg", f"the aggregation rule: {', '.join(aggregators.AGGREGATORS)}")
    server_lr: float = opt(1.0, "η: the server sets θ <- θ + η x AGG(updates)", low=0, high=1e6, low_open=True)
    rounds: int = opt(10, "accumulative rounds before the trigger round (0: the trigger alone)", flag="--rounds",
                      aliases=("--epochs",), low=0, high=10 ** 6)
    threshold: float | None = opt(None, "stop the accumulative rounds once the test error exceeds this (default: "
                                  "no early stop)", low=0, high=1, note="a test error")
    threshold_delta: float | None = opt(None, "stop once the test error exceeds the starting model's + this "
                                        "(replaces --threshold)", low=0, high=1, note="a test error difference")
    stop_every: int = opt(1, "check the stop rule after every N-th accumulative round only (the authors' code "
                          "evaluates every 10th); every round is still evaluated and recorded", low=1, high=10 ** 6,
                          metavar="N")
    eval_subset: int = opt(0, "evaluate a fixed subset of this many test samples after each accumulative round "
                           "(0: the full set; before/after the trigger round always the full set)", low=0)
    eval_batch_size: int = opt(1000, "evaluation batch size (speed only)", low=1)
    trim: float = opt(0.1, "trimmed_mean: the fraction β trimmed at each end of every coordinate", low=0, high=0.5,
                      note="less than half")
    krum_f: int = opt(1, "krum / multikrum: the number f of malicious updates the rule is built to survive", low=0,
                      high=10000)
    multikrum_m: int = opt(0, "multikrum: how many updates it averages (0: N - f)", low=0, high=10000)
    clip_norm: float = opt(0.0, "clip: the L2 bound of every update (0: the median norm of the round's updates)",
                           low=0, high=1e6)
    root_size: int = opt(100, "the server's clean root batch (FLTrust's root data, the MD screen's clean batch), "
                         "held out of every client's shard", low=1)
    md_threshold: float = opt(3.0, "md_screen: drop updates whose MD's robust z-score exceeds this in size", low=0,
                              high=1e6, low_open=True)
    md_memory: int = opt(1, "md_screen: the memorized model is the global model this many rounds earlier (the "
                         "starting model before that)", low=0, high=10 ** 6)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.threshold is not None and self.threshold_delta is not None:
            raise UserError("give at most one of --threshold (absolute) and --threshold_delta (starting error + D)")
        if self.trim >= 0.5:
            raise UserError(f"--trim must be below 0.5 (it trims β at each end), got {self.trim:g}")


@dataclass(frozen=True)
class FlowerConfig:
    """Running the rounds on Flower instead of in this process: its simulation engine (--flower) or its deployment
    runtime, a SuperLink and SuperNodes the user started (--flower_superlink) (SPEC "Federated learning")."""

    enabled: bool = opt(False, "run the clients as Flower ClientApps and the server as a Flower ServerApp whose "
                        "strategy is --aggregator (needs pip install -r requirements-flower.txt)", flag="--flower")
    cpus: float = opt(1.0, "CPUs Flower reserves for one ClientApp (its Ray actors: cores / this)",
                      flag="--flower_cpus", low=0, high=4096, low_open=True)
    gpus: float = opt(0.0, "the GPU share Flower reserves for one ClientApp (with --device cuda)",
                      flag="--flower_gpus", low=0, high=4096)
    timeout: float = opt(600.0, "seconds the server waits for a round's updates before it reports the clients "
                         "that sent none", flag="--flower_timeout", low=0, high=1e6, low_open=True)
    superlink: str | None = opt(None, "Flower's deployment runtime: submit the run to the SuperLink whose HTTP API "
                                "is at HOST:PORT (its SuperNodes are the clients) and wait for it (docs/FEDERATED.md)",
                                flag="--flower_superlink", metavar="HOST:PORT")
    root_certificates: str | None = opt(None, "the CA certificate (PEM) that signed a TLS SuperLink's certificate; "
                                        "without it --flower_superlink speaks plain HTTP (a SuperLink started with "
                                        "--insecure, on a trusted network)", flag="--flower_root_certificates",
                                        metavar="FILE")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.enabled and self.superlink is not None:
            raise UserError("give one of --flower (Flower's simulation engine in this process) and "
                            "--flower_superlink (a SuperLink and SuperNodes you started)")
        if self.superlink is not None:
            host, _, port = self.superlink.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"--flower_superlink must be HOST:PORT (the SuperLink's --host and --port, e.g. "
                                f"127.0.0.1:9091), got {self.superlink!r}")
        if self.root_certificates is not None and self.superlink is None:
            raise UserError("--flower_root_certificates is for --flower_superlink (a SuperLink with TLS)")


def malicious_count(clients: ClientsConfig, attack: FedAttackConfig) -> int:
    """How many clients are malicious: ceil(fraction x N), the first ones; 1 (alone) in the authors' experiment."""
    return 1 if attack.attacker_only else math.ceil(attack.malicious * clients.clients - 1e-9)


@dataclass(frozen=True)
class FedConfig(Composite):
    """One federated run: every concern's settings (SPEC "Federated learning")."""

    run: FedRunConfig = field(default_factory=FedRunConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    attack: FedAttackConfig = field(default_factory=FedAttackConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    def __post_init__(self) -> None:
        n, m = self.participants(), malicious_count(self.clients, self.attack)
        if not self.attack.attacker_only and m >= self.clients.clients:
            raise UserError(f"--malicious {self.attack.malicious:g} makes {m} of the {self.clients.clients} clients "
                            f"malicious; at least one must be honest: use --malicious at most "
                            f"{(self.clients.clients - 1) / self.clients.clients:g} or more --clients")
        if self.attack.attacker_only and self.server.server_lr != 1.0:
            raise UserError("--attacker_only is the authors' experiment (the attacker's update applied as it is): "
                            "it needs --server_lr 1")
        if self.attack.adaptive_md and not self.attack.poison:
            raise UserError("--adaptive_md shapes the accumulative updates, so it cannot go with --no_poison")
        aggregators.aggregator_class(self.server.aggregator).check(self.server, n)

    def participants(self) -> int:
        """Updates per round: every client, or the attacker alone (--attacker_only)."""
        return 1 if self.attack.attacker_only else self.clients.clients


# the parts of a FedConfig: field name -> its dataclass
PARTS: dict[str, type] = {"run": FedRunConfig, "clients": ClientsConfig, "attack": FedAttackConfig,
                          "server": ServerConfig, "flower": FlowerConfig}
