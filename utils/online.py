"""The online phase (SPEC "Phase 2" and "The attack", step 3): stream, accumulative phase, trigger."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm import tqdm

from attack_generator import craft_accumulative_poison, craft_poisoned_trigger, trigger_alignment
from utils.data import DatasetInfo, Split, augment_batch
from utils.defenses import Defender, Learner
from utils.discrepancy import memorization_discrepancy
from utils.grads import project_linf
from utils.metrics import auroc
from utils.errors import UserError
from utils.results import append_jsonl, write_json
from utils.train import evaluate


class Stream:
    """The trigger's base batch and the arriving batches, drawn from the training split.

    Default: a real stream of distinct batches (batch 0 of the order is the trigger, batches 1, 2, ...
    arrive). ``reuse_first``: the authors' quirk, every arriving batch is batch 0 again, re-augmented.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, reuse_first: bool,
                 augment: DatasetInfo | None, generator: torch.Generator):
        if batch_size > len(split) // 2 and not reuse_first:
            raise UserError(f"--batch_size {batch_size} leaves fewer than two batches in the training data "
                            f"({len(split)} samples); use a smaller --batch_size")
        if batch_size > len(split):
            raise UserError(f"--batch_size {batch_size} is larger than the training data ({len(split)} samples)")
        self.split, self.batch_size, self.reuse_first = split, batch_size, reuse_first
        self.augment, self.generator = augment, generator
        self.order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
        self.num_batches = len(split) // batch_size

    def indices(self, k: int) -> torch.Tensor:
        """Sample indices of batch k of the order (k = 0: the trigger's base batch)."""
        return self.order[k * self.batch_size:(k + 1) * self.batch_size]

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.split.batch(self.indices(k))
        if self.augment is not None:
            x = augment_batch(x, self.augment, self.generator)
        return x, y

    def trigger_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(0)

    def batch_index(self, t: int) -> int:
        """Which batch of the order arrives at step t (distinct batches wrap round after one pass)."""
        return 0 if self.reuse_first else 1 + t % (self.num_batches - 1)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        t = 0
        while True:
            k = self.batch_index(t)
            yield (k, *self.get(k))
            t += 1


@dataclass
class OnlineConfig:
    """The knobs of the online phase (flags of online_accu_train.py)."""

    steps: int = 1  # --epochs: length of the accumulative phase
    threshold: float = 0.18  # stop once the test error exceeds this
    craft_mode: str = "eval"  # --mode
    epsilon: float = 0.2
    num_steps: int = 2
    gamma: float = 1.0
    objective: str = "reg"
    round_sign: bool = False
    poison_scale: float = 1.0
    use_advtrigger: bool = True
    use_online_advtrigger: bool = False
    no_poison: bool = False
    niter: int = 1
    eval_subset: int = 0  # evaluate this many fixed test samples during the phase (0: the full set)
    log_alignment: bool = True
    eval_batch_size: int = 1000


def _poison_mask(n: int, scale: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Positions poisoned in every batch: the first ⌊p·n⌋ of a seeded permutation (the authors' choice)."""
    keep_clean = torch.randperm(n, generator=generator)[int(scale * n):]
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep_clean] = False
    return mask.to(device)


def _auroc_or_none(pos: list[torch.Tensor], neg: list[torch.Tensor]) -> float | None:
    if not pos or not neg:
        return None
    p, n = torch.cat(pos), torch.cat(neg)
    return auroc(p.numpy(), n.numpy()) if len(p) and len(n) else None


def _mix(poisoned: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (clean.dim() - 1))), poisoned, clean)


def sign_noise(x: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """x + ε·(random ±1 per pixel), in [0, 1]: the equal-size-perturbation control for MD."""
    signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype).mul_(2).sub_(1)
    return project_linf(x + epsilon * signs, x, epsilon)


