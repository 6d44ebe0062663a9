"""Every phase of the experiments against the machine's peak: time, GFLOP/s and % of the measured matmul peak.

The peak is measured first: the median GFLOP/s of a 2,048² float32 matrix product (2·n³ FLOPs) at the benchmark's
threads. Then each phase, on random inputs shaped like the dataset and a model of the given architecture, in
eval mode as the runs use it unless said:

* burn-in step: forward + backward + SGD step (momentum 0.9, weight decay 1e-4) on a training batch, train mode;
* evaluate: ``utils.core.train.evaluate`` of ``--eval_subset`` test images, as the online runs call it every step;
* trigger / accumulative crafting: ``craft_poisoned_trigger`` and ``craft_accumulative_poison`` (K steps,
  validation batch ``--val_size``), the attacker's work per run and per arriving batch;
* alignment: ``trigger_alignment``, measured after every online step;
* MD: ``memorization_discrepancies`` of one batch against the memorized model;
* each detector: one batch's ``batch_view`` (its forward passes) and its score, fitted on ``--fit`` clean samples;
* ST, AT (the authors': CE+KL descent, 10 steps) and DSC (τ = 0, so all 10 correction steps run) defender steps.

FLOPs are counted with torch's own formulas (``torch.utils.flop_counter``; ``CountFlops`` below: convolutions and
matrix products of the forward and every backward, the double backward of the crafting included; elementwise work is not counted, so GFLOP/s is
the rate of the arithmetic that the peak measures). Each phase is timed in alternation between the **variants**:
``before`` (contiguous weights, BatchNorm as its own layer in eval mode: the code before this benchmark) and
``after`` (channels_last weights, BatchNorm folded into the convolution in eval mode: ``utils.core.models``), so
that load that comes and goes hits both alike; the last column is before / after.

    .venv/bin/python bench/bench_phases.py --arch cnn --cpu_kernels portable
    .venv/bin/python bench/bench_phases.py --arch resnet18 --width 16 --cpu_kernels native --repeats 3
    .venv/bin/python bench/bench_phases.py --device cuda --arch resnet18 --dataset cifar10     # on a GPU

CPU kernels are chosen once per process: run once per ``--cpu_kernels`` setting. Use a quiet machine (the load
average is printed at the start and the end).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import conv_flop_count, flop_registry

import utils.core.models as models
from utils.attack.craft import craft_accumulative_poison, craft_poisoned_trigger, trigger_alignment
from utils.core.data import DATASETS, Split
from utils.core.discrepancy import memorization_discrepancies
from utils.core.train import Learner, evaluate, get_device, set_threads, use_cpu_kernels
from utils.defense.config import ATConfig, DSCConfig
from utils.defense.defenders import AdversarialTraining, DiscrepancyAwareCorrection, StandardTraining
from utils.defense.dsc import DSCThreshold
from utils.detect.detectors import DETECTORS, batch_view, build_detectors, fit_reference
from utils.report.timing import Timer

VARIANTS = {"before": ("contiguous", False), "after": ("channels_last", True)}  # layout, BatchNorm folded


def plain_conv_norm(conv: torch.nn.Conv2d, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The "before" variant's path: the norm as its own layer, also in eval mode."""
    return norm(conv(x))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cnn", choices=models.ARCHS)
    p.add_argument("--width", type=int, default=0, help="0: the arch's default")
    p.add_argument("--dataset", default="fashion-mnist", choices=list(DATASETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu_kernels", default="portable", choices=("native", "portable"))
    p.add_argument("--batch_size", type=int, default=100, help="stream batch")
    p.add_argument("--burn_in_batch", type=int, default=256)
    p.add_argument("--val_size", type=int, default=500)
    p.add_argument("--eval_subset", type=int, default=2000)
    p.add_argument("--fit", type=int, default=2000, help="clean samples the fitted detectors are fitted on")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None, help="also write the report to this file")
    return p.parse_args(argv)


@contextlib.contextmanager
def variant(name: str):
    """Build and run models as the variant does (its layout; BatchNorm folded in eval mode or not)."""
    layout, folded = VARIANTS[name]
    saved_layout, saved_fold = models.memory_format(), models.conv_norm
    models.use_memory_format(layout)
    if not folded:
        models.conv_norm = plain_conv_norm
    try:
        yield
    finally:
        models.use_memory_format(saved_layout)
        models.conv_norm = saved_fold


def matmul_peak(device: torch.device, timer: Timer, n: int = 2048) -> float:
    """GFLOP/s of an n x n float32 matrix product (median)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    (fig, _), = timer.interleaved([lambda: a @ b], 10)
    return 2 * n ** 3 / fig["median_s"] / 1e9


class CountFlops(TorchDispatchMode):
    """Sums torch's own FLOP formulas (``torch.utils.flop_counter.flop_registry``: convolutions and matrix products,
    forward and backward) over every op dispatched; unlike ``FlopCounterMode`` it tracks no modules, so it also
    counts ``torch.autograd.grad`` to an input and double backward."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = flop_registry.get(packet)
        if packet is torch.ops.aten.conv2d:  # inference mode dispatches these undecomposed
            self.total += conv_flop_count(args[0].shape, args[1].shape, out.shape, transposed=False)
        elif packet is torch.ops.aten.linear:
            self.total += 2 * args[0].numel() * args[1].shape[0]
        elif formula is not None:
            shape = lambda t: t.shape if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.total += formula(*tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out))
        return out


