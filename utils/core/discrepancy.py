"""Memorization Discrepancy (SPEC "Memorization Discrepancy", Zhu et al.) and its variants (SPEC "Detectors")."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.core.grads import preserved_state


def md_from_logits(logits_current: torch.Tensor, logits_memorized: torch.Tensor) -> torch.Tensor:
    """KL(p_mem ‖ p_cur) per sample from the two models' logits (SPEC "Memorization Discrepancy")."""
    log_p_mem = F.log_softmax(logits_memorized, dim=1)
    log_p_cur = F.log_softmax(logits_current, dim=1)
    return (log_p_mem.exp() * (log_p_mem - log_p_cur)).sum(dim=1)


def reverse_md_from_logits(logits_current: torch.Tensor, logits_memorized: torch.Tensor) -> torch.Tensor:
    """KL(p_cur ‖ p_mem) per sample: MD with the two models' roles swapped (SPEC "Detectors")."""
    return md_from_logits(logits_memorized, logits_current)


def js_md_from_logits(logits_current: torch.Tensor, logits_memorized: torch.Tensor) -> torch.Tensor:
    """½·KL(p_mem ‖ m) + ½·KL(p_cur ‖ m), m = ½(p_mem + p_cur), per sample: the symmetric form (SPEC "Detectors")."""
    log_p_mem = F.log_softmax(logits_memorized, dim=1)
    log_p_cur = F.log_softmax(logits_current, dim=1)
    log_m = torch.logaddexp(log_p_mem, log_p_cur) - torch.log(torch.tensor(2.0, dtype=log_p_cur.dtype))
    kl_mem = (log_p_mem.exp() * (log_p_mem - log_m)).sum(dim=1)
    kl_cur = (log_p_cur.exp() * (log_p_cur - log_m)).sum(dim=1)
    return 0.5 * (kl_mem + kl_cur)


@torch.no_grad()
def memorization_discrepancy(model: nn.Module, memorized_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MD(x) = KL(p(x; θ_mem) ‖ p(x; θ_t)) per sample, both models in eval mode (SPEC "Memorization Discrepancy")."""
    return memorization_discrepancies(model, [memorized_model], x)[0]


@torch.no_grad()
def memorization_discrepancies(model: nn.Module, memorized_models: list[nn.Module],
                               x: torch.Tensor) -> list[torch.Tensor]:
    """MD(x) against each memorized model, the current model's forward pass done once (SPEC "Memorization
    Discrepancy"; the MD curve of SPEC "Detectors")."""
    with contextlib.ExitStack() as stack:
        for m in [model, *memorized_models]:
            stack.enter_context(preserved_state(m))
            m.eval()
        logits = model(x)
        return [md_from_logits(logits, memorized(x)).clamp_min_(0.0) for memorized in memorized_models]
