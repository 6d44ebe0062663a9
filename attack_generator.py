"""The accumulative poisoning attack of Pang et al. (SPEC "The attack"), under the authors' import path.

The functions live in ``utils/attack.py``; this module only re-exports them, so code written against the
authors' repository (``from attack_generator import ...``) keeps working.
"""
from utils.attack.craft import (OBJECTIVES, accumulative_target, craft_accumulative_poison, craft_poisoned_trigger,
                          mean_discrepancy, pgd_perturb, poison_objective, second_order_term, trigger_alignment)

__all__ = ["OBJECTIVES", "accumulative_target", "craft_accumulative_poison", "craft_poisoned_trigger",
           "mean_discrepancy", "pgd_perturb", "poison_objective", "second_order_term", "trigger_alignment"]
