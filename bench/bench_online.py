"""Speed benchmark of one online step: attack crafting, defender steps and test evaluation (issue "Speed").

What it measures (medians over ``--repeats``, after one warm-up run each), on random inputs in [0, 1] with
random labels shaped like the dataset, and a freshly initialised model built from
``utils.models.model_spec(arch, utils.data.DATASETS[dataset])``:

* building blocks: forward, forward+backward, ``utils.grads.param_grads``;
* the attack: ``craft_poisoned_trigger`` (K steps) and ``craft_accumulative_poison`` (K steps, objective
  ``reg``, all work per arriving batch: clean gradient, second-order term and the K steps);
* the defenders' steps ST / AT / DSC of ``utils.defenses`` (AT: PGD eps 0.2, step 0.02, 10 steps; DSC:
  tau = 0 and, as memorized model, a copy of the model with its weights scaled by 1 + 0.1 * N(0, 1) noise,
  so that all 10 correction steps run: the worst case. An exact copy would give MD = 0 <= tau, and DSC
  would stop before its first step); each step starts from the same saved model and optimizer state;
* one full test evaluation (``utils.core.train.evaluate`` over a ``--test_size`` Split of random uint8 images,
  asked for batches of ``--eval_batch_size`` as ``OnlineConfig`` does; on the CPU evaluate caps the batch);
* the whole online step: accumulative crafting + ST step + full evaluation.

FLOORS. Each crafting/defence cost is also given as a ratio to its floor: the time of the bare forward /
backward passes that the SPEC's mathematics needs, timed directly with ``torch.autograd.grad`` on the same
model and batch sizes (no project code involved). The primitives, the timer and the floors' one definition
(``floor_terms``) are in ``utils/report/timing.py``; the report prints each formula beside its cost.

BASELINE. The reference with the structure of the authors' code (``bench/reference_attack.py``, beside this script; its
equality with ours on a tiny model is ``tests/test_reference.py``), timed in the same run, in alternation with ours
(round after round, ``--baseline_repeats`` rounds after a warm-up round), so that background load that comes
and goes hits both alike; the speed-ups are taken from these alternated timings:

* ``authors``: every parameter gradient built with ``create_graph=True, retain_graph=True``, computed once
  per arriving batch as in their ``craft_accu``; their projection;
* ``recompute``: the same, but the clean gradient and the second-order term are recomputed in every step;
* evaluation: the full test set in float32, batches of 100, through a ``torch.utils.data.DataLoader`` over a
  ``TensorDataset`` each time (their per-sample per-class bookkeeping is timed in a separate row only).

The script checks that both baselines craft exactly the poisons ours crafts (torch.equal on the last timed
runs, all from the same saved model in eval mode); on a mismatch it prints the fraction of differing pixels
and exits with status 1.

Peak memory of one online step (ours: its warm-up run; the baseline: one extra untimed run): CPU peak RSS
(VmHWM, reset after glibc's malloc_trim; else the process-lifetime ru_maxrss) and, on CUDA,
torch.cuda.max_memory_allocated.

Usage (from the repository root):

    .venv/bin/python bench/bench_online.py --arch cnn --repeats 5
    .venv/bin/python bench/bench_online.py --arch resnet18 --repeats 3 --baseline_repeats 1
    .venv/bin/python bench/bench_online.py --arch cnn --width 8 --batch_size 20 --val_size 50 \\
        --test_size 1000 --repeats 2 --threads 1 --json bench.json        # a quick check
    .venv/bin/python bench/bench_online.py --arch cnn --channels_last   # also compares memory formats

On a shared CPU, prefer --threads 1: with more intra-op threads than free cores, busy OpenMP threads slow
small operations manyfold (the script warns when the load average says so). Timings are medians, but
background load still shows: compare figures from one run, and see the per-repeat times in --json.

Options: --dataset (default: fashion-mnist for cnn, cifar10 for resnet18), --width, --batch_size (100),
--val_size (500), --test_size (10000), --eval_batch_size (1000), --num_steps K (2), --device (cuda if
available, else cpu), --repeats (5), --baseline_repeats (default: --repeats), --threads N
(torch.set_num_threads), --channels_last, --skip_baseline, --json PATH, --seed.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from reference_attack import authors_test_loader, baseline_craft_accu, baseline_sgd_step, baseline_test
from utils.attack.craft import craft_accumulative_poison, craft_poisoned_trigger
from utils.core.data import DATASETS, Split
from utils.core.grads import param_grads
from utils.core.models import build_model, model_spec
from utils.core.train import Learner, cpu_eval_chunk, environment as library_environment, evaluate, get_device
from utils.defense.config import ATConfig, DSCConfig
from utils.defense.defenders import AdversarialTraining, Defender, DiscrepancyAwareCorrection, StandardTraining
from utils.defense.dsc import DSCThreshold
from utils.io.results import write_json
from utils.report.timing import (FB, FB_TRAIN, FB_VAL, FWD_NG, FWD_NG_EVAL, ONLINE, SECOND, STEP, XGRAD, Primitives,
                                 Timer, floor_formulas, floors, peak_memory)

EPS = 0.2
AT_CFG = ATConfig(epsilon=0.2, step_size=0.02, steps=10)
DSC_CFG = DSCConfig(tau0=0.0, kappa=0.0, epsilon=0.2, step_size=0.02, max_steps=10)
DEFAULT_DATASET = {"cnn": "fashion-mnist", "resnet18": "cifar10"}
ROWS = [FWD_NG, "forward (autograd on)", FB, "param_grads", "trigger crafting", "accumulative crafting",
        "ST step", "AT step", "DSC step (tau=0)", "full evaluation", ONLINE]
RULE = "-" * 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cnn", choices=["cnn", "resnet18"])
    p.add_argument("--width", type=int, default=0, help="base width (0: the arch's default)")
    p.add_argument("--dataset", default=None, choices=["fashion-mnist", "cifar10"],
                   help="input shape (default: fashion-mnist for cnn, cifar10 for resnet18)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--val_size", type=int, default=500, help="the attacker's validation batch")
    p.add_argument("--test_size", type=int, default=10000)
    p.add_argument("--eval_batch_size", type=int, default=1000, help="ours (OnlineConfig.eval_batch_size)")
    p.add_argument("--num_steps", type=int, default=2, help="K, the crafting steps")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline_repeats", type=int, default=None, help="default: --repeats")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--channels_last", action="store_true",
                   help="channels_last model+inputs on the measured path; also prints a format comparison")
    p.add_argument("--skip_baseline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def fmt_ms(s: float | None) -> str:
    """Seconds as a 10-wide milliseconds column."""
    return "-" if s is None else f"{1e3 * s:10.2f}"


@torch.inference_mode()
def evaluate_unchunked(model: nn.Module, split: Split, batch_size: int) -> float:
    """``utils.core.train.evaluate`` before the CPU cap: one forward per ``batch_size`` samples, a sync per batch."""
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, len(split), batch_size):
        x, y = split.batch(torch.arange(i, min(i + batch_size, len(split))))
        wrong += (model(x).argmax(1) != y).sum().item()
    model.train(was_training)
    return wrong / len(split)


@dataclass
class Bench:
    """What the timings share: the model and its saved state, the batches, the timer and the figures so far."""

    args: argparse.Namespace
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    learner: Learner
    defenders: dict[str, Defender]
    data: dict[str, torch.Tensor]  # x, y, x_tri, y_tri (the crafted trigger), x_val, y_val, x_eval
    test: Split
    base_loader: DataLoader  # the baseline's test data: float32 on the CPU, as their test loader
    eval_chunk: int  # the batch evaluate really uses
    timer: Timer
    env: dict = field(default_factory=dict)
    res: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)
    fns: dict[str, Callable[[], object]] = field(default_factory=dict)
    memory: dict[str, dict] = field(default_factory=dict)
    snapshot: tuple[dict, dict] = field(init=False)  # the model's and optimizer's state all timings start from
    prim: Primitives = field(init=False)

    def __post_init__(self) -> None:
        self.snapshot = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))
        self.prim = Primitives(self.model)

    def restore(self, mode: str = "eval") -> None:
        """Back to the saved model and optimizer state, in the given mode."""
        self.model.load_state_dict(self.snapshot[0])
        self.optimizer.load_state_dict(self.snapshot[1])
        self.model.train(mode == "train")

    def save_partial(self) -> None:
        """Write what is measured so far (a run killed half-way, e.g. out of memory, leaves its figures)."""
        save_json(self.args.json, {"partial": True, "env": self.env, "timings": self.res, "memory": self.memory})

    def run(self, name: str, fn: Callable[[], object], setup: Callable[[], None] | None = None,
            memory_key: str | None = None) -> None:
        """Time ``fn`` from the saved state; with ``memory_key`` its warm-up run also records the peak memory."""
        self.fns[name] = fn
        first = None
        if memory_key is not None:
            def first(f: Callable[[], object]) -> object:
                box: list = []
                self.memory[memory_key] = peak_memory(lambda: box.append(f()), self.device)
                return box[0]
        self.res[name], self.outputs[name] = self.timer(fn, self.args.repeats, setup or self.restore, first)
        print(f"  {name:40s} {fmt_ms(self.res[name]['median_s'])} ms", flush=True)
        self.save_partial()

    def run_group(self, items: list[tuple[str, Callable[[], object]]], repeats: int) -> None:
        """Time (name, fn) pairs in alternation, round after round, each run from the saved state."""
        figures = self.timer.interleaved([fn for _, fn in items], repeats, self.restore)
        for (name, _), (fig, out) in zip(items, figures):
            self.res[name], self.outputs[name] = fig, out
            print(f"  {name:40s} {fmt_ms(fig['median_s'])} ms", flush=True)
        self.save_partial()

    def craft(self, model: nn.Module | None = None, data: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Our accumulative crafting (objective reg) on the benchmark's batches (or on ``data``)."""
        d = data or self.data
        return craft_accumulative_poison(model or self.model, d["x"], d["y"], d["x_tri"], d["y_tri"], d["x_val"],
                                         d["y_val"], epsilon=EPS, num_steps=self.args.num_steps, objective="reg")

    def craft_baseline(self, recompute: bool = False) -> torch.Tensor:
        """The reference's accumulative crafting on the benchmark's batches."""
        d = self.data
        return baseline_craft_accu(self.model, d["x"], d["y"], d["x_tri"], d["y_tri"], d["x_val"], d["y_val"],
                                   epsilon=EPS, num_steps=self.args.num_steps, recompute=recompute)


