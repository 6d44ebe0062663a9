"""The clients' data (SPEC "Federated learning", the protocol): the server's clean root batch held out of the
training set, the rest shared among the clients in equal random shards (IID) or by per-class Dirichlet(α)
proportions (non-IID)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from utils.errors import UserError


@dataclass(frozen=True)
class Shards:
    """Training-set indices: the server's root batch and each client's shard."""

    root: torch.Tensor
    clients: list[torch.Tensor]


def split_data(labels: torch.Tensor, clients: int, root_size: int, how: str, alpha: float, seed: int) -> Shards:
    """Hold out ``root_size`` samples for the server, share the rest among ``clients`` (SPEC "Federated
    learning"); the same seed gives the same shards in every process."""
    n = len(labels)
    if root_size + clients > n:
        raise UserError(f"--root_size {root_size} and {clients} clients need more than the {n} training samples; "
                        f"use a smaller --root_size or fewer --clients")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    root, rest = order[:root_size], order[root_size:]
    if how == "iid":
        return Shards(root, list(rest.tensor_split(clients)))
    shards = dirichlet_shards(labels[rest], rest, clients, alpha, np.random.default_rng(seed))
    empty = [k for k, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise UserError(f"the Dirichlet({alpha:g}) split left client {empty[0]} with no samples "
                        f"({len(empty)} empty in all); use a larger --alpha or fewer --clients")
    return Shards(root, shards)


def dirichlet_shards(labels: torch.Tensor, indices: torch.Tensor, clients: int, alpha: float,
                     rng: np.random.Generator) -> list[torch.Tensor]:
    """Per class c: proportions p ~ Dirichlet(α, ..., α) over the clients, and client k gets the k-th slice of
    class c's samples (in their shuffled order) of size ≈ p_k x n_c (SPEC "Federated learning")."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(clients)]
    for c in torch.unique(labels).tolist():
        members = indices[labels == c]
        p = rng.dirichlet(np.full(clients, alpha))
        cuts = np.round(np.cumsum(p)[:-1] * len(members)).astype(int).tolist()
        for k, piece in enumerate(np.split(np.arange(len(members)), cuts)):
            parts[k].append(members[torch.as_tensor(piece, dtype=torch.long)])
    return [torch.cat(p) for p in parts]
