"""The online phase (SPEC "Phase 2", "The attack" step 3): ``run_online(config) -> summary``.

The loop is ``for t ...: record = run.step(t, batch)``; the attacker, the defender and the measurements are
objects built from the run's context (``build_parts``), so a new defence or measurement is a new class, not an
edit here.
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterator

import torch
from tqdm import tqdm

from utils.attack.attacker import Attacker, FireWatch
from utils.core.stream import Arrival
from utils.core.train import environment, evaluate, evaluate_remembered
from utils.defense import defenders
from utils.defense.defenders import Defender, DefenderInputs
from utils.detect import measure
from utils.detect.measure import MeasureInputs, Measurement
from utils.errors import UserError
from utils.io.results import append_jsonl, refuse_existing, run_in_folder
from utils.online.config import OnlineConfig
from utils.online.context import RunContext, build_context, default_out

RESULTS = ("steps.jsonl", "md.jsonl", "detectors.jsonl", "summary.json")  # a run's files besides config.json


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

    def __init__(self, ctx: RunContext, out: str, attacker: Attacker, defender: Defender,
                 measurements: list[Measurement]):
        self.ctx, self.out, self.attacker, self.defender = ctx, out, attacker, defender
        self.before = [m for m in measurements if not m.after_update]
        self.after = [m for m in measurements if m.after_update]
        self.noise_generator = torch.Generator().manual_seed(ctx.cfg.run.seed + 1)  # the stream's draws stay put

    def evaluate(self, full: bool = False) -> float:
        """The test error on the run's evaluation split, or (``full``) on the whole test set, remembered per exact
        model (a burn-in's runs share their first; a phase that changed nothing, its last)."""
        if full:
            return evaluate_remembered(self.ctx.model, self.ctx.data.test, self.ctx.cfg.eval.eval_batch_size)
        return evaluate(self.ctx.model, self.ctx.eval_split, self.ctx.cfg.eval.eval_batch_size)

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
            record.update(m.measure(ctx.model, arrival))
            laps.lap(m.name)
        record.update(self.defender.step(ctx.learner, x_in, y, t))
        laps.lap("defend")
        record["test_err"] = self.evaluate()
        laps.lap("eval")
        check_finite(ctx.model, record["test_err"], f"at online step {t}")
        for m in self.after:
            record.update(m.measure(ctx.model, arrival))
            laps.lap(m.name)
        return {**record, **laps.total()}

    def accumulative_phase(self, watch: FireWatch) -> tuple[list[dict], str]:
        """Steps until the trigger fires (--fire: the default, once the test error exceeds the threshold) or
        --epochs batches have arrived; returns the records and the rule that ended the phase."""
        records, batches = [], iter(self.ctx.stream)
        bar = tqdm(total=self.ctx.cfg.stream.steps, desc="online", dynamic_ncols=True, disable=None)
        with bar:
            for t in range(self.ctx.cfg.stream.steps):
                record = self.step(t, batches)
                fired = self.fires(watch, record)
                records.append(record)
                append_jsonl(os.path.join(self.out, "steps.jsonl"), record)
                bar.update(1)
                bar.set_postfix(err=f"{record['test_err']:.4f}")
                if fired:
                    return records, self.ctx.cfg.attack.fire
                if self.ctx.cfg.attack.online_advtrigger:
                    self.attacker.craft_trigger(self.ctx.model)
        return records, "epochs"

    def fires(self, watch: FireWatch, record: dict) -> bool:
        """After a step: does the trigger fire now (SPEC "The attack", step 3)? --fire threshold: the learner's
        test error exceeds the threshold; else the attacker's rule, which sees A (the step's measured
        ``alignment``, or computed here under --no_alignment) and adds what it saw to the record."""
        if self.ctx.cfg.attack.fire == "threshold":
            return record["test_err"] > self.ctx.threshold
        alignment = None
        if self.ctx.cfg.attack.fire == "alignment_peak":
            alignment = record["alignment"] if "alignment" in record else self.attacker.alignment(self.ctx.model)
        fired, seen = watch.observe(record["t"] + 1, alignment)
        record.update(seen)
        return fired

    def run(self) -> dict:
        """The whole phase; returns the summary (SPEC "The attack", step 3)."""
        started = time.time()
        err_burn_in = self.evaluate(full=True)
        self.attacker.craft_trigger(self.ctx.model)
        for m in self.before + self.after:
            m.start(self.ctx.model)
        watch = self.attacker.watch(self.ctx.model)
        records, stop_reason = self.accumulative_phase(watch)
        err_before = self.evaluate(full=True)
        for m in self.before + self.after:
            m.finish(self.ctx.model)
        t0 = time.time()
        info = self.defender.step(self.ctx.learner, self.attacker.x_trigger, self.attacker.y_trigger, len(records),
                                  self.ctx.cfg.eval.niter)
        trigger_s = time.time() - t0
        err_after = self.evaluate(full=True)
        check_finite(self.ctx.model, err_after, "at the trigger step (summary.json not written)")
        summary = {"err_burn_in": err_burn_in, "err_end_accumulative": err_before, "err_before_trigger": err_before,
                   "err_after_trigger": err_after, "delta": err_after - err_before,
                   "delta_vs_burn_in": err_after - err_burn_in, "steps": len(records), "stop_reason": stop_reason,
                   "threshold": self.ctx.threshold, **watch.summary()}
        for part in self.after + self.before:
            summary.update(part.summary())
        summary.update(self.defender.summary(records))
        return {**summary, "trigger_step_s": trigger_s, "trigger_info": info, "total_seconds": time.time() - started}


def build_parts(ctx: RunContext, out: str) -> tuple[Attacker, Defender, list[Measurement]]:
    """The attacker, the defender and the measurements of a run, each given what it reads; the registries as they
    are now, with what a user registered."""
    c = ctx.cfg
    attacker = Attacker(c.attack, (ctx.x_trigger, ctx.y_trigger), (ctx.x_val, ctx.y_val), ctx.mask, ctx.memorized)
    defender = defenders.DEFENDERS[c.defence].build(DefenderInputs(c.at, c.dsc, ctx.model, ctx.memorized,
                                                                   ctx.data.test, c.stream.batch_size, c.run.seed))
    inputs = MeasureInputs(c.measure, ctx.model, ctx.memorized, ctx.spec, ctx.checkpoint.get("run_id"),
                           c.run.allow_other_run, ctx.data.train, os.path.join(c.run.resume, "detector_fits"),
                           ctx.device, out, attacker.alignment)
    measurements = [m for m in (kind.build(inputs) for kind in measure.MEASUREMENTS) if m is not None]
    return attacker, defender, measurements


def run_config(ctx: RunContext, out: str, defender: Defender) -> dict:
    """config.json: the whole configuration, what the run drew and loaded, and the environment."""
    return {"config": ctx.cfg.to_dict(), "out": out, "checkpoint": ctx.checkpoint, "model": ctx.spec.to_dict(),
            "memorized_model": ctx.memorized_path, **defender.describe(), "device": str(ctx.device),
            "threshold": ctx.threshold, "val_indices": ctx.val_indices.tolist(),
            "trigger_indices": ctx.stream.indices(0).tolist(), "environment": environment(ctx.device)}


def report_line(cfg: OnlineConfig, summary: dict, out: str) -> str:
    return (f"[{cfg.defence}] burn-in err {summary['err_burn_in']:.4f} | after {summary['steps']} steps "
            f"({summary['stop_reason']}) {summary['err_before_trigger']:.4f} | after trigger "
            f"{summary['err_after_trigger']:.4f} | delta {summary['delta']:+.4f} | {summary['total_seconds']:.1f} s"
            f" | results in {out}")


def run_online(cfg: OnlineConfig) -> dict:
    """Run one online phase as configured; writes config.json, steps.jsonl, md.jsonl, summary.json and the log
    line in the results folder, and returns the summary."""
    refuse_existing(cfg.run.out, RESULTS, cfg.run.overwrite)  # before the data are loaded: fail fast
    ctx = build_context(cfg)
    out = cfg.run.out or default_out(cfg, ctx.spec)
    attacker, defender, measurements = build_parts(ctx, out)
    return run_in_folder(out, RESULTS, cfg.run.overwrite, run_config(ctx, out, defender),
                         OnlineRun(ctx, out, attacker, defender, measurements).run,
                         lambda summary: report_line(cfg, summary, out), cfg.run.log_name, "steps.jsonl")
