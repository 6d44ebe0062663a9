"""The attacks: the accumulative poisoning of Pang et al. (SPEC "The attack"), its MD-aware variant (SPEC
"Detectors", the adaptive attacker), and the PGD perturbation that adversarial training uses (SPEC "Baselines").

Every function takes any ``nn.Module`` and tensors on any device, crafts with the model in the mode it is
given in (PGD: eval mode), leaves its parameters, buffers and modes as found, and returns a detached batch
inside the ε-ball around its input and inside [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.core.discrepancy import md_from_logits
from utils.core.grads import (Grads, check_budget, eval_mode, layerwise_alignment, layerwise_dot, normalize_layers,
                         param_grads, preserved_state, project_linf, signed, trainable_params)
from utils.errors import UserError

OBJECTIVES = ("reg", "normal", "second")


def step_length(epsilon: float, num_steps: int, step_size: float = 0.0) -> float:
    """The size α of the signed steps: ``step_size``, or the authors' 2ε/K when it is 0 (SPEC "The attack").
    At most 2ε: from anywhere in the ε-ball a longer signed step lands on the same corner of the ball."""
    if not 0.0 <= float(step_size) <= 2.0 * float(epsilon):
        raise UserError(f"the step size must lie in [0, 2ε] = [0, {2.0 * float(epsilon):g}] (0: 2ε/K; a longer "
                        f"signed step lands on the same corner of the ε-ball), got {step_size}")
    return step_size if step_size else 2.0 * epsilon / max(num_steps, 1)


def trigger_alignment(model: nn.Module, x_trigger: torch.Tensor, y_trigger: torch.Tensor,
                      x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """A(g(x_T, y_T), g(x_v, y_v)) at the current θ: the quantity the attack drives down (SPEC "The attack")."""
    with preserved_state(model):
        return layerwise_alignment(param_grads(model, x_trigger, y_trigger),
                                   param_grads(model, x_val, y_val)).item()


def craft_poisoned_trigger(model: nn.Module, x_trigger: torch.Tensor, y_trigger: torch.Tensor,
                           x_val: torch.Tensor, y_val: torch.Tensor, *, epsilon: float = 0.2,
                           num_steps: int = 2, round_sign: bool = False, step_size: float = 0.0) -> torch.Tensor:
    """K signed steps of size α (``step_length``: 2ε/K unless ``step_size``) that lower A(g(x', y_T), g(x_v, y_v))
    (SPEC "The attack", step 1)."""
    check_budget(epsilon, num_steps)
    step = step_length(epsilon, num_steps, step_size)
    x0 = x_trigger.detach()
    x_adv = x0.clone()
    with preserved_state(model):
        g_val = [g.detach() for g in normalize_layers(param_grads(model, x_val, y_val))]
        for _ in range(num_steps):
            x_adv.requires_grad_(True)
            g = param_grads(model, x_adv, y_trigger, create_graph=True)
            objective = layerwise_dot(g, g_val, normalize_v=False)
            (grad_x,) = torch.autograd.grad(objective, x_adv)
            x_adv = project_linf(x_adv.detach() - step * signed(grad_x, round_sign), x0, epsilon)
    return x_adv.detach()


def _graph_grads(model: nn.Module, x_trigger: torch.Tensor, y_trigger: torch.Tensor,
                 x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[Grads, Grads]:
    return (param_grads(model, x_trigger, y_trigger, create_graph=True),
            param_grads(model, x_val, y_val, create_graph=True))


def alignment_grads(model: nn.Module, x_trigger: torch.Tensor, y_trigger: torch.Tensor,
                    x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[Grads, Grads]:
    """g(x_T, y_T; θ) and g(x_v, y_v; θ), differentiable in θ: what A and its gradient s are made of (SPEC "The
    attack", steps 1-2); the values of ``param_grads`` bit for bit. In train mode the graph holds BN statistics
    that are written back afterwards: use it in eval mode only."""
    with preserved_state(model):
        return _graph_grads(model, x_trigger, y_trigger, x_val, y_val)


def second_order_term(model: nn.Module, x_trigger: torch.Tensor, y_trigger: torch.Tensor,
                      x_val: torch.Tensor, y_val: torch.Tensor, *,
                      grads: tuple[Grads, Grads] | None = None) -> Grads:
    """s = ∇_θ A(g(x_T', y_T; θ), g(x_v, y_v; θ)) per parameter tensor (SPEC "The attack", step 2); ``grads``:
    ``alignment_grads`` at this θ when already computed (their graph is used up)."""
    with preserved_state(model):
        g_t, g_v = grads if grads is not None else _graph_grads(model, x_trigger, y_trigger, x_val, y_val)
        c = layerwise_alignment(g_t, g_v)
        return [s.detach() for s in torch.autograd.grad(c, trainable_params(model))]


def accumulative_target(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger: torch.Tensor,
                        y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                        gamma: float = 1.0, objective: str = "reg", grads: tuple[Grads, Grads] | None = None) -> Grads:
    """v_l = γ·nrm(g_t,l) + nrm(s_l) ("reg"), γ·nrm(g_t,l) ("normal") or nrm(s_l) ("second") (SPEC step 2);
    ``grads``: ``alignment_grads`` at this θ when already computed."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    parts: list[Grads] = []
    if objective in ("reg", "normal"):
        with preserved_state(model):
            parts.append([gamma * g for g in normalize_layers(param_grads(model, x, y))])
    if objective in ("reg", "second"):
        parts.append(normalize_layers(second_order_term(model, x_trigger, y_trigger, x_val, y_val, grads=grads)))
    if len(parts) == 1:
        return parts[0]
    return [a + b for a, b in zip(*parts)]


def poison_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Grads) -> float:
    """J(x) = Σ_l ⟨nrm(g(x, y)_l), v_l⟩ for a fixed target v (SPEC "The attack", step 2)."""
    with preserved_state(model):
        return layerwise_dot(param_grads(model, x, y), target, normalize_v=False).item()


def mean_discrepancy(model: nn.Module, memorized: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mean_i MD(x_i), differentiable in x, both models in eval mode (SPEC "Detectors", the adaptive attacker)."""
    with eval_mode(model, memorized):
        return md_from_logits(model(x), memorized(x)).mean()


def craft_accumulative_poison(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger: torch.Tensor,
                              y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                              epsilon: float = 0.2, num_steps: int = 2, gamma: float = 1.0,
                              objective: str = "reg", round_sign: bool = False,
                              target: Grads | None = None, memorized: nn.Module | None = None,
                              adaptive_md: float = 0.0, step_size: float = 0.0,
                              grads: tuple[Grads, Grads] | None = None) -> torch.Tensor:
    """K signed steps of size α (``step_length``: 2ε/K unless ``step_size``) that raise J(x') − λ·mean MD(x')
    (SPEC "The attack", step 2; λ > 0: the adaptive attacker of SPEC "Detectors", which needs the ``memorized``
    model).

    The target (which holds the second-order term) is computed once per call, before the steps; pass
    ``target`` to reuse one already computed by ``accumulative_target``, or ``grads`` (``alignment_grads`` at
    this θ) to reuse the trigger's and the validation batch's gradients.
    """
    check_budget(epsilon, num_steps)
    if adaptive_md and memorized is None:
        raise ValueError("adaptive_md > 0 needs the memorized model")
    step = step_length(epsilon, num_steps, step_size)
    if target is None:
        target = accumulative_target(model, x, y, x_trigger, y_trigger, x_val, y_val,
                                     gamma=gamma, objective=objective, grads=grads)
    x0 = x.detach()
    x_adv = x0.clone()
    with preserved_state(model):
        for _ in range(num_steps):
            x_adv.requires_grad_(True)
            g = param_grads(model, x_adv, y, create_graph=True)
            objective_value = layerwise_dot(g, target, normalize_v=False)
            if adaptive_md:
                objective_value = objective_value - adaptive_md * mean_discrepancy(model, memorized, x_adv)
            (grad_x,) = torch.autograd.grad(objective_value, x_adv)
            x_adv = project_linf(x_adv.detach() + step * signed(grad_x, round_sign), x0, epsilon)
    return x_adv.detach()


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float = 0.2,
                step_size: float = 0.02, steps: int = 10, descend_with_kl: bool = False) -> torch.Tensor:
    """PGD in the L∞ ball, no random start, model in eval mode (SPEC "Baselines", AT).

    Default: ascent on CE (real PGD). ``descend_with_kl``: the authors' variant, signed steps that
    *descend* CE + KL(p(x) ‖ p(x')) (their KLDivLoss, mean over all elements).
    """
    x0 = x.detach()
    x_adv = x0.clone()
    with preserved_state(model):
        model.eval()
        if descend_with_kl:
            with torch.no_grad():
                p_nat = F.softmax(model(x0), dim=1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            loss = F.cross_entropy(out, y)
            if descend_with_kl:
                loss = loss + (p_nat * (p_nat.clamp_min(1e-30).log() - F.log_softmax(out, dim=1))).mean()
            (g,) = torch.autograd.grad(loss, x_adv)
            direction = -1.0 if descend_with_kl else 1.0
            x_adv = project_linf(x_adv.detach() + direction * step_size * g.sign(), x0, epsilon)
    return x_adv.detach()
