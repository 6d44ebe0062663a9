"""Parameter gradients and layer-wise alignment (SPEC "Notation"), and model-state hygiene for crafting."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError

Grads = list[torch.Tensor]
MAX_INNER_STEPS = 1000  # crafting / PGD / DSC / trigger steps per batch: more would run for hours (papers: 2-10)
STEPS_NOTE = "more would run for hours; the papers use 2-10"


def trainable_params(model: nn.Module) -> list[torch.Tensor]:
    """The parameters an SGD step updates (one entry per layer weight/bias)."""
    return [p for p in model.parameters() if p.requires_grad]


def param_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = False) -> Grads:
    """g(x, y; θ) = ∇_θ mean CE, per parameter tensor (SPEC "Notation"); differentiable iff create_graph."""
    loss = F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, trainable_params(model), create_graph=create_graph))


def normalize_layers(g: Sequence[torch.Tensor]) -> Grads:
    """nrm(g_l) = g_l / ‖g_l‖₂ for each flattened parameter tensor (SPEC "Notation")."""
    return [F.normalize(t.flatten(), p=2, dim=0) for t in g]


def layerwise_dot(g: Sequence[torch.Tensor], v: Sequence[torch.Tensor], normalize_v: bool = True) -> torch.Tensor:
    """Σ_l ⟨nrm(g_l), v_l⟩, with v_l normalised too unless ``normalize_v`` is False."""
    v_n = normalize_layers(v) if normalize_v else [t.flatten() for t in v]
    return sum((a * b).sum() for a, b in zip(normalize_layers(g), v_n))


def layerwise_alignment(g: Sequence[torch.Tensor], h: Sequence[torch.Tensor]) -> torch.Tensor:
    """A(g, h) = Σ_l ⟨nrm(g_l), nrm(h_l)⟩ (SPEC "Notation")."""
    return layerwise_dot(g, h, normalize_v=True)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Π_ε(x', x): clip into the L∞ ball of radius ε around x, then into [0, 1] (SPEC "Notation")."""
    return torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp_(0.0, 1.0)


def signed(grad: torch.Tensor, round_sign: bool = False) -> torch.Tensor:
    """sign(∇); with round_sign, the authors' --roundsign: components below 5e-4 in size count as 0."""
    return torch.round(1e3 * grad).sign() if round_sign else grad.sign()


def check_budget(epsilon: float, num_steps: int) -> None:
    """ε must lie in [0, 1] (pixel units) and the step count must be non-negative."""
    if not 0.0 <= float(epsilon) <= 1.0:
        raise UserError(f"epsilon must lie in [0, 1] (pixel units of [0, 1] images), got {epsilon}")
    if int(num_steps) < 0:
        raise UserError(f"the number of steps must be >= 0, got {num_steps}")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of the models in eval mode inside the block; each module's own mode restored after it."""
    modes = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, saved in zip(models, modes):
            for m, mode in zip(model.modules(), saved):
                m.training = mode


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Leave the model as found: its train/eval mode per module and its buffers (BN running statistics; only those
    that changed are written back, so a graph that saved an unchanged buffer stays usable)."""
    modes = [m.training for m in model.modules()]
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                if not torch.equal(b, saved):
                    b.copy_(saved)


class StateStamp:
    """What a model computes with, as of now: each module's mode, each parameter's and buffer's identity and
    in-place version (a graph through them stays usable only while those hold) and a copy of their values (a
    change autograd does not see, e.g. through ``.data``, counts too)."""

    def __init__(self, model: nn.Module):
        self.modes = [m.training for m in model.modules()]
        self.versions = self._versions(model)
        self.values = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]

    @staticmethod
    def _versions(model: nn.Module) -> list[tuple[int, int]]:
        return [(id(t), t._version) for t in (*model.parameters(), *model.buffers())]

    def matches(self, model: nn.Module) -> bool:
        """The model still computes exactly as when stamped."""
        return (self.modes == [m.training for m in model.modules()] and self.versions == self._versions(model)
                and all(torch.equal(t.detach(), v) for t, v in zip((*model.parameters(), *model.buffers()),
                                                                     self.values)))
