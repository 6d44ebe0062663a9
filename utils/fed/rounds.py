"""The rounds of a federated run (SPEC "Federated learning"): accumulative rounds until --rounds or the stop rule,
then the trigger round, each round's record (test error, the attacker's alignment, every update's scores, the
aggregator's weights, timings) appended to rounds.jsonl, and the summary. Who computes the clients' updates is
given: ``InProcessClients`` here, Flower's ClientApps in ``utils.fed.flower``."""
from __future__ import annotations

import copy
import hashlib
import os
import statistics
import time
from typing import Callable

import torch
from tqdm import tqdm

from utils.attack.craft import trigger_alignment
from utils.errors import UserError
from utils.fed.clients import ACCUMULATIVE, TRIGGER, MaliciousClient, local_sgd
from utils.fed.context import FedContext
from utils.fed.scores import mean_aurocs, round_aurocs
from utils.fed.server import Server
from utils.fed.vectors import generator, load_params
from utils.io.results import append_jsonl

Exchange = Callable[[int, str], dict]  # (round, phase) -> the round's record, θ moved


def attacker_for(ctx: FedContext) -> MaliciousClient:
    """The attacker as the run configures it (one for all malicious clients: they send the same update)."""
    return MaliciousClient(ctx.cfg.attack, ctx.cfg.clients, ctx.trigger, ctx.val, ctx.cfg.server.md_memory)


class InProcessClients:
    """Every client's update of a round, computed in this process, in client order (SPEC "Federated learning")."""

    def __init__(self, ctx: FedContext):
        self.ctx, self.model = ctx, copy.deepcopy(ctx.model)
        self.attacker = attacker_for(ctx)

    def attacks(self, k: int, phase: str) -> bool:
        """Whether client k sends the attacker's update (a malicious client trains honestly in the accumulative
        rounds of the --no_poison control)."""
        return k in self.ctx.malicious and (phase == TRIGGER or self.ctx.cfg.attack.poison)

    def client_update(self, k: int, theta: torch.Tensor, t: int, phase: str) -> torch.Tensor:
        """Client k's update: honest local SGD, or the attacker's."""
        c = self.ctx.cfg
        if self.attacks(k, phase):
            return self.attacker.update(self.model, theta, phase)
        return local_sgd(self.model, theta, self.ctx.data.train, self.ctx.shards.clients[k], c.clients,
                         generator(c.run.seed, t, k))

    def updates(self, theta: torch.Tensor, t: int, phase: str) -> torch.Tensor:
        """The round's updates (N x D; the attacker alone under --attacker_only). Malicious clients send the same
        update, computed once."""
        ids = [0] if self.ctx.cfg.attack.attacker_only else range(self.ctx.cfg.clients.clients)
        rows, sent = [], None
        for k in ids:
            attacking = self.attacks(k, phase)
            if attacking and sent is not None:
                rows.append(sent)
                continue
            rows.append(self.client_update(k, theta, t, phase))
            sent = rows[-1] if attacking else sent
        return torch.stack(rows)


def in_process_exchange(server: Server, clients: InProcessClients) -> Exchange:
    """A round computed in this process: the clients' updates, then the server's step."""
    def exchange(t: int, phase: str) -> dict:
        started = time.perf_counter()
        updates = clients.updates(server.theta, t, phase)
        return {"clients_s": time.perf_counter() - started, **server.step(updates, t)}

    return exchange


