"""Timing of the online phase's costs: medians of wall-clock times, peak memory, and the floors (bare
``torch.autograd`` passes on the same model and batch sizes, no project code) each cost is compared with.

Floor primitives (medians keyed by the names below):

* ``fb(n)``: forward + backward to the parameters on n samples;
* ``step(n)``: forward + backward(create_graph) to the parameters + double backward to the input;
* ``second``: forward + backward(create_graph) on the trigger and on the validation batch, then one double
  backward of their alignment to the parameters (the second-order term s);
* ``xgrad(n)``: forward + backward to the input only (one PGD / DSC step); ``fwd_ng(n)``: forward, no grad.
"""
from __future__ import annotations

import copy
import ctypes
import resource
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attack.craft import craft_accumulative_poison
from utils.core.data import Split
from utils.core.grads import eval_mode, trainable_params
from utils.core.train import evaluate

# the names of the primitives' medians (also the benchmark's rows)
FWD_NG = "forward (no_grad)"
FB = "forward+backward"
FB_VAL = "floor: fb(val)"
STEP = "floor: step(batch)"
SECOND = "floor: second(trigger, val)"
XGRAD = "floor: xgrad(batch)"
FB_TRAIN = "floor: fb train mode(batch)"
FWD_NG_EVAL = "floor: fwd_ng(eval batch)"
ONLINE = "online step (ours)"


class Timer:
    """Medians of wall-clock times (perf_counter, CUDA synchronised) after ``warmup`` untimed runs."""

    def __init__(self, device: torch.device, warmup: int = 1):
        self.device, self.warmup = torch.device(device), warmup

    def sync(self) -> None:
        """Wait for the device's queued work (CUDA only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None,
                 first: Callable[[Callable[[], object]], object] | None = None) -> tuple[dict, object]:
        """(figures, the last run's return value); ``first(fn)`` replaces the first (warm-up) run."""
        (fig, out), = self.interleaved([fn], repeats, setup, [first])
        return fig, out

    def interleaved(self, fns: list[Callable[[], object]], repeats: int, setup: Callable[[], None] | None = None,
                    firsts: list | None = None) -> list[tuple[dict, object]]:
        """Functions timed in alternation, round after round: (figures, last return value) per function."""
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


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status (VmHWM, VmRSS) in KiB, None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS before a step counts live data only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak CPU RSS (and CUDA allocation) while ``fn`` runs once."""
    _malloc_trim()
    per_step = _reset_hwm() and _status_kib("VmHWM") is not None
    rss_before = _status_kib("VmRSS")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    fn()
    out: dict = {}
    if cuda:
        torch.cuda.synchronize(device)
        out["cuda_max_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["cuda_allocated_before_MiB"] = cuda_before / 2 ** 20
    if per_step:
        out["cpu_peak_rss_MiB"] = _status_kib("VmHWM") / 1024
        out["cpu_rss_before_MiB"] = rss_before / 1024 if rss_before is not None else None
        out["cpu_peak_kind"] = "VmHWM, reset after malloc_trim before the step"
    else:
        out["cpu_peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["cpu_peak_kind"] = "ru_maxrss (process lifetime)"
    return out


class Primitives:
    """Bare forward/backward passes (no project code) on one model, for the floors."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = trainable_params(model)
        gen = torch.Generator().manual_seed(1)
        self.v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in self.params]

    def fwd_nograd(self, x: torch.Tensor) -> torch.Tensor:
        """fwd_ng(n): forward, no grad."""
        with torch.no_grad():
            return self.model(x)

    def fwd(self, x: torch.Tensor) -> torch.Tensor:
        """Forward with autograd on."""
        return self.model(x)

    def fb(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """fb(n): forward + backward to the parameters."""
        return torch.autograd.grad(F.cross_entropy(self.model(x), y), self.params)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """step(n): forward + backward(create_graph) to the parameters + double backward to the input."""
        x = x.detach().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(self.model(x), y), self.params, create_graph=True)
        obj = sum((a * b).sum() for a, b in zip(g, self.v))
        return torch.autograd.grad(obj, x)

    def second(self, x_t: torch.Tensor, y_t: torch.Tensor, x_v: torch.Tensor,
               y_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """second: two backward(create_graph) passes, then one double backward of their product."""
        g_t = torch.autograd.grad(F.cross_entropy(self.model(x_t), y_t), self.params, create_graph=True)
        g_v = torch.autograd.grad(F.cross_entropy(self.model(x_v), y_v), self.params, create_graph=True)
        c = sum((a * b).sum() for a, b in zip(g_t, g_v))
        return torch.autograd.grad(c, self.params)

    def xgrad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """xgrad(n): forward + backward to the input only."""
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(self.model(x), y), x)


# the short names of the primitives in the floors' formulas
SHORT = {FB_VAL: "fb(val)", STEP: "step(batch)", SECOND: "second", FB: "fb(batch)", FB_TRAIN: "fb_train(batch)",
         XGRAD: "xgrad(batch)", FWD_NG: "fwd_ng(batch)", FWD_NG_EVAL: "fwd_ng(eval batch)"}


