"""The online phase (SPEC "Phase 2", "The attack" step 3): ``run_online(config) -> summary``.

The loop is ``for t ...: record = run.step(t, batch)``; the attacker, the defender and the measurements are
objects built from the run's context, so a new defence or measurement is a new class, not an edit here.
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterator

import torch
from tqdm import tqdm

from utils.attack import craft_accumulative_poison, craft_poisoned_trigger, trigger_alignment
from utils.config import AttackConfig, OnlineConfig
from utils import defenses, measure
from utils.context import Arrival, RunContext, build_context, default_out
from utils.defenses import Defender
from utils.errors import UserError
from utils.measure import Measurement
from utils.results import FolderLock, append_jsonl, ensure_dir, write_json
from utils.stream import mix
from utils.train import environment, evaluate

RESULTS = ("steps.jsonl", "md.jsonl", "detectors.jsonl", "summary.json")  # a run's files besides config.json


class Attacker:
    """The attacker of SPEC "The attack": a poisoned trigger, and a poison for every arriving batch, crafted
    with the model in the mode --mode asks for; --poison_scale: only the positions in ``mask``."""

    def __init__(self, cfg: AttackConfig, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx
        self.x_trigger = ctx.x_trigger  # the trigger the learner will receive (crafted by ``craft_trigger``)

    def _craft_mode(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.train(self.cfg.craft_mode == "train")

    def craft_trigger(self, model: torch.nn.Module) -> None:
        """Step 1: the poisoned trigger, always from the clean trigger batch (also when re-crafted online)."""
        c = self.ctx
        if self.cfg.use_advtrigger:
            adv = craft_poisoned_trigger(self._craft_mode(model), c.x_trigger, c.y_trigger, c.x_val, c.y_val,
                                         epsilon=self.cfg.epsilon, num_steps=self.cfg.num_steps,
                                         round_sign=self.cfg.round_sign)
            self.x_trigger = mix(adv, c.x_trigger, c.mask)

    def poison(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Step 2: the batch the learner receives (clean under --no_poison)."""
        if not self.cfg.poison:
            return x
        c = self.ctx
        adv = craft_accumulative_poison(self._craft_mode(model), x, y, self.x_trigger, c.y_trigger, c.x_val, c.y_val,
                                        epsilon=self.cfg.epsilon, num_steps=self.cfg.num_steps, gamma=self.cfg.gamma,
                                        objective=self.cfg.objective, round_sign=self.cfg.round_sign,
                                        memorized=c.memorized, adaptive_md=self.cfg.adaptive_md)
        return mix(adv, x, c.mask)

    def alignment(self, model: torch.nn.Module) -> float:
        """A(g(x_T', y_T), g(x_v, y_v)) at the current θ, in the crafting mode."""
        c = self.ctx
        return trigger_alignment(self._craft_mode(model), self.x_trigger, c.y_trigger, c.x_val, c.y_val)


