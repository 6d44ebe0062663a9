"""The attacker's role in an online run (SPEC "The attack"): its settings, the poisoned trigger, and a poison for
every arriving batch. The mathematics is in ``utils.attack.craft``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.attack.craft import OBJECTIVES, craft_accumulative_poison, craft_poisoned_trigger, trigger_alignment
from utils.core.grads import MAX_INNER_STEPS, STEPS_NOTE
from utils.core.stream import mix
from utils.fields import check_choice, check_fields, opt


@dataclass(frozen=True)
class AttackConfig:
    """The attacker (SPEC "The attack"; ``adaptive_md``: SPEC "Detectors", the adaptive attacker)."""

    poison: bool = opt(True, "control: the accumulative phase sees clean batches", flag="--no_poison", negate=True)
    epsilon: float = opt(0.2, "L∞ budget, in pixel units of [0, 1] images", low=0, high=1, note="pixel units")
    num_steps: int = opt(2, "signed steps per crafted batch (step size 2ε/K)", flag="--num-steps",
                         aliases=("--num_steps",), low=0, high=MAX_INNER_STEPS, note=STEPS_NOTE)
    gamma: float = opt(1.0, "weight γ of the clean-gradient term", low=0, high=1e6)
    objective: str = "reg"  # --only_reg / --only_normal / --only_second (utils.online.flags)
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

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("--only_reg/--only_normal/--only_second", self.objective, OBJECTIVES)


class Attacker:
    """The attacker of SPEC "The attack": a poisoned trigger, and a poison for every arriving batch, crafted
    with the model in the mode --mode asks for; --poison_scale: only the positions in ``mask``."""

    def __init__(self, cfg: AttackConfig, trigger: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, memorized: nn.Module | None = None):
        self.cfg, self.mask, self.memorized = cfg, mask, memorized
        self.x_clean_trigger, self.y_trigger = trigger
        self.x_val, self.y_val = val
        self.x_trigger = self.x_clean_trigger  # the trigger the learner will receive (``craft_trigger``)

    def _craft_mode(self, model: nn.Module) -> nn.Module:
        return model.train(self.cfg.craft_mode == "train")

    def craft_trigger(self, model: nn.Module) -> None:
        """Step 1: the poisoned trigger, always from the clean trigger batch (also when re-crafted online)."""
        if self.cfg.use_advtrigger:
            adv = craft_poisoned_trigger(self._craft_mode(model), self.x_clean_trigger, self.y_trigger, self.x_val,
                                         self.y_val, epsilon=self.cfg.epsilon, num_steps=self.cfg.num_steps,
                                         round_sign=self.cfg.round_sign)
            self.x_trigger = mix(adv, self.x_clean_trigger, self.mask)

    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Step 2: the batch the learner receives (clean under --no_poison)."""
        if not self.cfg.poison:
            return x
        adv = craft_accumulative_poison(self._craft_mode(model), x, y, self.x_trigger, self.y_trigger, self.x_val,
                                        self.y_val, epsilon=self.cfg.epsilon, num_steps=self.cfg.num_steps,
                                        gamma=self.cfg.gamma, objective=self.cfg.objective,
                                        round_sign=self.cfg.round_sign, memorized=self.memorized,
                                        adaptive_md=self.cfg.adaptive_md)
        return mix(adv, x, self.mask)

    def alignment(self, model: nn.Module) -> float:
        """A(g(x_T', y_T), g(x_v, y_v)) at the current θ, in the crafting mode."""
        return trigger_alignment(self._craft_mode(model), self.x_trigger, self.y_trigger, self.x_val, self.y_val)
