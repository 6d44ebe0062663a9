"""The attacker's role in an online run (SPEC "The attack"): its settings, the poisoned trigger, a poison for
every arriving batch, and its own rule for when to fire the trigger. The mathematics is in ``utils.attack.craft``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.attack.craft import (OBJECTIVES, alignment_grads, craft_accumulative_poison, craft_poisoned_trigger,
                                trigger_alignment)
from utils.core.grads import MAX_INNER_STEPS, STEPS_NOTE, Grads, StateStamp, layerwise_alignment
from utils.core.stream import mix
from utils.errors import UserError
from utils.fields import check_fields, opt

# when the trigger is fired (SPEC "The attack", step 3): the learner's test error crosses the threshold (the
# authors' rule), after a fixed number of arriving batches, or once the attacker's own A stops reaching new lows
FIRE_RULES = ("threshold", "batches", "alignment_peak")
STEP_NOTE = "a longer signed step lands on the same corner of the ε-ball"
BATCHES_MAX = 10 ** 6


@dataclass(frozen=True)
class AttackConfig:
    """The attacker (SPEC "The attack"; ``adaptive_md``: SPEC "Detectors", the adaptive attacker)."""

    poison: bool = opt(True, "control: the accumulative phase sees clean batches", flag="--no_poison", negate=True)
    epsilon: float = opt(0.2, "L∞ budget, in pixel units of [0, 1] images", low=0, high=1, note="pixel units")
    num_steps: int = opt(2, "signed steps per crafted batch", flag="--num-steps",
                         aliases=("--num_steps",), low=0, high=MAX_INNER_STEPS, note=STEPS_NOTE)
    step_size: float = opt(0.0, "size α of the signed steps, for the poisons and the trigger (0: the authors' "
                           "2ε/K, K the steps of what is crafted); at most 2 x --epsilon", low=0, high=2,
                           note=STEP_NOTE)
    trigger_steps: int | None = opt(None, "signed steps that craft the poisoned trigger (default: --num-steps)",
                                    low=0, high=MAX_INNER_STEPS, note=STEPS_NOTE)
    trigger_step_size: float | None = opt(None, "size of the trigger's signed steps (default: --step_size; 0: "
                                          "2ε/K of the trigger's K); at most 2 x --epsilon", low=0, high=2,
                                          note=STEP_NOTE)
    gamma: float = opt(1.0, "weight γ of the clean-gradient term", low=0, high=1e6)
    objective: str = opt("reg", "the poisons' objective (reg, normal or second)", choices=OBJECTIVES,
                         flag="--only_reg/--only_normal/--only_second", by_hand=True)  # utils.online.flags
    round_sign: bool = opt(False, "treat gradient components below 5e-4 as 0 in the signed steps", flag="--roundsign")
    poison_scale: float = opt(1.0, "fraction of each batch poisoned", low=0, high=1)
    use_advtrigger: bool = opt(False, "craft the poisoned trigger (else the trigger is the clean batch)")
    online_advtrigger: bool = opt(False, "re-craft the trigger after every step (from the clean trigger batch)",
                                  flag="--use_online_advtrigger")
    craft_mode: str = opt("eval", "model mode while crafting", flag="--mode", choices=("eval", "train"),
                          parse_choices=True)
    val_size: int = opt(500, "size of the attacker's validation batch (first batch of a seeded shuffled test set)",
                        flag="--test_batch_size", low=1)
    adaptive_md: float = opt(0.0, "an attacker who knows MD: add -LAMBDA * mean MD(x') to the poisons' objective "
                             "(white box: the memorized model is known to it)", low=0, high=1e6, metavar="LAMBDA")
    fire: str = opt("threshold", "when the trigger is fired: threshold (the learner's test error exceeds "
                    "--threshold / --threshold_delta), batches (after exactly --fire_after arriving batches), "
                    "alignment_peak (once A(g_trigger, g_val) has not reached a new low for --fire_patience "
                    "batches); --epochs caps the phase in every case", choices=FIRE_RULES, parse_choices=True)
    fire_after: int | None = opt(None, "--fire batches: the arriving batches before the trigger fires", low=1,
                                 high=BATCHES_MAX)
    fire_patience: int | None = opt(None, "--fire alignment_peak: fire after this many batches in a row without a "
                                    "new lowest A (default 1)", low=1, high=BATCHES_MAX)

    def __post_init__(self) -> None:
        check_fields(self)
        for flag, size in (("--step_size", self.step_size), ("--trigger_step_size", self.trigger_step_size)):
            if size is not None and size > 2.0 * self.epsilon:
                raise UserError(f"{flag} must be at most 2 x --epsilon = {2.0 * self.epsilon:g} ({STEP_NOTE}; 0: "
                                f"the authors' 2ε/K), got {size:g}")
        check_fire(self)

    @property
    def trigger_crafting(self) -> tuple[int, float]:
        """The trigger's (steps, step size): its own when given, else those of the poisons (SPEC step 1)."""
        steps = self.num_steps if self.trigger_steps is None else self.trigger_steps
        return steps, self.step_size if self.trigger_step_size is None else self.trigger_step_size


def check_fire(cfg: AttackConfig) -> None:
    """--fire_after belongs to --fire batches (which needs it), --fire_patience to --fire alignment_peak."""
    if cfg.fire == "batches" and cfg.fire_after is None:
        raise UserError("--fire batches needs --fire_after N: the arriving batches before the trigger fires")
    for flag, value, rule in (("--fire_after", cfg.fire_after, "batches"),
                              ("--fire_patience", cfg.fire_patience, "alignment_peak")):
        if value is not None and cfg.fire != rule:
            raise UserError(f"{flag} is read only by --fire {rule} (here --fire {cfg.fire}): leave it out or use "
                            f"--fire {rule}")