class Laps:
    """Contiguous timed segments of one step: ``lap(name)`` closes the segment ``<name>_s``; they sum to the total."""

    def __init__(self, device: torch.device):
        self.device, self.fields = device, {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.fields[f"{name}_s"] = self.fields.get(f"{name}_s", 0.0) + now - self.last
        self.last = now

    def total(self) -> dict:
        return {**self.fields, "step_s": sum(self.fields.values())}


def check_finite(model: torch.nn.Module, err: float, where: str) -> None:
    """A diverged model is an error, never a result."""
    if not math.isfinite(err) or any(not torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the model's weights became NaN/inf {where}; lower --lr or use --clip_gradnorm")


class OnlineRun:
    """One online run: the accumulative phase, then the trigger (SPEC "The attack", step 3)."""

    def __init__(self, ctx: RunContext, out: str, defender: Defender, measurements: list[Measurement]):
        self.ctx, self.out, self.defender = ctx, out, defender
        self.attacker = Attacker(ctx.cfg.attack, ctx)
        self.before = [m for m in measurements if not m.after_update]
        self.after = [m for m in measurements if m.after_update]
        self.noise_generator = torch.Generator().manual_seed(ctx.cfg.run.seed + 1)  # the stream's draws stay put

    def evaluate(self, full: bool = False) -> float:
        split = self.ctx.data.test if full else self.ctx.eval_split
        return evaluate(self.ctx.model, split, self.ctx.cfg.eval.eval_batch_size)

    def step(self, t: int, batches: Iterator) -> dict:
        """One arriving batch: draw, poison, measure, defend, evaluate, measure again (SPEC "Phase 2")."""
        ctx, laps = self.ctx, Laps(self.ctx.device)
        k, x, y = next(batches)
        laps.lap("stream")
        x_in = self.attacker.poison(ctx.model, x, y)
        laps.lap("craft")
        arrival = Arrival(t, k, x, y, x_in, ctx.mask, ctx.cfg.attack.epsilon, self.noise_generator)
        record = {"t": t, "batch": k}
        for m in self.before:
            record.update(m.measure(self, arrival))
            laps.lap(m.name)
        record.update(self.defender.step(ctx.learner, x_in, y, t))
        laps.lap("defend")
        record["test_err"] = self.evaluate()
        laps.lap("eval")
        check_finite(ctx.model, record["test_err"], f"at online step {t}")
        for m in self.after:
            record.update(m.measure(self, arrival))
            laps.lap(m.name)
        return {**record, **laps.total()}

    def accumulative_phase(self) -> tuple[list[dict], str]:
        """Steps until --epochs batches have arrived or the test error exceeds the threshold."""
        records, batches = [], iter(self.ctx.stream)
        bar = tqdm(total=self.ctx.cfg.stream.steps, desc="online", dynamic_ncols=True, disable=None)
        with bar:
            for t in range(self.ctx.cfg.stream.steps):
                records.append(self.step(t, batches))
                append_jsonl(os.path.join(self.out, "steps.jsonl"), records[-1])
                bar.update(1)
                bar.set_postfix(err=f"{records[-1]['test_err']:.4f}")
                if records[-1]["test_err"] > self.ctx.threshold:
                    return records, "threshold"
                if self.ctx.cfg.attack.online_advtrigger:
                    self.attacker.craft_trigger(self.ctx.model)
        return records, "epochs"

    def run(self) -> dict:
        """The whole phase; returns the summary (SPEC "The attack", step 3)."""
        started = time.time()
        err_burn_in = self.evaluate(full=True)
        self.attacker.craft_trigger(self.ctx.model)
        for m in self.before + self.after:
            m.start(self)
        records, stop_reason = self.accumulative_phase()
        err_before = self.evaluate(full=True)
        for m in self.before + self.after:
            m.finish(self)
        t0 = time.time()
        info = self.defender.step(self.ctx.learner, self.attacker.x_trigger, self.ctx.y_trigger, len(records),
                                  self.ctx.cfg.eval.niter)
        trigger_s = time.time() - t0
        err_after = self.evaluate(full=True)
        check_finite(self.ctx.model, err_after, "at the trigger step (summary.json not written)")
        summary = {"err_burn_in": err_burn_in, "err_end_accumulative": err_before, "err_before_trigger": err_before,
                   "err_after_trigger": err_after, "delta": err_after - err_before,
                   "delta_vs_burn_in": err_after - err_burn_in, "steps": len(records), "stop_reason": stop_reason,
                   "threshold": self.ctx.threshold}
        for part in self.after + self.before:
            summary.update(part.summary())
        summary.update(self.defender.summary(records))
        return {**summary, "trigger_step_s": trigger_s, "trigger_info": info, "total_seconds": time.time() - started}


def run_config(ctx: RunContext, out: str, defender: Defender) -> dict:
    """config.json: the whole configuration, what the run drew and loaded, and the environment."""
    return {"config": ctx.cfg.to_dict(), "out": out, "checkpoint": ctx.checkpoint, "model": ctx.spec.to_dict(),
            "memorized_model": ctx.memorized_path, **defender.describe(), "device": str(ctx.device),
            "threshold": ctx.threshold, "val_indices": ctx.val_indices.tolist(),
            "trigger_indices": ctx.stream.indices(0).tolist(), "environment": environment(ctx.device)}


def refuse_existing(out: str | None, overwrite: bool, remove: bool = False) -> None:
    """A finished run's results (summary.json) in ``out`` are refused unless --overwrite; an unfinished run's
    files are replaced. ``remove`` (under the lock): delete what the new run replaces."""
    present = [f for f in RESULTS if out is not None and os.path.exists(os.path.join(out, f))]
    if "summary.json" in present and not overwrite:
        raise UserError(f"{out!r} already holds results; pass --overwrite or choose another --out")
    if present and remove and "summary.json" not in present:
        print(f"note: replacing the unfinished run in {out!r} (it has no summary.json)")
    for f in present if remove else []:
        os.remove(os.path.join(out, f))


def report_line(cfg: OnlineConfig, summary: dict, out: str) -> str:
    return (f"[{cfg.defence}] burn-in err {summary['err_burn_in']:.4f} | after {summary['steps']} steps "
            f"({summary['stop_reason']}) {summary['err_before_trigger']:.4f} | after trigger "
            f"{summary['err_after_trigger']:.4f} | delta {summary['delta']:+.4f} | {summary['total_seconds']:.1f} s"
            f" | results in {out}")


def run_online(cfg: OnlineConfig) -> dict:
    """Run one online phase as configured; writes config.json, steps.jsonl, md.jsonl, summary.json and the log
    line in the results folder, and returns the summary."""
    refuse_existing(cfg.run.out, cfg.run.overwrite)  # before the data are loaded: fail fast
    ctx = build_context(cfg)
    out = cfg.run.out or default_out(cfg, ctx.spec)
    # the registries as they are now, with what a user registered
    defender = defenses.DEFENDERS[cfg.defence].from_context(ctx)
    measurements = [m for m in (kind.from_context(ctx, out) for kind in measure.MEASUREMENTS) if m is not None]
    with FolderLock(ensure_dir(out)):  # only once the flags, checkpoints and data are known to be good
        refuse_existing(out, cfg.run.overwrite, remove=True)
        write_json(os.path.join(out, "config.json"), run_config(ctx, out, defender))
        try:
            summary = OnlineRun(ctx, out, defender, measurements).run()
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (utils.errors.Terminated): the same type
            raise type(e)(f"the finished steps are kept in {os.path.join(out, 'steps.jsonl')!r}, no "
                                    f"summary.json was written; the same command runs it again") from None
        line = report_line(cfg, summary, out)
        with open(os.path.join(out, cfg.run.log_name), "a") as f:
            f.write(line + "\n")
        write_json(os.path.join(out, "summary.json"), summary)
    print(line)
    return summary