def save_json(path: str | None, figures: dict) -> None:
    """Write the figures as JSON with the library's writer (nothing without a path)."""
    if path:
        write_json(path, figures)


def make_model(args: argparse.Namespace, device: torch.device, fmt: torch.memory_format) -> tuple[nn.Module, nn.Module]:
    """The model and DSC's memorized model: a copy with perturbed weights (tau = 0 then forces all DSC steps)."""
    torch.manual_seed(args.seed)
    info = DATASETS[args.dataset]
    model = build_model(model_spec(args.arch, info, width=args.width)).to(device).to(memory_format=fmt)
    # an exact copy gives MD = 0 <= tau = 0 and DSC would stop before its first step
    memorized = copy.deepcopy(model)
    with torch.no_grad():
        for p in memorized.parameters():
            p.mul_(1.0 + 0.1 * torch.randn_like(p))
    return model, memorized.eval()


def make_data(args: argparse.Namespace, device: torch.device, fmt: torch.memory_format) -> tuple[dict, Split]:
    """Random batches in [0, 1] with random labels (x, y, trigger, validation) and a random uint8 test Split."""
    info = DATASETS[args.dataset]
    shape = (info.in_channels, info.image_size, info.image_size)
    gen = torch.Generator().manual_seed(args.seed)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand((n, *shape), generator=gen).to(device).contiguous(memory_format=fmt)
        return x, torch.randint(0, info.num_classes, (n,), generator=gen).to(device)

    data = {}
    data["x_tri"], data["y_tri"] = batch(args.batch_size)
    data["x_val"], data["y_val"] = batch(args.val_size)
    data["x"], data["y"] = batch(args.batch_size)
    test = Split(torch.randint(0, 256, (args.test_size, *shape), generator=gen, dtype=torch.uint8),
                 torch.randint(0, info.num_classes, (args.test_size,), generator=gen))
    return data, Split(test.x.to(device).contiguous(memory_format=fmt), test.y.to(device))


