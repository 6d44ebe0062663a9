"""A model's trainable parameters as one flat vector (what a client sends and the server aggregates), loading one
back, and the seed of every per-round draw (SPEC "Federated learning": only trainable parameters are federated)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from utils.core.grads import Grads, trainable_params

ROOT_KEY, TRIGGER_KEY = 2 ** 31 - 1, 2 ** 31 - 2  # the draws of the server's root update and of the trigger batch


def param_vector(model: nn.Module) -> torch.Tensor:
    """θ: the trainable parameters, flattened and concatenated in the model's order (a detached copy)."""
    return torch.cat([p.detach().reshape(-1) for p in trainable_params(model)])


def flatten(grads: Grads) -> torch.Tensor:
    """One flat vector from per-tensor gradients (the order of ``trainable_params``)."""
    return torch.cat([g.reshape(-1) for g in grads])


@torch.no_grad()
def load_params(model: nn.Module, theta: torch.Tensor) -> nn.Module:
    """Copy the flat vector θ into the model's trainable parameters (buffers untouched); returns the model."""
    params = trainable_params(model)
    for p, chunk in zip(params, theta.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))
    return model


def draw_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one draw of the run (e.g. client k's batches in round t), the same in every process."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def generator(seed: int, *keys: int) -> torch.Generator:
    """A torch generator for one draw (``draw_seed``)."""
    return torch.Generator().manual_seed(draw_seed(seed, *keys))
