"""The online stream (SPEC "Phase 2", quirk 1): the trigger's base batch, the arriving batches, which of
their samples the attacker poisons (SPEC "The attack", --poison_scale), the equal-size noise control, and
``Arrival``, one arriving batch as the attacker, the defender and the measurements see it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch

from utils.core.data import DatasetInfo, Split, augment_batch
from utils.errors import UserError
from utils.core.grads import project_linf


class Stream:
    """The trigger's base batch and the arriving batches, drawn from the training split.

    Default: a real stream of distinct batches (batch 0 of the order is the trigger, batches 1, 2, ...
    arrive). ``reuse_first``: the authors' quirk, every arriving batch is batch 0 again, re-augmented.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, reuse_first: bool,
                 augment: DatasetInfo | None, generator: torch.Generator):
        if batch_size > len(split) // 2 and not reuse_first:
            raise UserError(f"--batch_size {batch_size} leaves fewer than two batches in the training data "
                            f"({len(split)} samples); use a smaller --batch_size")
        if batch_size > len(split):
            raise UserError(f"--batch_size {batch_size} is larger than the training data ({len(split)} samples)")
        self.split, self.batch_size, self.reuse_first = split, batch_size, reuse_first
        self.augment, self.generator = augment, generator
        self.order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
        self.num_batches = len(split) // batch_size

    def indices(self, k: int) -> torch.Tensor:
        """Sample indices of batch k of the order (k = 0: the trigger's base batch)."""
        return self.order[k * self.batch_size:(k + 1) * self.batch_size]

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch k of the order, augmented when the stream augments (a draw from the stream's generator)."""
        x, y = self.split.batch(self.indices(k))
        if self.augment is not None:
            x = augment_batch(x, self.augment, self.generator)
        return x, y

    def batch_index(self, t: int) -> int:
        """Which batch of the order arrives at step t (distinct batches wrap round after one pass)."""
        return 0 if self.reuse_first else 1 + t % (self.num_batches - 1)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        t = 0
        while True:
            k = self.batch_index(t)
            yield (k, *self.get(k))
            t += 1


def poison_mask(n: int, scale: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Positions poisoned in every batch: the first ⌊p·n⌋ of a seeded permutation (SPEC "The attack", step 2)."""
    keep_clean = torch.randperm(n, generator=generator)[int(scale * n):]
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep_clean] = False
    return mask.to(device)


def mix(poisoned: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The poisoned samples where ``mask`` is set, the clean ones elsewhere."""
    return torch.where(mask.view(-1, *([1] * (clean.dim() - 1))), poisoned, clean)


def sign_noise(x: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """x + ε·(random ±1 per pixel), in [0, 1]: the equal-size-perturbation control for the detectors."""
    signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype).mul_(2).sub_(1)
    return project_linf(x + epsilon * signs, x, epsilon)


@dataclass
class Arrival:
    """One arriving batch (SPEC "Phase 2"): clean, as the learner receives it, and the ±ε noise control."""

    t: int  # its index in the stream
    k: int  # which batch of the stream's order it is
    x: torch.Tensor  # clean
    y: torch.Tensor
    x_in: torch.Tensor  # what the learner receives: poisoned where ``mask`` is set
    mask: torch.Tensor
    epsilon: float
    noise_generator: torch.Generator

    @cached_property
    def noisy(self) -> torch.Tensor:
        """The clean batch under random ±ε sign noise where ``mask`` is set (drawn once, when first asked)."""
        return mix(sign_noise(self.x, self.epsilon, self.noise_generator), self.x, self.mask)
