"""The clients (SPEC "Federated learning"): an honest client's local SGD on its shard, and the malicious client's
accumulative and trigger updates, with its state (momentum buffer, the global models it received) kept between
rounds. Each returns its update Δ = θ_k − θ as one flat vector; in one process or inside a Flower ClientApp alike."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attack.craft import mean_discrepancy, second_order_term
from utils.core.data import Split
from utils.core.grads import param_grads, preserved_state, trainable_params
from utils.fed.config import ClientsConfig, FedAttackConfig
from utils.fed.vectors import flatten, load_params, param_vector

ACCUMULATIVE, TRIGGER = "accumulative", "trigger"


def local_sgd(model: nn.Module, theta: torch.Tensor, data: Split, shard: torch.Tensor, sgd: ClientsConfig,
              generator: torch.Generator) -> torch.Tensor:
    """An honest client's update: E SGD steps (train mode, a fresh optimizer) on batches of B drawn without
    replacement from its shard, from θ; returns θ_k − θ (SPEC "Federated learning"). Buffers are left as found."""
    load_params(model, theta)
    optimizer = torch.optim.SGD(trainable_params(model), lr=sgd.lr, momentum=sgd.momentum,
                                weight_decay=sgd.weight_decay)
    with preserved_state(model):
        model.train()
        for _ in range(sgd.local_steps):
            x, y = data.batch(shard[torch.randperm(len(shard), generator=generator)[:sgd.batch_size]])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return param_vector(model) - theta


def clip_norm(g: torch.Tensor, bound: float, p: float) -> torch.Tensor:
    """g scaled by min(1, bound / (‖g‖_p + 1e-6)), the rule of torch's clip_grad_norm_ (the authors' clipping)."""
    return g * min(1.0, bound / (torch.linalg.vector_norm(g, p).item() + 1e-6))


@dataclass
class AttackerState:
    """What the attacker keeps between rounds: its SGD momentum buffer, and the global models it received (the
    last ``md_memory`` + 1, oldest first) from which it knows the server's memorized model."""

    buffer: torch.Tensor | None = None
    received: list[torch.Tensor] = field(default_factory=list)


class MaliciousClient:
    """The attacker (SPEC "Federated learning"): in an accumulative round an SGD step on
    L(θ) = −λ·A(g(x_T, y_T; θ), g(x_v, y_v; θ)) [+ λ_md·mean MD(x_v; θ_mem, θ)], in the trigger round an SGD step
    on −p·ℓ(x_T, y_T; θ); its momentum buffer persists across rounds; the update it sends is boost·(θ' − θ)."""

    def __init__(self, cfg: FedAttackConfig, sgd: ClientsConfig, trigger: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor], md_memory: int, state: AttackerState | None = None):
        self.cfg, self.sgd, self.md_memory = cfg, sgd, md_memory
        self.x_trigger, self.y_trigger = trigger
        self.x_val, self.y_val = val
        self.state = state if state is not None else AttackerState()
        self._memorized: nn.Module | None = None

    def remember(self, theta: torch.Tensor) -> torch.Tensor:
        """Keep the global model just received; returns the memorized one (``md_memory`` rounds earlier)."""
        self.state.received = (self.state.received + [theta.clone()])[-(self.md_memory + 1):]
        return self.state.received[0]

    def accumulative_gradient(self, model: nn.Module, memorized: torch.Tensor) -> torch.Tensor:
        """∇θ L(θ) at the model's θ, in the crafting mode (--mode); the adaptive MD term in eval mode."""
        model.train(self.cfg.craft_mode == "train")
        s = flatten(second_order_term(model, self.x_trigger, self.y_trigger, self.x_val, self.y_val))
        g = -self.cfg.feder_lambda * s
        if self.cfg.adaptive_md:
            if self._memorized is None:
                self._memorized = copy.deepcopy(model)
            load_params(self._memorized, memorized)
            with preserved_state(model):
                md = mean_discrepancy(model, self._memorized, self.x_val)
                g = g + self.cfg.adaptive_md * flatten(torch.autograd.grad(md, trainable_params(model)))
        return clip_norm(g, self.cfg.clipvalue, 2.0) if self.cfg.clip_gradnorm else g

    def trigger_gradient(self, model: nn.Module) -> torch.Tensor:
        """∇θ(−p·ℓ(x_T, y_T; θ)) in train mode (the authors' reversed-gradient trigger step)."""
        with preserved_state(model):
            model.train()
            g = -self.cfg.poisoned_trigger_step * flatten(param_grads(model, self.x_trigger, self.y_trigger))
        return clip_norm(g, self.cfg.clipvalue, float("inf")) if self.cfg.clip_gradnorm else g

    def update(self, model: nn.Module, theta: torch.Tensor, phase: str) -> torch.Tensor:
        """The update sent in this round: one SGD step (momentum kept between rounds), times the boost."""
        memorized = self.remember(theta)
        load_params(model, theta)
        with preserved_state(model):
            g = self.trigger_gradient(model) if phase == TRIGGER else self.accumulative_gradient(model, memorized)
        if self.sgd.weight_decay:
            g = g + self.sgd.weight_decay * theta
        buffer = self.state.buffer
        self.state.buffer = g.clone() if buffer is None or not self.sgd.momentum else buffer * self.sgd.momentum + g
        return (-self.sgd.lr * self.cfg.boost) * self.state.buffer
