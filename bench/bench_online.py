"""Speed benchmark of one online step: attack crafting, defender steps and test evaluation (issue "Speed").

What it measures (medians over ``--repeats``, after one warm-up run each), on random inputs in [0, 1] with
random labels shaped like the dataset, and a freshly initialised model built from
``utils.models.model_spec(arch, utils.data.DATASETS[dataset])``:

* building blocks: forward, forward+backward, ``utils.grads.param_grads``;
* the attack: ``craft_poisoned_trigger`` (K steps) and ``craft_accumulative_poison`` (K steps, objective
  ``reg``, all work per arriving batch: clean gradient, second-order term and the K steps);
* the defender steps ST / AT / DSC of ``utils.defenses`` (AT: PGD eps 0.2, step 0.02, 10 steps; DSC:
  tau = 0 and, as memorized model, a copy of the model with its weights scaled by 1 + 0.1 * N(0, 1) noise,
  so that all 10 correction steps run: the worst case. An exact copy would give MD = 0 <= tau, and DSC
  would stop before its first step); each step starts from the same saved model and optimizer state;
* one full test evaluation (``utils.train.evaluate`` over a ``--test_size`` Split of random uint8 images,
  asked for batches of ``--eval_batch_size`` as ``OnlineConfig`` does; on the CPU evaluate caps the batch);
* the whole online step: accumulative crafting + ST step + full evaluation.

FLOORS. Each crafting/defence cost is also given as a ratio to its floor: the time of the bare forward /
backward passes that the SPEC's mathematics needs, timed directly with ``torch.autograd.grad`` on the same
model and batch sizes (no project code involved):

* ``fb(n)``: forward + backward to the parameters on n samples;
* ``step(n)``: forward + backward(create_graph) to the parameters + double backward to the input;
* ``second``: forward + backward(create_graph) on the trigger batch and on the validation batch, then one
  double backward of their alignment to the parameters (the second-order term s);
* ``xgrad(n)``: forward + backward to the input only (one PGD / DSC step), ``fwd_ng(n)``: forward, no grad.

  trigger crafting        floor = fb(val) + K * step(batch)
  accumulative crafting   floor = second + fb(batch) + K * step(batch)
  AT step                 floor = 10 * xgrad(batch) + fb_train(batch)
  DSC step (tau = 0)      floor = 10 * (xgrad(batch) + fwd_ng(batch)) + fb_train(batch)
  full evaluation         floor = (test_size / b) * fwd_ng(b), b the batch evaluate really uses (on the
                          CPU capped by utils.train.cpu_eval_chunk)

BASELINE. A straightforward implementation with the structure of the authors' code
(ShawnXYang/AccumulativeAttack, ``craft_accu`` and ``test``), timed in the same run, in alternation with ours
(round after round, ``--baseline_repeats`` rounds after a warm-up round), so that background load that comes
and goes hits both alike; the speed-ups are taken from these alternated timings:

* ``authors``: every parameter gradient built with ``create_graph=True, retain_graph=True`` (also the
  clean gradient and the second-order term, which need no graph), computed once per arriving batch as in
  their ``craft_accu``; their projection ``clamp(x0 + clamp(x' - x0, -eps, eps), 0, 1)``;
* ``recompute``: the same, but the trigger / validation / clean gradients and the second-order term are
  recomputed inside every one of the K steps (the previous step's are dropped first);
* evaluation: the full test set in float32, batches of 100, through a ``torch.utils.data.DataLoader`` over a
  ``TensorDataset`` each time (their per-sample per-class bookkeeping is timed in a separate row only).

The script checks that both baselines craft exactly the poisons ours crafts (torch.equal on the last timed
runs, all from the same saved model in eval mode); on a mismatch it prints the fraction of differing pixels
and exits with status 1.

Peak memory of one online step (ours: its warm-up run; the baseline: one extra untimed run): CPU peak RSS
(VmHWM of /proc/self/status, reset through /proc/self/clear_refs after glibc's malloc_trim, so that it starts
from the live data; where that is not possible, the process-lifetime ru_maxrss) and, on CUDA,
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
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from attack_generator import craft_accumulative_poison, craft_poisoned_trigger  # noqa: E402
from utils.data import DATASETS, Split  # noqa: E402
from utils.defenses import (Learner, adversarial_training, discrepancy_aware_correction,  # noqa: E402
                            standard_training)
from utils.grads import param_grads, trainable_params  # noqa: E402
from utils.models import build_model, model_spec  # noqa: E402
from utils.train import cpu_eval_chunk, evaluate, get_device  # noqa: E402

EPS = 0.2
AT_CFG = {"epsilon": 0.2, "step_size": 0.02, "steps": 10, "descend_with_kl": False}
DSC_CFG = {"tau0": 0.0, "kappa": 0.0, "epsilon": 0.2, "step_size": 0.02, "max_steps": 10}
DEFAULT_DATASET = {"cnn": "fashion-mnist", "resnet18": "cifar10"}


# --------------------------------------------------------------------------------------------- timing
class Timer:
    """Medians of wall-clock times (perf_counter, CUDA synchronised) after ``warmup`` untimed runs."""

    def __init__(self, device: torch.device, warmup: int = 1):
        self.device, self.warmup = device, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None,
                 first: Callable[[Callable[[], object]], object] | None = None) -> tuple[dict, object]:
        """(figures, the last run's return value); ``first(fn)`` replaces the first (untimed if warmup) run."""
        (fig, out), = self.interleaved([fn], repeats, setup, [first])
        return fig, out

    def interleaved(self, fns: list[Callable[[], object]], repeats: int, setup: Callable[[], None] | None = None,
                    firsts: list | None = None) -> list[tuple[dict, object]]:
        """Several functions timed in alternation, round after round (fair under changing background load).

        Returns (figures, the last run's return value) per function; ``firsts[j](fns[j])`` replaces the first
        (untimed if warmup) run of function j.
        """
        firsts = firsts or [None] * len(fns)
        times: list[list[float]] = [[] for _ in fns]
        outs: list[object] = [None] * len(fns)
        for i in range(self.warmup + repeats):
            for j, fn in enumerate(fns):
                if setup is not None:
                    setup()
                self.sync()
                t0 = time.perf_counter()
                outs[j] = firsts[j](fn) if (i == 0 and firsts[j] is not None) else fn()
                self.sync()
                if i >= self.warmup:
                    times[j].append(time.perf_counter() - t0)
        return [({"median_s": statistics.median(ts), "times_s": ts}, out) for ts, out in zip(times, outs)]


# --------------------------------------------------------------------------------------------- memory
def _read_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS before a step counts live data only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak CPU RSS (and CUDA allocation) while ``fn`` runs once."""
    _malloc_trim()
    per_step = _reset_hwm() and _read_hwm_kib() is not None
    rss_before = _rss_kib()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    fn()
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_max_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["cuda_allocated_before_MiB"] = cuda_before / 2 ** 20
    if per_step:
        out["cpu_peak_rss_MiB"] = _read_hwm_kib() / 1024
        out["cpu_rss_before_MiB"] = rss_before / 1024 if rss_before is not None else None
        out["cpu_peak_kind"] = "VmHWM, reset after malloc_trim before the step"
    else:
        out["cpu_peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["cpu_peak_kind"] = "ru_maxrss (process lifetime)"
    return out


# --------------------------------------------------------------------------------------------- baseline
def _authors_projection(x_new: torch.Tensor, x0: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Their update: eta = clamp(x' - x0, -eps, eps); clamp(x0 + eta, 0, 1)."""
    eta = torch.clamp(x_new - x0, -epsilon, epsilon)
    return torch.clamp(x0 + eta, 0, 1.0)


def baseline_craft_accu(model: nn.Module, x_tri: torch.Tensor, y_tri: torch.Tensor, x: torch.Tensor,
                        y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *, epsilon: float = EPS,
                        num_steps: int = 2, gamma: float = 1.0, recompute: bool = False) -> torch.Tensor:
    """Accumulative crafting (objective reg) with the structure of the authors' ``craft_accu``.

    ``recompute``: the trigger / validation / clean gradients and the second-order term are rebuilt inside
    every one of the K steps (their code builds them once per call).
    """
    step_size = 2.0 * epsilon / num_steps
    model.eval()
    params = list(model.parameters())
    x_pgd = x.detach().clone().requires_grad_(True)

    def terms():
        with torch.enable_grad():
            loss_tri = F.cross_entropy(model(x_tri), y_tri)
            g_tri = torch.autograd.grad(loss_tri, params, retain_graph=True, create_graph=True)
            model.zero_grad()
            loss_val = F.cross_entropy(model(x_val), y_val)
            g_val = torch.autograd.grad(loss_val, params, retain_graph=True, create_graph=True)
            model.zero_grad()
            loss_train = F.cross_entropy(model(x), y)
            g_train = torch.autograd.grad(loss_train, params, retain_graph=True, create_graph=True)
            model.zero_grad()
            c = 0
            for a, b in zip(g_tri, g_val):
                c += F.normalize(a.flatten(), p=2, dim=0) @ F.normalize(b.flatten(), p=2, dim=0)
            second = torch.autograd.grad(c, params, retain_graph=True, create_graph=True)
            model.zero_grad()
        return g_train, second

    if not recompute:
        g_train, second = terms()
    for _ in range(num_steps):
        if recompute:
            # drop the last step's graphs first, else two steps' graphs coexist (ResNet-18 ran out of memory)
            g_train = second = loss_adv = g_adv = obj = None
            g_train, second = terms()
        with torch.enable_grad():
            loss_adv = F.cross_entropy(model(x_pgd), y)
            g_adv = torch.autograd.grad(loss_adv, params, retain_graph=True, create_graph=True)
            model.zero_grad()
            obj = 0
            for ga, gt, s in zip(g_adv, g_train, second):
                obj += F.normalize(ga.flatten(), p=2, dim=0) @ (gamma * F.normalize(gt.flatten(), p=2, dim=0)
                                                                + F.normalize(s.flatten(), p=2, dim=0))
            (x_grad,) = torch.autograd.grad(obj, x_pgd)
        x_new = x_pgd.detach() + step_size * x_grad.sign()
        x_pgd = _authors_projection(x_new, x.detach(), epsilon).requires_grad_(True)
    return x_pgd.detach()


def baseline_sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Their ``adapt_tensor`` (train mode, one step)."""
    model.train()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def baseline_test(model: nn.Module, loader: DataLoader, device: torch.device, bookkeeping: bool = False) -> float:
    """Their ``test``: float32 batches of 100 from a DataLoader, no_grad; optionally their per-sample
    per-class counting (``.item()`` per sample) and per-sample losses."""
    model.eval()
    correct, total = 0, 0
    per_class_correct, per_class_total = [0] * 1000, [0] * 1000
    losses = []
    for inputs, labels in loader:
        with torch.no_grad():
            inputs, labels = inputs.to(device), labels.to(device)
            outputs = model(inputs)
            _, predicted = outputs.max(1)
            hit = predicted.eq(labels).cpu()
            if bookkeeping:
                losses.append(F.cross_entropy(outputs, labels, reduction="none").cpu())
        if bookkeeping:
            for j in range(len(labels)):
                lbl = labels[j]
                per_class_total[lbl] += 1
                per_class_correct[lbl] += int(hit[j].item())
        correct += hit.sum().item()
        total += len(labels)
    return 1.0 - correct / total


@torch.inference_mode()
def evaluate_unchunked(model: nn.Module, split: Split, batch_size: int) -> float:
    """``utils.train.evaluate`` before the CPU cap: one forward per ``batch_size`` samples, a sync per batch."""
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, len(split), batch_size):
        x, y = split.batch(torch.arange(i, min(i + batch_size, len(split))))
        wrong += (model(x).argmax(1) != y).sum().item()
    model.train(was_training)
    return wrong / len(split)


# --------------------------------------------------------------------------------------------- floors
class Primitives:
    """Bare forward/backward passes (no project code) on one model, for the floors."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = trainable_params(model)
        gen = torch.Generator().manual_seed(1)
        self.v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in self.params]

    def fwd_nograd(self, x):
        with torch.no_grad():
            return self.model(x)

    def fwd(self, x):
        return self.model(x)

    def fb(self, x, y):
        return torch.autograd.grad(F.cross_entropy(self.model(x), y), self.params)

    def step(self, x, y):
        x = x.detach().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(self.model(x), y), self.params, create_graph=True)
        obj = sum((a * b).sum() for a, b in zip(g, self.v))
        return torch.autograd.grad(obj, x)

    def second(self, x_t, y_t, x_v, y_v):
        g_t = torch.autograd.grad(F.cross_entropy(self.model(x_t), y_t), self.params, create_graph=True)
        g_v = torch.autograd.grad(F.cross_entropy(self.model(x_v), y_v), self.params, create_graph=True)
        c = sum((a * b).sum() for a, b in zip(g_t, g_v))
        return torch.autograd.grad(c, self.params)

    def xgrad(self, x, y):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(self.model(x), y), x)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
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
    p.add_argument("--device", default=None)
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
    return "-" if s is None else f"{1e3 * s:10.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    dataset = args.dataset or DEFAULT_DATASET[args.arch]
    info = DATASETS[dataset]
    K, bs, repeats = args.num_steps, args.batch_size, args.repeats
    b_repeats = args.baseline_repeats or repeats
    shape = (info.in_channels, info.image_size, info.image_size)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    timer = Timer(device, args.warmup)

    torch.manual_seed(args.seed)
    spec = model_spec(args.arch, info, width=args.width)
    model = build_model(spec).to(device).to(memory_format=fmt)
    # DSC's memorized model: a copy with perturbed weights. An exact copy gives MD = 0 <= tau = 0 and DSC
    # would stop before its first step; it must differ for tau = 0 to force all steps (the worst case).
    memorized = copy.deepcopy(model)
    with torch.no_grad():
        for p in memorized.parameters():
            p.mul_(1.0 + 0.1 * torch.randn_like(p))
    memorized.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    learner = Learner(model, optimizer, mode="train",
                      extras={"at": dict(AT_CFG), "dsc": dict(DSC_CFG), "memorized": memorized})

    gen = torch.Generator().manual_seed(args.seed)

    def batch(n):
        x = torch.rand((n, *shape), generator=gen).to(device).contiguous(memory_format=fmt)
        return x, torch.randint(0, info.num_classes, (n,), generator=gen).to(device)

    x_tri, y_tri = batch(bs)
    x_val, y_val = batch(args.val_size)
    x, y = batch(bs)
    test = Split(torch.randint(0, 256, (args.test_size, *shape), generator=gen, dtype=torch.uint8),
                 torch.randint(0, info.num_classes, (args.test_size,), generator=gen))
    test = Split(test.x.to(device).contiguous(memory_format=fmt), test.y.to(device))
    # the baseline's test data: float32 on the CPU, through a DataLoader (as their test loader)
    base_loader = DataLoader(TensorDataset(test.x.cpu().contiguous().float().div(255), test.y.cpu()),
                             batch_size=100, shuffle=False)

    model.eval()
    x_tri_adv = craft_poisoned_trigger(model, x_tri, y_tri, x_val, y_val, epsilon=EPS, num_steps=K)
    snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))

    def restore(mode: str = "eval"):
        model.load_state_dict(snapshot[0])
        optimizer.load_state_dict(snapshot[1])
        model.train(mode == "train")

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "arch": args.arch, "width": args.width or ("64" if args.arch == "resnet18" else "16"),
           "dataset_shape": f"{dataset} {'x'.join(map(str, shape))}", "batch_size": bs, "val_size": args.val_size,
           "test_size": args.test_size, "eval_batch_size": args.eval_batch_size, "K": K,
           "channels_last": args.channels_last, "repeats": repeats, "baseline_repeats": b_repeats,
           "warmup": args.warmup, "params": sum(p.numel() for p in model.parameters()),
           "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print("# bench_online: environment")
    for k, v in env.items():
        print(f"  {k:16s} {v}")
    load_warning = None
    if device.type == "cpu" and env["loadavg_1min_at_start"] is not None and env["cpu_count"]:
        free = env["cpu_count"] - env["loadavg_1min_at_start"]
        if free < env["threads"] - 0.5:
            load_warning = (f"WARNING: load average {env['loadavg_1min_at_start']:.1f} on {env['cpu_count']} CPUs "
                            f"leaves fewer free cores than threads used ({env['threads']}): other work shares "
                            f"the CPU, timings are noisy (busy OpenMP threads can slow small ops manyfold; "
                            f"--threads 1 is steadier)")
            print(load_warning)
    sys.stdout.flush()

    res: dict[str, dict] = {}

    outputs: dict[str, object] = {}
    res_fns: dict[str, Callable[[], object]] = {}
    memory: dict[str, dict] = {}

    def save_partial():
        """Write what is measured so far (a run killed half-way, e.g. out of memory, leaves its figures)."""
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"partial": True, "env": env, "timings": res, "memory": memory}, f, indent=2)

    def run(name, fn, setup=restore, reps=repeats, memory_key=None):
        """Time ``fn``; with ``memory_key``, its first (warm-up) run also records the peak memory."""
        res_fns[name] = fn
        first = None
        if memory_key is not None:
            def first(f):
                box = []
                memory[memory_key] = peak_memory(lambda: box.append(f()), device)
                return box[0]
        res[name], outputs[name] = timer(fn, reps, setup, first)
        print(f"  {name:40s} {fmt_ms(res[name]['median_s'])} ms", flush=True)
        save_partial()

    def run_group(items, reps):
        """Time (name, fn) pairs in alternation, round after round."""
        for (name, _), (fig, out) in zip(items, timer.interleaved([fn for _, fn in items], reps, restore)):
            res[name], outputs[name] = fig, out
            print(f"  {name:40s} {fmt_ms(fig['median_s'])} ms", flush=True)
        save_partial()

    prim = Primitives(model)
    # the floor of an evaluation: forward passes at the batch size evaluate really uses
    model.eval()
    eval_chunk = (cpu_eval_chunk(model, test.batch(torch.arange(1))[0], args.eval_batch_size)
                  if device.type == "cpu" else args.eval_batch_size)
    env["eval_chunk"] = eval_chunk
    eval_b = min(eval_chunk, args.test_size)
    n_eval_batches = args.test_size / eval_b
    x_eval = test.batch(torch.arange(eval_b))[0].contiguous(memory_format=fmt)

    print("\n# timing (medians; progress)")
    # building blocks
    run("forward (no_grad)", lambda: prim.fwd_nograd(x))
    run("forward (autograd on)", lambda: prim.fwd(x))
    run("forward+backward", lambda: prim.fb(x, y))
    run("param_grads", lambda: param_grads(model, x, y))
    # floor primitives
    run("floor: fb(val)", lambda: prim.fb(x_val, y_val))
    run("floor: step(batch)", lambda: prim.step(x, y))
    run("floor: second(trigger, val)", lambda: prim.second(x_tri_adv, y_tri, x_val, y_val))
    run("floor: xgrad(batch)", lambda: prim.xgrad(x, y))
    run("floor: fb train mode(batch)", lambda: prim.fb(x, y), setup=lambda: restore("train"))
    run("floor: fwd_ng(eval batch)", lambda: prim.fwd_nograd(x_eval))
    # ours
    run("trigger crafting", lambda: craft_poisoned_trigger(model, x_tri, y_tri, x_val, y_val, epsilon=EPS,
                                                           num_steps=K))
    run("accumulative crafting", lambda: craft_accumulative_poison(model, x, y, x_tri_adv, y_tri, x_val, y_val,
                                                                   epsilon=EPS, num_steps=K, objective="reg"))
    run("ST step", lambda: standard_training(learner, x, y, 0))
    run("AT step", lambda: adversarial_training(learner, x, y, 0))
    dsc_info = {}
    run("DSC step (tau=0)", lambda: dsc_info.update(discrepancy_aware_correction(learner, x, y, 0)))
    if dsc_info.get("dsc_steps") != DSC_CFG["max_steps"]:
        print(f"WARNING: DSC took {dsc_info.get('dsc_steps')} steps, not {DSC_CFG['max_steps']}")
    run("full evaluation", lambda: evaluate(model, test, args.eval_batch_size))

    def online_ours():
        model.eval()
        x_adv = craft_accumulative_poison(model, x, y, x_tri_adv, y_tri, x_val, y_val, epsilon=EPS,
                                          num_steps=K, objective="reg")
        standard_training(learner, x_adv, y, 0)
        return evaluate(model, test, args.eval_batch_size)

    run("online step (ours)", online_ours, memory_key="ours")

    # baseline
    identity = {}
    if not args.skip_baseline:
        def online_base(recompute: bool):
            def fn():
                x_adv = baseline_craft_accu(model, x_tri_adv, y_tri, x, y, x_val, y_val, epsilon=EPS,
                                            num_steps=K, recompute=recompute)
                baseline_sgd_step(model, optimizer, x_adv, y)
                return baseline_test(model, base_loader, device)
            return fn

        # the peak memory of the baseline's online step, from one untimed run
        restore()
        box = []
        memory["baseline"] = peak_memory(lambda: box.append(online_base(False)()), device)
        # ours against the baselines, timed in alternation (so that changing background load hits all alike)
        print("# ours vs baseline, timed in alternation")
        run_group([("ours: accumulative crafting", res_fns["accumulative crafting"]),
                   ("baseline: accumulative crafting", lambda: baseline_craft_accu(
                       model, x_tri_adv, y_tri, x, y, x_val, y_val, epsilon=EPS, num_steps=K)),
                   ("baseline: accu. crafting, recompute/step", lambda: baseline_craft_accu(
                       model, x_tri_adv, y_tri, x, y, x_val, y_val, epsilon=EPS, num_steps=K, recompute=True))],
                  b_repeats)
        evals = [("ours: full evaluation", res_fns["full evaluation"]),
                 ("baseline: full evaluation", lambda: baseline_test(model, base_loader, device)),
                 ("baseline: full eval + per-sample bookkeeping",
                  lambda: baseline_test(model, base_loader, device, bookkeeping=True))]
        if eval_chunk < args.eval_batch_size:
            evals.append((f"evaluate before the CPU cap (bs {args.eval_batch_size})",
                          lambda: evaluate_unchunked(model, test, args.eval_batch_size)))
        run_group(evals, b_repeats)
        run_group([("ours: online step", online_ours),
                   ("baseline: online step", online_base(False)),
                   ("baseline: online step, recompute/step", online_base(True))], b_repeats)

        # identical poisons: the last timed runs, all from the same restored model in eval mode
        ours = outputs["accumulative crafting"]
        for name, key in (("authors", "baseline: accumulative crafting"),
                          ("recompute", "baseline: accu. crafting, recompute/step")):
            theirs = outputs[key]
            diff = (ours - theirs).abs()
            identity[name] = {"equal": bool(torch.equal(ours, theirs)), "max_abs_diff": diff.max().item(),
                              "frac_differing": (diff > 0).float().mean().item()}

    restore()

    # format comparison
    fmt_cmp = {}
    if args.channels_last:
        print("\n# memory-format comparison: contiguous vs channels_last, same weights, timed in alternation")
        m_c = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
        x_c, xv_c, xt_c = (t.contiguous() for t in (x, x_val, x_tri_adv))
        test_c = Split(test.x.contiguous(), test.y)
        prim_c = Primitives(m_c)
        pairs = {
            "forward (no_grad)": (lambda: prim_c.fwd_nograd(x_c), lambda: prim.fwd_nograd(x)),
            "forward+backward": (lambda: prim_c.fb(x_c, y), lambda: prim.fb(x, y)),
            "accumulative crafting": (
                lambda: craft_accumulative_poison(m_c, x_c, y, xt_c, y_tri, xv_c, y_val, epsilon=EPS, num_steps=K),
                lambda: craft_accumulative_poison(model, x, y, x_tri_adv, y_tri, x_val, y_val, epsilon=EPS,
                                                  num_steps=K)),
            "full evaluation": (lambda: evaluate(m_c, test_c, args.eval_batch_size),
                                lambda: evaluate(model, test, args.eval_batch_size)),
        }
        for name, (f_c, f_cl) in pairs.items():
            (r_c, _), (r_cl, _) = timer.interleaved([f_c, f_cl], repeats)
            t_c, t_cl = r_c["median_s"], r_cl["median_s"]
            fmt_cmp[name] = {"contiguous_s": t_c, "channels_last_s": t_cl}
            print(f"  {name:40s} {fmt_ms(t_c)} / {fmt_ms(t_cl)} ms", flush=True)

    # ---------------------------------------------------------------------------------- report
    med = {k: v["median_s"] for k, v in res.items()}
    floors = {
        "trigger crafting": med["floor: fb(val)"] + K * med["floor: step(batch)"],
        "accumulative crafting": med["floor: second(trigger, val)"] + med["forward+backward"]
        + K * med["floor: step(batch)"],
        "ST step": med["floor: fb train mode(batch)"],
        "AT step": AT_CFG["steps"] * med["floor: xgrad(batch)"] + med["floor: fb train mode(batch)"],
        "DSC step (tau=0)": DSC_CFG["max_steps"] * (med["floor: xgrad(batch)"] + med["forward (no_grad)"])
        + med["floor: fb train mode(batch)"],
        "full evaluation": n_eval_batches * med["floor: fwd_ng(eval batch)"],
    }
    floors["online step (ours)"] = (floors["accumulative crafting"] + floors["ST step"]
                                    + floors["full evaluation"])
    floor_formula = {
        "trigger crafting": f"fb(val) + {K}*step(batch)",
        "accumulative crafting": f"second + fb(batch) + {K}*step(batch)",
        "ST step": "fb_train(batch)",
        "AT step": f"{AT_CFG['steps']}*xgrad + fb_train",
        "DSC step (tau=0)": f"{DSC_CFG['max_steps']}*(xgrad + fwd_ng) + fb_train",
        "full evaluation": f"{n_eval_batches:.4g}*fwd_ng({eval_b})",
        "online step (ours)": "sum of the three floors",
    }
    print("\n" + "=" * 100)
    print(f"bench_online  arch={args.arch} width={env['width']} shape={env['dataset_shape']} batch={bs} "
          f"val={args.val_size} test={args.test_size} (evaluate's batch: {eval_chunk}) K={K}")
    print(f"torch {env['torch']}  device={env['device']} ({env['device_name']})  threads={env['threads']}  "
          f"channels_last={args.channels_last}  repeats={repeats} (baseline {b_repeats}), medians")
    if env["loadavg_1min_at_start"] is not None:
        print(f"load average (1 min): {env['loadavg_1min_at_start']:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    if load_warning:
        print(load_warning)
    print("-" * 100)
    print(f"{'operation':44s} {'median ms':>10s} {'floor ms':>10s} {'x floor':>8s}  floor =")
    rows = ["forward (no_grad)", "forward (autograd on)", "forward+backward", "param_grads",
            "trigger crafting", "accumulative crafting", "ST step", "AT step", "DSC step (tau=0)",
            "full evaluation", "online step (ours)"]
    for r in rows:
        f = floors.get(r)
        ratio = f"{med[r] / f:8.2f}" if f else " " * 8
        floor_s = fmt_ms(f) if f else " " * 10
        print(f"{r:44s} {fmt_ms(med[r])} {floor_s} {ratio}  {floor_formula.get(r, '')}")
    print("-" * 100)
    print("floor primitives (bare torch.autograd passes, same model and batch sizes)")
    for r in [k for k in med if k.startswith("floor: ")]:
        print(f"  {r[7:]:42s} {fmt_ms(med[r])}")
    speedups, bound = {}, {}
    if not args.skip_baseline:
        print("-" * 100)
        print(f"{'baseline (authors structure), in alternation':44s} {'base ms':>10s} {'ours ms':>10s} "
              f"{'speed-up':>8s} {'at floor':>8s}")
        # (label, baseline row, our row timed alongside it, our floor)
        pairs = [("accumulative crafting", "baseline: accumulative crafting", "ours: accumulative crafting",
                  "accumulative crafting"),
                 ("accu. crafting (recompute in each step)", "baseline: accu. crafting, recompute/step",
                  "ours: accumulative crafting", "accumulative crafting"),
                 ("full evaluation (DataLoader, bs 100)", "baseline: full evaluation", "ours: full evaluation",
                  "full evaluation"),
                 ("  + their per-sample bookkeeping", "baseline: full eval + per-sample bookkeeping",
                  "ours: full evaluation", "full evaluation"),
                 ("online step", "baseline: online step", "ours: online step", "online step (ours)"),
                 ("online step (recompute in each step)", "baseline: online step, recompute/step",
                  "ours: online step", "online step (ours)")]
        pre = f"evaluate before the CPU cap (bs {args.eval_batch_size})"
        if pre in med:
            pairs.insert(4, ("utils.train.evaluate before the CPU cap", pre, "ours: full evaluation",
                             "full evaluation"))
        for label, b, o, fl in pairs:
            # the median of the per-round ratios: robust to load that changes from round to round
            speedups[label] = statistics.median(tb / to for tb, to in zip(res[b]["times_s"], res[o]["times_s"]))
            bound[label] = med[b] / floors[fl]
            print(f"{label:44s} {fmt_ms(med[b])} {fmt_ms(med[o])} {speedups[label]:8.2f} {bound[label]:8.2f}")
        print("  (speed-up: median over rounds of baseline/ours in the same round; at floor: baseline / our floor,\n"
              "   the speed-up an exact implementation running at its floor would reach)")
        print("identical poisons (ours vs baseline, same model, eval mode):")
        for name, d in identity.items():
            print(f"  {name:10s} equal={d['equal']}  max|diff|={d['max_abs_diff']:.3g}  "
                  f"differing pixels={100 * d['frac_differing']:.4f}%")
    print("-" * 100)
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
        print("-" * 100)
        print(f"{'channels_last vs contiguous':44s} {'contig ms':>10s} {'ch.last ms':>10s} {'speed-up':>8s}")
        for name, d in fmt_cmp.items():
            print(f"{name:44s} {fmt_ms(d['contiguous_s'])} {fmt_ms(d['channels_last_s'])} "
                  f"{d['contiguous_s'] / d['channels_last_s']:8.2f}")
    print("=" * 100, flush=True)

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"partial": False, "env": env, "timings": res, "floors_s": floors, "floor_formula": floor_formula,
                       "ratio_to_floor": {k: med[k] / v for k, v in floors.items()}, "speedups": speedups,
                       "speedup_at_floor": bound,
                       "identity": identity, "memory": memory, "channels_last_comparison": fmt_cmp,
                       "dsc_steps": dsc_info.get("dsc_steps"), "load_warning": load_warning}, f, indent=2)
    bad = [n for n, d in identity.items() if not d["equal"]]
    if bad:
        print(f"FAIL: the baseline ({', '.join(bad)}) crafted different poisons than ours", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
