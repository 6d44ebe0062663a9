"""The server's aggregation rules (SPEC "Federated learning", the aggregators), one class each with one call shape,
``aggregator(view) -> Aggregate``, registered in ``AGGREGATORS`` under their --aggregator name, as the defenders are
in ``utils.defense.defenders``. ``view`` is the round as the server sees it (``RoundView``): the N updates, and
lazily what the server can compute from its own clean root batch (the root update, each update's MD).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch

from utils.errors import UserError


@dataclass
class RoundView:
    """One round's updates (N x D) and the server's lazily computed extras; every computed part is cached."""

    updates: torch.Tensor
    root_fn: Callable[[], torch.Tensor] | None = None  # the server's own update on its root batch (FLTrust)
    md_fn: Callable[[], torch.Tensor] | None = None  # each update's MD on the root batch (the MD screen)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def _get(self, name: str, fn: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        if name not in self.cache:
            if fn is None:
                raise ValueError(f"this round view cannot compute {name}")
            self.cache[name] = fn()
        return self.cache[name]

    def root_update(self) -> torch.Tensor:
        return self._get("root_update", self.root_fn)

    def md(self) -> torch.Tensor:
        return self._get("md", self.md_fn)

    @cached_property
    def norms(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.updates, dim=1)

    @cached_property
    def sq_distances(self) -> torch.Tensor:
        """‖Δ_i − Δ_j‖² for every pair (float64 sums: the ranking of close updates is stable)."""
        u = self.updates.double()
        return torch.cdist(u, u).pow(2)


@dataclass
class Aggregate:
    """An aggregator's answer: the aggregated update, each update's weight in it, and facts to log."""

    update: torch.Tensor
    weights: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Aggregator:
    """An aggregation rule: ``build(settings)`` from the server's configuration, ``check(settings, n)`` refuses a
    round of n updates it cannot aggregate (one UserError line), ``__call__(view)`` aggregates."""

    name = "aggregator"

    def __init__(self, settings: Any = None):
        self.settings = settings

    @classmethod
    def build(cls, settings: Any) -> "Aggregator":
        return cls(settings)

    @classmethod
    def min_updates(cls, settings: Any) -> tuple[int, str]:
        """The fewest updates a round may have, and why."""
        return 1, "one update"

    @classmethod
    def check(cls, settings: Any, n: int) -> None:
        need, why = cls.min_updates(settings)
        if n < need:
            raise UserError(f"--aggregator {cls.name} needs at least {need} updates per round ({why}), but a round "
                            f"has {n}; use more --clients or another --aggregator")

    def __call__(self, view: RoundView) -> Aggregate:
        raise NotImplementedError


def mean_of(view: RoundView, weights: torch.Tensor) -> Aggregate:
    """Σ_k w_k Δ_k for weights that sum to 1 (0 where an update is left out)."""
    return Aggregate(weights.to(view.updates.dtype) @ view.updates, weights)


class FedAvg(Aggregator):
    """The mean of the updates (McMahan et al. 2017; equal shards, so equal weights)."""

    name = "fedavg"

    def __call__(self, view: RoundView) -> Aggregate:
        n = len(view.updates)
        return mean_of(view, torch.full((n,), 1.0 / n))


class NormClip(Aggregator):
    """Each update scaled to L2 norm ≤ τ, then the mean (Sun et al. 2019); τ = --clip_norm, or the round's median
    update norm when that is 0."""

    name = "clip"

    def __call__(self, view: RoundView) -> Aggregate:
        norms = view.norms
        tau = self.settings.clip_norm if self.settings.clip_norm else norms.median().item()
        scale = torch.where(norms > tau, tau / norms.clamp_min(1e-30), torch.ones_like(norms))
        agg = mean_of(view, scale / len(norms))
        agg.info["clip_norm"] = tau
        return agg


def sorted_updates(view: RoundView) -> torch.Tensor:
    return view.updates.sort(dim=0).values


class Median(Aggregator):
    """The coordinate-wise median (Yin et al. 2018; the mean of the two middle values when N is even)."""

    name = "median"

    def __call__(self, view: RoundView) -> Aggregate:
        s, n = sorted_updates(view), len(view.updates)
        return Aggregate((s[(n - 1) // 2] + s[n // 2]) / 2, torch.full((n,), float("nan")))


class TrimmedMean(Aggregator):
    """The coordinate-wise β-trimmed mean (Yin et al. 2018): drop the ⌊βN⌋ largest and smallest values of every
    coordinate, average the rest."""

    name = "trimmed_mean"

    def __call__(self, view: RoundView) -> Aggregate:
        n = len(view.updates)
        k = math.floor(self.settings.trim * n + 1e-9)
        return Aggregate(sorted_updates(view)[k:n - k].mean(dim=0), torch.full((n,), float("nan")), {"trimmed": k})


def krum_scores(view: RoundView, f: int) -> torch.Tensor:
    """Krum's score of each update: the sum of its squared distances to its N − f − 2 nearest other updates
    (Blanchard et al. 2017); at least 1 neighbour, at most N − 1."""
    n = len(view.updates)
    k = min(max(n - f - 2, 1), n - 1)
    if k < 1:
        return torch.zeros(n, dtype=torch.float64)
    d = view.sq_distances + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64))
    return d.topk(k, dim=1, largest=False).values.sum(dim=1)


class Krum(Aggregator):
    """The single update with the lowest Krum score (Blanchard et al. 2017); survives f malicious of N ≥ 2f + 3."""

    name = "krum"

    @classmethod
    def min_updates(cls, settings: Any) -> tuple[int, str]:
        return 2 * settings.krum_f + 3, f"N >= 2f + 3 with --krum_f {settings.krum_f}"

    def chosen(self, view: RoundView) -> torch.Tensor:
        """The indices averaged: the m lowest scores (ties: the lower index)."""
        scores, m = krum_scores(view, self.settings.krum_f), self.count(len(view.updates))
        return torch.argsort(scores, stable=True)[:m]

    def count(self, n: int) -> int:
        return 1

    def __call__(self, view: RoundView) -> Aggregate:
        chosen, n = self.chosen(view), len(view.updates)
        weights = torch.zeros(n)
        weights[chosen] = 1.0 / len(chosen)
        return mean_of(view, weights)


class MultiKrum(Krum):
    """The mean of the m updates with the lowest Krum scores (Blanchard et al. 2017); m = --multikrum_m or N − f."""

    name = "multikrum"

    @classmethod
    def min_updates(cls, settings: Any) -> tuple[int, str]:
        need, why = super().min_updates(settings)
        if settings.multikrum_m > need:
            return settings.multikrum_m, f"it averages --multikrum_m {settings.multikrum_m} of them"
        return need, why

    def count(self, n: int) -> int:
        return self.settings.multikrum_m or n - self.settings.krum_f


def cosines(updates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """cos(Δ_k, reference) for every update (0 for a zero vector)."""
    norms = torch.linalg.vector_norm(updates, dim=1) * torch.linalg.vector_norm(reference)
    return (updates @ reference) / norms.clamp_min(1e-30)


class FLTrust(Aggregator):
    """FLTrust (Cao et al. 2021): trust TS_k = ReLU(cos(Δ_k, g_0)) with g_0 the server's own update on its clean root
    batch; every update rescaled to ‖g_0‖; the aggregate is Σ TS_k·Δ̄_k / Σ TS_k (zero when no update is trusted)."""

    name = "fltrust"

    def __call__(self, view: RoundView) -> Aggregate:
        g0 = view.root_update()
        trust = cosines(view.updates, g0).clamp_min(0.0)
        scale = torch.linalg.vector_norm(g0) / view.norms.clamp_min(1e-30)
        total = trust.sum()
        weights = trust * scale / total if total > 0 else torch.zeros_like(trust)
        agg = mean_of(view, weights)
        agg.info["trusted"] = int((trust > 0).sum())
        return agg


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """(v − median) / (1.4826·MAD) per value; with MAD = 0, 0 for the values at the median and ±inf for the rest."""
    v = values.double()
    med = v.median()
    mad = (v - med).abs().median()
    if mad > 0:
        return (v - med) / (1.4826 * mad)
    return torch.where(v == med, torch.zeros_like(v), torch.sign(v - med) * float("inf"))


class MDScreen(Aggregator):
    """Ours (SPEC "Federated learning", the MD screen): each update's Memorization Discrepancy on the server's clean
    batch, MD_k = mean_x KL(p(x; θ_mem) ‖ p(x; θ + Δ_k)); updates with |robust z(MD_k)| > τ are dropped (at most
    ⌊(N − 1)/2⌋, the farthest first), the rest averaged."""

    name = "md_screen"

    @classmethod
    def min_updates(cls, settings: Any) -> tuple[int, str]:
        return 3, "a median and a spread of the round's MD"

    def __call__(self, view: RoundView) -> Aggregate:
        z = robust_z(view.md()).abs()
        n = len(z)
        flagged = torch.argsort(-z, stable=True)[:(n - 1) // 2]
        dropped = flagged[z[flagged] > self.settings.md_threshold]
        weights = torch.ones(n)
        weights[dropped] = 0.0
        agg = mean_of(view, weights / weights.sum())
        agg.info["dropped"] = sorted(dropped.tolist())
        return agg


AGGREGATORS: dict[str, type[Aggregator]] = {c.name: c for c in (FedAvg, NormClip, Median, TrimmedMean, Krum, MultiKrum,
                                                                   FLTrust, MDScreen)}


def aggregator_class(name: str) -> type[Aggregator]:
    """The registered aggregator of a --aggregator name (with what a user registered)."""
    if name not in AGGREGATORS:
        raise UserError(f"unknown --aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]