def flops(fn: Callable[[], object]) -> int:
    """Convolution and matrix-product FLOPs of one call (forward and every backward)."""
    counter = CountFlops()
    with counter:
        fn()
    return counter.total


def phases(args: argparse.Namespace, device: torch.device, name: str) -> dict[str, Callable[[], object]]:
    """The phases of one variant, each a no-argument call on this variant's models and data."""
    info = DATASETS[args.dataset]
    with variant(name):
        torch.manual_seed(0)
        spec = models.model_spec(args.arch, info, width=args.width)
        model = models.build_model(spec).to(device)
        with torch.no_grad():  # running statistics that are not the initial ones
            model.train()(torch.rand(256, info.in_channels, info.image_size, info.image_size, device=device))
        model.eval()
        memorized, reference = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():
            for p in memorized.parameters():
                p.mul_(1 + 0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    shape = (info.in_channels, info.image_size, info.image_size)
    batch = lambda n: (torch.rand(n, *shape, generator=gen).to(device),  # noqa: E731
                       torch.randint(0, info.num_classes, (n,), generator=gen).to(device))
    x, y = batch(args.batch_size)
    xt, yt = batch(args.batch_size)
    xv, yv = batch(args.val_size)
    xb, yb = batch(args.burn_in_batch)
    test = Split((torch.rand(args.eval_subset, *shape, generator=gen) * 255).to(torch.uint8).to(device),
                 torch.randint(0, info.num_classes, (args.eval_subset,), generator=gen).to(device))
    train = Split((torch.rand(max(args.fit, 100), *shape, generator=gen) * 255).to(torch.uint8).to(device),
                  torch.randint(0, info.num_classes, (max(args.fit, 100),), generator=gen).to(device))
    learner_model = copy.deepcopy(model)
    opt = torch.optim.SGD(learner_model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    learner = Learner(learner_model, opt)
    burn_model = copy.deepcopy(model).train()
    burn_opt = torch.optim.SGD(burn_model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def burn_in_step() -> None:
        burn_opt.zero_grad(set_to_none=True)
        F.cross_entropy(burn_model(xb), yb).backward()
        burn_opt.step()

    fit = fit_reference(model, train, n_samples=args.fit, generator=torch.Generator(device=device).manual_seed(0))
    at = AdversarialTraining(ATConfig(epsilon=0.2, step_size=0.02, steps=10, descent_kl=True))
    dsc = DiscrepancyAwareCorrection(DSCConfig(tau0=0.0, kappa=0.0, epsilon=0.2, step_size=0.02, max_steps=10),
                                     memorized, DSCThreshold(tau0=0.0, kappa=0.0))
    out = {"burn-in step (train mode)": burn_in_step,
           "evaluate": lambda: evaluate(model, test, 1000),
           "trigger crafting": lambda: craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=0.05),
           "accumulative crafting": lambda: craft_accumulative_poison(model, x, y, xt, yt, xv, yv, epsilon=0.05),
           "alignment": lambda: trigger_alignment(model, xt, yt, xv, yv),
           "MD": lambda: memorization_discrepancies(model, [memorized], x)}
    for det in build_detectors(list(DETECTORS), fit):
        out[f"detector {det.name}"] = lambda det=det: det(batch_view(model, memorized, reference, x, y))
    out.update({"ST step": lambda: StandardTraining().step(learner, x, y, 0),
                "AT step (authors')": lambda: at.step(learner, x, y, 0),
                "DSC step (τ=0)": lambda: dsc.step(learner, x, y, 0)})
    return out


def measure(args: argparse.Namespace, device: torch.device) -> tuple[float, dict]:
    """The peak, then {phase: {variant: (median s, FLOPs)}}, the variants timed in alternation."""
    timer = Timer(device)
    peak = matmul_peak(device, timer)
    built = {v: phases(args, device, v) for v in args.variants}
    table: dict[str, dict[str, tuple[float, int]]] = {}
    for phase in built[args.variants[0]]:
        calls = [built[v][phase] for v in args.variants]
        figures = [_in_variant(v, lambda c=c: flops(c)) for v, c in zip(args.variants, calls)]
        wrapped = [lambda v=v, c=c: _in_variant(v, c) for v, c in zip(args.variants, calls)]
        timed = timer.interleaved(wrapped, args.repeats)
        table[phase] = {v: (fig["median_s"], f) for v, (fig, _), f in zip(args.variants, timed, figures)}
        print(f"  {phase:32s} " + "  ".join(f"{v} {table[phase][v][0] * 1e3:8.1f} ms" for v in args.variants),
              file=sys.stderr, flush=True)
    return peak, table


def _in_variant(name: str, call: Callable[[], object]) -> object:
    with variant(name):
        return call()


def report(args: argparse.Namespace, device: torch.device, peak: float, table: dict, load: tuple) -> str:
    """The printed table: per phase and variant, ms, GFLOP, GFLOP/s, % of peak; before / after."""
    lines = [f"bench_phases  arch={args.arch} width={args.width or 'default'} dataset={args.dataset} "
             f"device={device} threads={torch.get_num_threads()} cpu_kernels={args.cpu_kernels} "
             f"torch={torch.__version__}",
             f"batch {args.batch_size}, burn-in batch {args.burn_in_batch}, validation {args.val_size}, evaluate "
             f"{args.eval_subset}, detectors fitted on {args.fit}; medians of {args.repeats} after a warm-up",
             f"load average (1 min): {load[0]:.2f} at start, {load[1]:.2f} at end",
             f"peak: {peak:.1f} GFLOP/s (2048 x 2048 float32 matmul)", ""]
    head = f"{'phase':32s}" + "".join(f" | {v + ' ms':>10s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'% peak':>6s}"
                                      for v in args.variants)
    if len(args.variants) == 2:
        head += f" | {args.variants[0]}/{args.variants[1]}"
    lines += [head, "-" * len(head)]
    for phase, cols in table.items():
        row = f"{phase:32s}"
        for v in args.variants:
            s, f = cols[v]
            rate = f / s / 1e9
            row += f" | {s * 1e3:10.1f} {f / 1e9:7.3f} {rate:8.1f} {100 * rate / peak:5.0f}%"
        if len(args.variants) == 2:
            row += f" | {cols[args.variants[0]][0] / cols[args.variants[1]][0]:6.2f}x"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    use_cpu_kernels(args.cpu_kernels)
    device = get_device(args.device)
    load = [os.getloadavg()[0]]
    peak, table = measure(args, device)
    load.append(os.getloadavg()[0])
    text = report(args, device, peak, table, tuple(load))
    print(text)
    if args.out:
        from utils.io.results import write_text
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