class FederatedRun:
    """The accumulative rounds, the stop rule and the trigger round of one run (SPEC "Federated learning")."""

    def __init__(self, ctx: FedContext, server: Server, exchange: Exchange, out: str):
        self.ctx, self.server, self.exchange, self.out = ctx, server, exchange, out
        self.probe = copy.deepcopy(ctx.model)

    def alignment(self) -> float:
        """A(g(x_T, y_T), g(x_v, y_v)) at the global θ, in the attacker's mode: what the attack raises."""
        model = load_params(self.probe, self.server.theta).train(self.ctx.cfg.attack.craft_mode == "train")
        return trigger_alignment(model, *self.ctx.trigger, *self.ctx.val)

    def round(self, t: int, phase: str) -> dict:
        """One round: exchange (clients, scores, aggregation), evaluate, record."""
        started = time.perf_counter()
        record = {"t": t, "phase": phase, **self.exchange(t, phase)}
        evaluated = time.perf_counter()
        record["test_err"] = self.server.evaluate(self.ctx.eval_split if phase == ACCUMULATIVE else self.ctx.data.test)
        record["eval_s"] = time.perf_counter() - evaluated
        if not bool(torch.isfinite(self.server.theta).all()):
            raise UserError(f"the global model's weights became NaN/inf in round {t}; lower --lr or --boost, or use "
                            f"--clip_gradnorm")
        attacked = phase == TRIGGER or self.ctx.cfg.attack.poison
        record["malicious"] = self.ctx.malicious if attacked and not self.ctx.cfg.attack.attacker_only else []
        record["alignment"] = self.alignment()
        record["round_s"] = time.perf_counter() - started
        append_jsonl(os.path.join(self.out, "rounds.jsonl"), record)
        return record

    def accumulative(self) -> tuple[list[dict], str]:
        """Rounds until --rounds or the test error exceeds the threshold (read after every --stop_every-th round)."""
        records = []
        with tqdm(total=self.ctx.cfg.server.rounds, desc="rounds", dynamic_ncols=True, disable=None) as bar:
            for t in range(1, self.ctx.cfg.server.rounds + 1):
                records.append(self.round(t, ACCUMULATIVE))
                bar.update(1)
                bar.set_postfix(err=f"{records[-1]['test_err']:.4f}")
                checked = t % self.ctx.cfg.server.stop_every == 0
                if checked and self.ctx.threshold is not None and records[-1]["test_err"] > self.ctx.threshold:
                    return records, "threshold"
        return records, "rounds"

    def run(self) -> dict:
        """The whole run; returns the summary."""
        started = time.time()
        err_start, alignment_start = self.server.evaluate(self.ctx.data.test), self.alignment()
        records, stop = self.accumulative()
        err_before = self.server.evaluate(self.ctx.data.test)
        trigger = self.round(len(records) + 1, TRIGGER)
        return summary(self.ctx, records, trigger, {
            "err_start": err_start, "err_before_trigger": err_before, "err_after_trigger": trigger["test_err"],
            "delta": trigger["test_err"] - err_before, "delta_vs_start": trigger["test_err"] - err_start,
            "rounds": len(records), "stop_reason": stop, "threshold": self.ctx.threshold,
            "alignment_start": alignment_start, "alignment_before_trigger": records[-1]["alignment"] if records
            else alignment_start, "global_sha256": digest(self.server.theta), "total_seconds": time.time() - started})


def digest(theta: torch.Tensor) -> str:
    """SHA-256 of the global model's parameters (float32 bytes): two runs end with the same model iff equal."""
    return hashlib.sha256(theta.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


COSTS = ("clients_s", "scores_s", "aggregate_s", "eval_s", "round_s")


def summary(ctx: FedContext, records: list[dict], trigger: dict, figures: dict) -> dict:
    """summary.json: the figures, the per-score AUROCs (accumulative rounds: the mean of each round's; the trigger
    round's), and the median cost of an accumulative round and of its parts."""
    poisoned = [r for r in records if r["malicious"]]
    return {**figures,
            "auroc_accumulative": mean_aurocs([round_aurocs(r["scores"], r["malicious"]) for r in poisoned]),
            "auroc_trigger": round_aurocs(trigger["scores"], trigger["malicious"]),
            "costs": {k: statistics.median(r[k] for r in records) if records else None for k in COSTS},
            "trigger_round_s": trigger["round_s"]}
