"""The server (SPEC "Federated learning"): the global model θ and the models it memorized, the round's view of the
updates (its root update for FLTrust, each update's MD for the MD screen), the scores, the aggregator, and the step
θ ← θ + η·AGG(Δ_1 … Δ_N). The same object serves the in-process loop and the Flower ServerApp."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from utils.core.data import Split
from utils.core.discrepancy import md_from_logits
from utils.core.train import evaluate
from utils.fed.aggregators import Aggregator, RoundView, aggregator_class
from utils.fed.clients import local_sgd
from utils.fed.config import FedConfig
from utils.fed.scores import update_scores
from utils.fed.vectors import ROOT_KEY, generator, load_params, param_vector


class Server:
    """The global model and the aggregation of every round."""

    def __init__(self, cfg: FedConfig, model: nn.Module, root: Split):
        self.cfg, self.root = cfg, root
        self.model = copy.deepcopy(model).eval()  # the global model (BN statistics: the checkpoint's)
        self.scratch = copy.deepcopy(model)  # candidates θ + Δ_k, the root update, the memorized model
        self.memorized_model = copy.deepcopy(model).eval()
        self.history = [param_vector(model)]
        self.x_root = root.batch(torch.arange(len(root)))[0]
        self.aggregator: Aggregator = aggregator_class(cfg.server.aggregator).build(cfg.server)

    @property
    def theta(self) -> torch.Tensor:
        return self.history[-1]

    def memorized(self) -> torch.Tensor:
        """θ_mem: the global model --md_memory rounds before the current one (the starting model before that)."""
        return self.history[max(0, len(self.history) - 1 - self.cfg.server.md_memory)]

    def root_update(self, t: int) -> torch.Tensor:
        """g_0: the server's own update on its root batch, trained as an honest client trains (FLTrust)."""
        return local_sgd(self.scratch, self.theta, self.root, torch.arange(len(self.root)), self.cfg.clients,
                         generator(self.cfg.run.seed, t, ROOT_KEY))

    @torch.no_grad()
    def discrepancies(self, updates: torch.Tensor) -> torch.Tensor:
        """MD_k = mean_x KL(p(x; θ_mem) ‖ p(x; θ + Δ_k)) on the root batch, every model in eval mode."""
        logits_mem = load_params(self.memorized_model, self.memorized())(self.x_root)
        self.scratch.eval()
        out = [md_from_logits(load_params(self.scratch, self.theta + u)(self.x_root), logits_mem).clamp_min(0).mean()
               for u in updates]
        return torch.stack(out)

    def view(self, updates: torch.Tensor, t: int) -> RoundView:
        return RoundView(updates, root_fn=lambda: self.root_update(t), md_fn=lambda: self.discrepancies(updates))

    def step(self, updates: torch.Tensor, t: int) -> dict:
        """Score every update, aggregate, move θ; returns the round's record (scores, weights, timings)."""
        started = time.perf_counter()
        view = self.view(updates, t)
        scores = update_scores(view, self.cfg.server.krum_f)
        scored = time.perf_counter()
        agg = self.aggregator(view)
        self.history = (self.history + [self.theta + self.cfg.server.server_lr * agg.update])[
            -(self.cfg.server.md_memory + 1):]
        load_params(self.model, self.theta)
        done = time.perf_counter()
        return {"scores": scores, "weights": [float(w) for w in agg.weights], **agg.info,
                "update_norm": float(torch.linalg.vector_norm(agg.update)), "scores_s": scored - started,
                "aggregate_s": done - scored}

    def evaluate(self, split: Split) -> float:
        return evaluate(self.model, split, self.cfg.server.eval_batch_size)