class FireWatch:
    """The attacker's own rule for firing the trigger (SPEC "The attack", step 3): --fire batches counts the
    arriving batches; --fire alignment_peak fires once A has not gone below its lowest value (the start's
    included) for --fire_patience batches in a row. --fire threshold is the learner's rule: never fires here."""

    def __init__(self, cfg: AttackConfig, start_alignment: float | None = None):
        self.cfg = cfg
        self.best, self.best_batch, self.since_best = start_alignment, 0, 0

    def observe(self, batches: int, alignment: float | None = None) -> tuple[bool, dict]:
        """After ``batches`` arriving batches (A: the attacker's alignment then): fire now?, and the fields for
        the step's record."""
        if self.cfg.fire == "batches":
            return batches >= self.cfg.fire_after, {}
        if self.cfg.fire != "alignment_peak":
            return False, {}
        if alignment is None:
            raise ValueError("--fire alignment_peak observes the alignment after every batch")
        if self.best is None or alignment < self.best:
            self.best, self.best_batch, self.since_best = alignment, batches, 0
        else:
            self.since_best += 1
        record = {"fire_alignment": alignment, "fire_since_best": self.since_best}
        return self.since_best >= (self.cfg.fire_patience or 1), record

    def summary(self) -> dict:
        """What the alignment rule saw (summary.json); nothing for the other rules."""
        if self.cfg.fire != "alignment_peak":
            return {}
        return {"fire_best_alignment": self.best, "fire_best_batch": self.best_batch}


@dataclass
class KeptGrads:
    """g_T and g_v (with their graph) and A, as the attacker measured them at a stamped θ and trigger."""

    stamp: StateStamp
    x_trigger: torch.Tensor
    grads: tuple[Grads, Grads]
    value: float

    def holds(self, model: nn.Module, x_trigger: torch.Tensor) -> bool:
        return x_trigger is self.x_trigger and self.stamp.matches(model)


class Attacker:
    """The attacker of SPEC "The attack": a poisoned trigger, and a poison for every arriving batch, crafted
    with the model in the mode --mode asks for; --poison_scale: only the positions in ``mask``.

    A measured after a learner's step and the next poison's second-order term need g_T and g_v at the same θ:
    they are computed once (kept with their graph, used up by the poison; the same numbers bit for bit)."""

    def __init__(self, cfg: AttackConfig, trigger: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, memorized: nn.Module | None = None):
        self.cfg, self.mask, self.memorized = cfg, mask, memorized
        self.x_clean_trigger, self.y_trigger = trigger
        self.x_val, self.y_val = val
        self.x_trigger = self.x_clean_trigger  # the trigger the learner will receive (``craft_trigger``)
        self.kept: KeptGrads | None = None
        # the poisons use s; eval mode only: in train mode the forward passes move BN's running statistics, which
        # their graph holds and which are written back
        self.keeps_grads = cfg.poison and cfg.objective in ("reg", "second") and cfg.craft_mode == "eval"

    def _craft_mode(self, model: nn.Module) -> nn.Module:
        return model.train(self.cfg.craft_mode == "train")

    def craft_trigger(self, model: nn.Module) -> None:
        """Step 1: the poisoned trigger, always from the clean trigger batch (also when re-crafted online)."""
        if self.cfg.use_advtrigger:
            steps, step_size = self.cfg.trigger_crafting
            adv = craft_poisoned_trigger(self._craft_mode(model), self.x_clean_trigger, self.y_trigger, self.x_val,
                                         self.y_val, epsilon=self.cfg.epsilon, num_steps=steps,
                                         round_sign=self.cfg.round_sign, step_size=step_size)
            self.x_trigger = mix(adv, self.x_clean_trigger, self.mask)

    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Step 2: the batch the learner receives (clean under --no_poison)."""
        if not self.cfg.poison:
            return x
        model = self._craft_mode(model)
        kept, self.kept = self.kept, None
        grads = kept.grads if kept is not None and kept.holds(model, self.x_trigger) else None
        adv = craft_accumulative_poison(model, x, y, self.x_trigger, self.y_trigger, self.x_val,
                                        self.y_val, epsilon=self.cfg.epsilon, num_steps=self.cfg.num_steps,
                                        gamma=self.cfg.gamma, objective=self.cfg.objective,
                                        round_sign=self.cfg.round_sign, memorized=self.memorized,
                                        adaptive_md=self.cfg.adaptive_md, step_size=self.cfg.step_size, grads=grads)
        return mix(adv, x, self.mask)

    def alignment(self, model: nn.Module) -> float:
        """A(g(x_T', y_T), g(x_v, y_v)) at the current θ, in the crafting mode (its gradients kept for the next
        poison when that needs s)."""
        model = self._craft_mode(model)
        if not self.keeps_grads:
            return trigger_alignment(model, self.x_trigger, self.y_trigger, self.x_val, self.y_val)
        if self.kept is None or not self.kept.holds(model, self.x_trigger):
            grads = alignment_grads(model, self.x_trigger, self.y_trigger, self.x_val, self.y_val)
            value = layerwise_alignment(*([g.detach() for g in part] for part in grads)).item()
            self.kept = KeptGrads(StateStamp(model), self.x_trigger, grads, value)
        return self.kept.value

    def watch(self, model: nn.Module) -> FireWatch:
        """Step 3: the rule for firing the trigger, started once the trigger is crafted (A at the start: the
        lowest seen so far, for --fire alignment_peak)."""
        start = self.alignment(model) if self.cfg.fire == "alignment_peak" else None
        return FireWatch(self.cfg, start)