def floor_terms(K: int, at_steps: int = 10, dsc_steps: int = 10,
                n_eval_batches: float = 1.0) -> dict[str, list[tuple[float, str]]]:
    """Each cost's floor as (count, primitive) terms: the one definition of the floors (K crafting steps, AT's PGD
    steps, DSC's correction steps, the evaluation's batches)."""
    return {"trigger crafting": [(1, FB_VAL), (K, STEP)],
            "accumulative crafting": [(1, SECOND), (1, FB), (K, STEP)],
            "ST step": [(1, FB_TRAIN)],
            "AT step": [(at_steps, XGRAD), (1, FB_TRAIN)],
            "DSC step (tau=0)": [(dsc_steps, XGRAD), (dsc_steps, FWD_NG), (1, FB_TRAIN)],
            "full evaluation": [(n_eval_batches, FWD_NG_EVAL)]}


ONLINE_PARTS = ("accumulative crafting", "ST step", "full evaluation")  # the online step's floor: their sum


def floors(medians: dict[str, float], K: int, at_steps: int = 10, dsc_steps: int = 10,
           n_eval_batches: float = 1.0) -> dict[str, float]:
    """Each cost's floor in seconds from the primitives' medians; costs whose primitives are missing are left out."""
    out = {name: sum(n * medians[p] for n, p in terms)
           for name, terms in floor_terms(K, at_steps, dsc_steps, n_eval_batches).items()
           if all(p in medians for _, p in terms)}
    if all(k in out for k in ONLINE_PARTS):
        out[ONLINE] = sum(out[k] for k in ONLINE_PARTS)
    return out


def floor_formulas(K: int, at_steps: int = 10, dsc_steps: int = 10, n_eval_batches: float = 1.0,
                   eval_batch: int | None = None) -> dict[str, str]:
    """The floors' formulas, as the report prints them (from ``floor_terms``)."""
    out = {name: " + ".join(f"{n:.4g}*{SHORT[p]}" if n != 1 else SHORT[p] for n, p in terms)
           for name, terms in floor_terms(K, at_steps, dsc_steps, n_eval_batches).items()}
    if eval_batch is not None:
        out["full evaluation"] += f" (eval batch {eval_batch})"
    out[ONLINE] = " + ".join(f"floor({k})" for k in ONLINE_PARTS)
    return out


def crafting_floor_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger: torch.Tensor,
                         y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                         epsilon: float = 0.2, num_steps: int = 2, repeats: int = 5,
                         device: torch.device | str | None = None, warmup: int = 1) -> dict:
    """Median time of accumulative crafting (objective reg, eval mode), its floor, their ratio; timed in alternation."""
    timer = Timer(torch.device(device) if device is not None else x.device, warmup)
    prim = Primitives(model)
    fns = {"accumulative crafting": lambda: craft_accumulative_poison(
               model, x, y, x_trigger, y_trigger, x_val, y_val, epsilon=epsilon, num_steps=num_steps,
               objective="reg"),
           FB: lambda: prim.fb(x, y),
           STEP: lambda: prim.step(x, y),
           SECOND: lambda: prim.second(x_trigger, y_trigger, x_val, y_val)}
    with eval_mode(model):
        figures = timer.interleaved(list(fns.values()), repeats)
    med = {name: fig["median_s"] for name, (fig, _) in zip(fns, figures)}
    floor = floors(med, num_steps)["accumulative crafting"]
    crafting = med.pop("accumulative crafting")
    return {"crafting_s": crafting, "floor_s": floor, "ratio": crafting / floor, "primitives_s": med,
            "floor_formula": floor_formulas(num_steps)["accumulative crafting"],
            "crafting_times_s": figures[0][0]["times_s"]}


def online_step_costs(model: nn.Module, train: Split, test: Split, *, batch_size: int, val_size: int,
                      eval_subset: int, epsilon: float, num_steps: int = 2, repeats: int = 3) -> dict:
    """Parameters, crafting's ratio to its floor, and the peak memory of one online step (accumulative crafting,
    an ST step on a copy of the model, an evaluation of ``eval_subset`` test samples) on real batches."""
    device = next(model.parameters()).device
    x, y = train.batch(torch.arange(batch_size, 2 * batch_size))
    x_tri, y_tri = train.batch(torch.arange(batch_size))
    x_val, y_val = test.batch(torch.arange(val_size))
    model = copy.deepcopy(model).eval()
    ratio = crafting_floor_ratio(model, x, y, x_tri, y_tri, x_val, y_val, epsilon=epsilon, num_steps=num_steps,
                                 repeats=repeats, device=device)
    learner = copy.deepcopy(model)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
    sub = Split(test.x[:eval_subset or len(test)], test.y[:eval_subset or len(test)])

    def step() -> float:
        x_adv = craft_accumulative_poison(learner.eval(), x, y, x_tri, y_tri, x_val, y_val, epsilon=epsilon,
                                          num_steps=num_steps)
        learner.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(learner(x_adv), y).backward()
        optimizer.step()
        return evaluate(learner, sub)

    memory = peak_memory(step, device)
    peak = memory.get("cuda_max_allocated_MiB", memory["cpu_peak_rss_MiB"])
    return {"params": sum(p.numel() for p in model.parameters()), "craft_floor_ratio": ratio["ratio"],
            "crafting_s": ratio["crafting_s"], "floor_s": ratio["floor_s"], "peak_mib": peak, "memory": memory}