def build(args: argparse.Namespace) -> Bench:
    """The model, its learner and defenders, the batches (the trigger crafted) and the test data."""
    device = get_device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model, memorized = make_model(args, device, fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    defenders = {"ST": StandardTraining(), "AT": AdversarialTraining(AT_CFG),
                 "DSC": DiscrepancyAwareCorrection(DSC_CFG, memorized, DSCThreshold(tau0=0.0, kappa=0.0))}
    data, test = make_data(args, device, fmt)
    model.eval()
    data["x_tri"] = craft_poisoned_trigger(model, data["x_tri"], data["y_tri"], data["x_val"], data["y_val"],
                                           epsilon=EPS, num_steps=args.num_steps)
    eval_chunk = (cpu_eval_chunk(model, test.batch(torch.arange(1))[0], args.eval_batch_size)
                  if device.type == "cpu" else args.eval_batch_size)
    # the floor of an evaluation: forward passes at the batch size evaluate really uses
    data["x_eval"] = test.batch(torch.arange(min(eval_chunk, args.test_size)))[0].contiguous(memory_format=fmt)
    return Bench(args, device, model, optimizer, Learner(model, optimizer, mode="train"), defenders, data, test,
                 authors_test_loader(test), eval_chunk, Timer(device, args.warmup))


def environment(b: Bench) -> dict:
    """The library's environment (versions, commit, machine, threads) and the run's sizes."""
    a, device, info = b.args, b.device, DATASETS[b.args.dataset]
    shape = "x".join(map(str, (info.in_channels, info.image_size, info.image_size)))
    lib = library_environment(device)
    return {**lib, "device": str(device), "device_name": lib["gpu"] or lib["platform"], "cpu_count": os.cpu_count(),
            "arch": a.arch, "width": a.width or ("64" if a.arch == "resnet18" else "16"),
            "dataset_shape": f"{a.dataset} {shape}", "batch_size": a.batch_size, "val_size": a.val_size,
            "test_size": a.test_size, "eval_batch_size": a.eval_batch_size, "K": a.num_steps,
            "channels_last": a.channels_last, "repeats": a.repeats, "baseline_repeats": a.baseline_repeats,
            "warmup": a.warmup, "params": sum(p.numel() for p in b.model.parameters()),
            "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "eval_chunk": b.eval_chunk}


def load_warning(env: dict) -> str | None:
    """A warning when the load average leaves fewer free cores than the threads used (CPU only)."""
    load = env["loadavg_1min_at_start"]
    if env["device"] != "cpu" or load is None or not env["cpu_count"]:
        return None
    if env["cpu_count"] - load >= env["threads"] - 0.5:
        return None
    return (f"WARNING: load average {load:.1f} on {env['cpu_count']} CPUs leaves fewer free cores than threads "
            f"used ({env['threads']}): other work shares the CPU, timings are noisy (busy OpenMP threads can "
            f"slow small ops manyfold; --threads 1 is steadier)")


def time_blocks(b: Bench) -> None:
    """Forward, forward+backward and param_grads on the batch."""
    d = b.data
    b.run(FWD_NG, lambda: b.prim.fwd_nograd(d["x"]))
    b.run("forward (autograd on)", lambda: b.prim.fwd(d["x"]))
    b.run(FB, lambda: b.prim.fb(d["x"], d["y"]))
    b.run("param_grads", lambda: param_grads(b.model, d["x"], d["y"]))


def time_floor_primitives(b: Bench) -> None:
    """The bare autograd passes the floors are made of."""
    d, p = b.data, b.prim
    b.run(FB_VAL, lambda: p.fb(d["x_val"], d["y_val"]))
    b.run(STEP, lambda: p.step(d["x"], d["y"]))
    b.run(SECOND, lambda: p.second(d["x_tri"], d["y_tri"], d["x_val"], d["y_val"]))
    b.run(XGRAD, lambda: p.xgrad(d["x"], d["y"]))
    b.run(FB_TRAIN, lambda: p.fb(d["x"], d["y"]), setup=lambda: b.restore("train"))
    b.run(FWD_NG_EVAL, lambda: p.fwd_nograd(d["x_eval"]))


def time_attack(b: Bench) -> None:
    """Trigger crafting and accumulative crafting (ours)."""
    d = b.data
    b.run("trigger crafting", lambda: craft_poisoned_trigger(b.model, d["x_tri"], d["y_tri"], d["x_val"], d["y_val"],
                                                             epsilon=EPS, num_steps=b.args.num_steps))
    b.run("accumulative crafting", b.craft)


def time_defenders(b: Bench) -> float | None:
    """One step of ST, AT and DSC (tau = 0) each; returns the DSC steps taken."""
    d, info = b.data, {}
    b.run("ST step", lambda: b.defenders["ST"].step(b.learner, d["x"], d["y"], 0))
    b.run("AT step", lambda: b.defenders["AT"].step(b.learner, d["x"], d["y"], 0))
    b.run("DSC step (tau=0)", lambda: info.update(b.defenders["DSC"].step(b.learner, d["x"], d["y"], 0)))
    if info.get("dsc_steps") != DSC_CFG.max_steps:
        print(f"WARNING: DSC took {info.get('dsc_steps')} steps, not {DSC_CFG.max_steps}")
    return info.get("dsc_steps")


def time_evaluation(b: Bench) -> None:
    """One full test evaluation (ours)."""
    b.run("full evaluation", lambda: evaluate(b.model, b.test, b.args.eval_batch_size))


def time_online_step(b: Bench) -> None:
    """Accumulative crafting + ST step + full evaluation, with the peak memory of its warm-up run."""
    def online_ours() -> float:
        b.model.eval()
        x_adv = b.craft()
        b.defenders["ST"].step(b.learner, x_adv, b.data["y"], 0)
        return evaluate(b.model, b.test, b.args.eval_batch_size)

    b.run(ONLINE, online_ours, memory_key="ours")


def baseline_online_step(b: Bench, recompute: bool) -> Callable[[], float]:
    """The reference's online step: crafting, their SGD step, their test."""
    def fn() -> float:
        x_adv = b.craft_baseline(recompute)
        baseline_sgd_step(b.model, b.optimizer, x_adv, b.data["y"])
        return baseline_test(b.model, b.base_loader, b.device)
    return fn


def compare_baseline(b: Bench) -> dict:
    """Ours against the reference, timed in alternation; returns whether the poisons are identical."""
    reps = b.args.baseline_repeats
    b.restore()
    box: list = []
    b.memory["baseline"] = peak_memory(lambda: box.append(baseline_online_step(b, False)()), b.device)
    print("# ours vs baseline, timed in alternation")
    b.run_group([("ours: accumulative crafting", b.fns["accumulative crafting"]),
                 ("baseline: accumulative crafting", b.craft_baseline),
                 ("baseline: accu. crafting, recompute/step", lambda: b.craft_baseline(True))], reps)
    loader, device = b.base_loader, b.device
    evals = [("ours: full evaluation", b.fns["full evaluation"]),
             ("baseline: full evaluation", lambda: baseline_test(b.model, loader, device)),
             ("baseline: full eval + per-sample bookkeeping", lambda: baseline_test(b.model, loader, device, True))]
    if b.eval_chunk < b.args.eval_batch_size:
        evals.append((f"evaluate before the CPU cap (bs {b.args.eval_batch_size})",
                      lambda: evaluate_unchunked(b.model, b.test, b.args.eval_batch_size)))
    b.run_group(evals, reps)
    b.run_group([("ours: online step", b.fns[ONLINE]), ("baseline: online step", baseline_online_step(b, False)),
                 ("baseline: online step, recompute/step", baseline_online_step(b, True))], reps)
    # identical poisons: the last timed runs, all from the same restored model in eval mode
    ours, identity = b.outputs["accumulative crafting"], {}
    for name, key in (("authors", "baseline: accumulative crafting"),
                      ("recompute", "baseline: accu. crafting, recompute/step")):
        diff = (ours - b.outputs[key]).abs()
        identity[name] = {"equal": bool(torch.equal(ours, b.outputs[key])), "max_abs_diff": diff.max().item(),
                          "frac_differing": (diff > 0).float().mean().item()}
    return identity


def compare_memory_formats(b: Bench) -> dict:
    """Contiguous against channels_last, same weights, timed in alternation."""
    print("\n# memory-format comparison: contiguous vs channels_last, same weights, timed in alternation")
    m_c = copy.deepcopy(b.model).to(memory_format=torch.contiguous_format).eval()
    d_c = {k: v.contiguous() for k, v in b.data.items() if k != "x_eval"}
    x_c, y = d_c["x"], d_c["y"]
    test_c = Split(b.test.x.contiguous(), b.test.y)
    prim_c, bs = Primitives(m_c), b.args.eval_batch_size
    pairs = {"forward (no_grad)": (lambda: prim_c.fwd_nograd(x_c), lambda: b.prim.fwd_nograd(b.data["x"])),
             "forward+backward": (lambda: prim_c.fb(x_c, y), lambda: b.prim.fb(b.data["x"], y)),
             "accumulative crafting": (lambda: b.craft(m_c, d_c), b.craft),
             "full evaluation": (lambda: evaluate(m_c, test_c, bs), lambda: evaluate(b.model, b.test, bs))}
    out = {}
    for name, (f_c, f_cl) in pairs.items():
        (r_c, _), (r_cl, _) = b.timer.interleaved([f_c, f_cl], b.args.repeats)
        out[name] = {"contiguous_s": r_c["median_s"], "channels_last_s": r_cl["median_s"]}
        print(f"  {name:40s} {fmt_ms(r_c['median_s'])} / {fmt_ms(r_cl['median_s'])} ms", flush=True)
    return out


def baseline_pairs(b: Bench) -> list[tuple[str, str, str, str]]:
    """(label, baseline row, our row timed alongside it, our floor) of the speed-up table."""
    pairs = [("accumulative crafting", "baseline: accumulative crafting", "ours: accumulative crafting",
              "accumulative crafting"),
             ("accu. crafting (recompute in each step)", "baseline: accu. crafting, recompute/step",
              "ours: accumulative crafting", "accumulative crafting"),
             ("full evaluation (DataLoader, bs 100)", "baseline: full evaluation", "ours: full evaluation",
              "full evaluation"),
             ("  + their per-sample bookkeeping", "baseline: full eval + per-sample bookkeeping",
              "ours: full evaluation", "full evaluation"),
             ("online step", "baseline: online step", "ours: online step", ONLINE),
             ("online step (recompute in each step)", "baseline: online step, recompute/step",
              "ours: online step", ONLINE)]
    pre = f"evaluate before the CPU cap (bs {b.args.eval_batch_size})"
    if pre in b.res:
        pairs.insert(4, ("utils.core.train.evaluate before the CPU cap", pre, "ours: full evaluation", "full evaluation"))
    return pairs


def speedups(b: Bench, fl: dict[str, float]) -> tuple[dict, dict]:
    """Per label: the median over rounds of baseline/ours, and the baseline over our floor."""
    speed, bound = {}, {}
    if b.args.skip_baseline:
        return speed, bound
    for label, base, ours, floor in baseline_pairs(b):
        # the median of the per-round ratios: robust to load that changes from round to round
        speed[label] = statistics.median(tb / to for tb, to in zip(b.res[base]["times_s"], b.res[ours]["times_s"]))
        bound[label] = b.res[base]["median_s"] / fl[floor]
    return speed, bound


def report_costs(b: Bench, med: dict, fl: dict, formulas: dict, warning: str | None) -> None:
    """The header, each cost with its floor and ratio, and the floor primitives."""
    a, env = b.args, b.env
    print("\n" + "=" * 100)
    print(f"bench_online  arch={a.arch} width={env['width']} shape={env['dataset_shape']} batch={a.batch_size} "
          f"val={a.val_size} test={a.test_size} (evaluate's batch: {b.eval_chunk}) K={a.num_steps}")
    print(f"torch {env['torch']}  device={env['device']} ({env['device_name']})  threads={env['threads']}  "
          f"channels_last={a.channels_last}  repeats={a.repeats} (baseline {a.baseline_repeats}), medians")
    if env["loadavg_1min_at_start"] is not None:
        print(f"load average (1 min): {env['loadavg_1min_at_start']:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    if warning:
        print(warning)
    print(RULE)
    print(f"{'operation':44s} {'median ms':>10s} {'floor ms':>10s} {'x floor':>8s}  floor =")
    for r in ROWS:
        f = fl.get(r)
        ratio = f"{med[r] / f:8.2f}" if f else " " * 8
        print(f"{r:44s} {fmt_ms(med[r])} {fmt_ms(f) if f else ' ' * 10} {ratio}  {formulas.get(r, '')}")
    print(RULE)
    print("floor primitives (bare torch.autograd passes, same model and batch sizes)")
    for r in [k for k in med if k.startswith("floor: ")]:
        print(f"  {r[7:]:42s} {fmt_ms(med[r])}")


def report_baseline(b: Bench, med: dict, speed: dict, bound: dict, identity: dict) -> None:
    """The speed-ups over the reference and whether it crafted our poisons."""
    print(RULE)
    print(f"{'baseline (authors structure), in alternation':44s} {'base ms':>10s} {'ours ms':>10s} "
          f"{'speed-up':>8s} {'at floor':>8s}")
    for label, base, ours, _ in baseline_pairs(b):
        print(f"{label:44s} {fmt_ms(med[base])} {fmt_ms(med[ours])} {speed[label]:8.2f} {bound[label]:8.2f}")
    print("  (speed-up: median over rounds of baseline/ours in the same round; at floor: baseline / our floor,\n"
          "   the speed-up an exact implementation running at its floor would reach)")
    print("identical poisons (ours vs baseline, same model, eval mode):")
    for name, d in identity.items():
        print(f"  {name:10s} equal={d['equal']}  max|diff|={d['max_abs_diff']:.3g}  "
              f"differing pixels={100 * d['frac_differing']:.4f}%")


def report_memory(memory: dict, fmt_cmp: dict) -> None:
    """Peak memory of one online step, and the memory-format comparison."""
    print(RULE)
    print("peak memory, one online step")
    for who, m in memory.items():
        line = f"  {who:10s} CPU peak RSS {m['cpu_peak_rss_MiB']:9.1f} MiB ({m['cpu_peak_kind']}"
        if m.get("cpu_rss_before_MiB") is not None:
            line += f"; RSS before {m['cpu_rss_before_MiB']:.1f} MiB"
        line += ")"
        if "cuda_max_allocated_MiB" in m:
            line += f"  CUDA max allocated {m['cuda_max_allocated_MiB']:.1f} MiB"
        print(line)
    if fmt_cmp:
        print(RULE)
        print(f"{'channels_last vs contiguous':44s} {'contig ms':>10s} {'ch.last ms':>10s} {'speed-up':>8s}")
        for name, d in fmt_cmp.items():
            print(f"{name:44s} {fmt_ms(d['contiguous_s'])} {fmt_ms(d['channels_last_s'])} "
                  f"{d['contiguous_s'] / d['channels_last_s']:8.2f}")
    print("=" * 100, flush=True)


def report(b: Bench, fl: dict, formulas: dict, speed: dict, bound: dict, identity: dict, fmt_cmp: dict,
           warning: str | None) -> None:
    """The printed report: costs against floors, the baseline comparison, memory."""
    med = {k: v["median_s"] for k, v in b.res.items()}
    report_costs(b, med, fl, formulas, warning)
    if not b.args.skip_baseline:
        report_baseline(b, med, speed, bound, identity)
    report_memory(b.memory, fmt_cmp)


def main(argv: list[str] | None = None) -> int:
    """Time every cost, print the report, write the JSON; 1 when the baseline crafted other poisons."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dataset = args.dataset or DEFAULT_DATASET[args.arch]
    args.baseline_repeats = args.baseline_repeats or args.repeats
    b = build(args)
    b.env = environment(b)
    print("# bench_online: environment")
    for k, v in b.env.items():
        if k != "eval_chunk":
            print(f"  {k:16s} {v}")
    warning = load_warning(b.env)
    if warning:
        print(warning)
    sys.stdout.flush()

    print("\n# timing (medians; progress)")
    time_blocks(b)
    time_floor_primitives(b)
    time_attack(b)
    dsc_steps = time_defenders(b)
    time_evaluation(b)
    time_online_step(b)
    identity = {} if args.skip_baseline else compare_baseline(b)
    b.restore()
    fmt_cmp = compare_memory_formats(b) if args.channels_last else {}

    med = {k: v["median_s"] for k, v in b.res.items()}
    eval_b = min(b.eval_chunk, args.test_size)
    n_eval = args.test_size / eval_b
    fl = floors(med, args.num_steps, AT_CFG.steps, DSC_CFG.max_steps, n_eval)
    formulas = floor_formulas(args.num_steps, AT_CFG.steps, DSC_CFG.max_steps, n_eval, eval_b)
    speed, bound = speedups(b, fl)
    report(b, fl, formulas, speed, bound, identity, fmt_cmp, warning)

    save_json(args.json, {"partial": False, "env": b.env, "timings": b.res, "floors_s": fl,
                           "floor_formula": formulas, "ratio_to_floor": {k: med[k] / v for k, v in fl.items()},
                           "speedups": speed, "speedup_at_floor": bound, "identity": identity, "memory": b.memory,
                           "channels_last_comparison": fmt_cmp, "dsc_steps": dsc_steps, "load_warning": warning})
    bad = [n for n, d in identity.items() if not d["equal"]]
    if bad:
        print(f"FAIL: the baseline ({', '.join(bad)}) crafted different poisons than ours", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