def _check_finite(model: torch.nn.Module, err: float, where: str) -> None:
    """A diverged model is an error, never a result."""
    if not math.isfinite(err) or any(not torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the model's weights became NaN/inf {where}; lower --lr or use --clip_gradnorm")


def calibrate_dsc(model: torch.nn.Module, memorized: torch.nn.Module, split: Split, batch_size: int,
                  quantile: float, batches: int, generator: torch.Generator) -> dict:
    """τ0 = the given quantile of the mean MD of clean held-out batches (our extension to SPEC "DSC")."""
    idx = torch.randperm(len(split), generator=generator)[:batches * batch_size].view(batches, -1)
    means = torch.stack([memorization_discrepancy(model, memorized, split.batch(i)[0]).mean() for i in idx])
    return {"tau0": torch.quantile(means.cpu(), quantile).item(), "clean_batch_md": means.tolist()}


def run_online_phase(cfg: OnlineConfig, learner: Learner, defender: Defender, stream: Stream, test: Split,
                     x_val: torch.Tensor, y_val: torch.Tensor, out: str, generator: torch.Generator) -> dict:
    """Run the accumulative phase and the trigger; write steps.jsonl and summary.json in ``out``."""
    model = learner.model
    started = time.time()
    eval_split = test
    if cfg.eval_subset:
        sub = torch.randperm(len(test), generator=generator)[:cfg.eval_subset]
        eval_split = Split(test.x[sub.to(test.x.device)], test.y[sub.to(test.y.device)])
    err_burn_in = evaluate(model, test, cfg.eval_batch_size)

    def set_craft_mode() -> None:
        model.train(cfg.craft_mode == "train")

    x_tri_clean, y_tri = stream.trigger_batch()
    mask = _poison_mask(len(y_tri), cfg.poison_scale, generator, x_tri_clean.device)

    def make_trigger() -> torch.Tensor:
        if not cfg.use_advtrigger:
            return x_tri_clean
        set_craft_mode()
        adv = craft_poisoned_trigger(model, x_tri_clean, y_tri, x_val, y_val, epsilon=cfg.epsilon,
                                     num_steps=cfg.num_steps, round_sign=cfg.round_sign)
        return _mix(adv, x_tri_clean, mask)

    x_tri = make_trigger()
    set_craft_mode()
    align0 = trigger_alignment(model, x_tri, y_tri, x_val, y_val) if cfg.log_alignment else None
    steps_path = os.path.join(out, "steps.jsonl")
    md_path = os.path.join(out, "md.jsonl")
    memorized = learner.extras.get("memorized")
    md_all: dict[str, list[torch.Tensor]] = {"poison": [], "clean": [], "noise": []}
    dsc_steps: list[float] = []
    noise_gen = torch.Generator().manual_seed(generator.initial_seed() + 1)  # the stream's draws stay the same
    stop_reason, err, taken = "epochs", err_burn_in, 0
    bar = tqdm(total=cfg.steps, desc="online", dynamic_ncols=True, disable=None)
    stream_iter = iter(stream)
    for t in range(cfg.steps):
        k, x, y = next(stream_iter)
        t0 = time.time()
        if cfg.no_poison:
            x_in = x
        else:
            set_craft_mode()
            x_adv = craft_accumulative_poison(model, x, y, x_tri, y_tri, x_val, y_val, epsilon=cfg.epsilon,
                                              num_steps=cfg.num_steps, gamma=cfg.gamma, objective=cfg.objective,
                                              round_sign=cfg.round_sign)
            x_in = _mix(x_adv, x, mask)
        t1 = time.time()
        md_means = {}
        if memorized is not None:
            noisy = _mix(sign_noise(x, cfg.epsilon, noise_gen), x, mask)
            md = {"poison": memorization_discrepancy(model, memorized, x_in)[mask],
                  "clean": memorization_discrepancy(model, memorized, x),
                  "noise": memorization_discrepancy(model, memorized, noisy)[mask]}
            for key, v in md.items():
                md_all[key].append(v.cpu())
                md_means[f"md_{key}"] = v.mean().item()
            append_jsonl(md_path, {"t": t, **{key: v.tolist() for key, v in md.items()}})
        t1b = time.time()
        info = defender(learner, x_in, y, t, 1)
        if "dsc_steps" in info:
            dsc_steps.append(info["dsc_steps"])
        t2 = time.time()
        err = evaluate(model, eval_split, cfg.eval_batch_size)
        t3 = time.time()
        set_craft_mode()
        align = trigger_alignment(model, x_tri, y_tri, x_val, y_val) if cfg.log_alignment else None
        taken = t + 1
        _check_finite(model, err, f"at online step {t}")
        append_jsonl(steps_path, {"t": t, "batch": k, "test_err": err, "alignment": align,
                                  "craft_s": t1 - t0, "md_s": t1b - t1, "defend_s": t2 - t1b, "eval_s": t3 - t2,
                                  **md_means, **info})
        bar.update(1)
        bar.set_postfix(err=f"{err:.4f}")
        if err > cfg.threshold:
            stop_reason = "threshold"
            break
        if cfg.use_online_advtrigger:
            x_tri = make_trigger()
    bar.close()
    err_before = evaluate(model, test, cfg.eval_batch_size)
    set_craft_mode()
    align_end = trigger_alignment(model, x_tri, y_tri, x_val, y_val) if cfg.log_alignment else None
    t0 = time.time()
    info = defender(learner, x_tri, y_tri, taken, cfg.niter)
    trigger_s = time.time() - t0
    err_after = evaluate(model, test, cfg.eval_batch_size)
    _check_finite(model, err_after, "at the trigger step (summary.json not written)")
    summary = {
        "err_burn_in": err_burn_in,
        "err_end_accumulative": err_before,
        "err_before_trigger": err_before,
        "err_after_trigger": err_after,
        "delta": err_after - err_before,
        "delta_vs_burn_in": err_after - err_burn_in,
        "steps": taken,
        "stop_reason": stop_reason,
        "threshold": cfg.threshold,
        "alignment_start": align0,
        "alignment_end": align_end,
        "md_measured": memorized is not None,
        "md_auroc_poison_vs_clean": _auroc_or_none(md_all["poison"], md_all["clean"]),
        "md_auroc_poison_vs_noise": _auroc_or_none(md_all["poison"], md_all["noise"]),
        "md_mean": {k: (torch.cat(v).mean().item() if v else None) for k, v in md_all.items()},
        "dsc_mean_steps": sum(dsc_steps) / len(dsc_steps) if dsc_steps else None,
        "trigger_step_s": trigger_s,
        "trigger_info": info,
        "total_seconds": time.time() - started,
    }
    write_json(os.path.join(out, "summary.json"), summary)
    return summary
