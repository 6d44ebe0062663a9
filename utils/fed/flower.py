"""The federated rounds on Flower (SPEC "Federated learning", two ways to run): a Flower ``ServerApp`` whose strategy
is our aggregator (``FederatedStrategy``: it sends the global θ to every node, checks that every client answered,
and aggregates with the run's ``Server``), and a ``ClientApp`` that is our honest or malicious client (the same
``InProcessClients.client_update``; the attacker's state lives in the node's ``Context.state``), run by
``flwr.simulation.run_simulation``. The only module that imports flwr, and only when --flower asks for it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any, Callable, Iterable

import torch

from utils.errors import UserError
from utils.fed.clients import AttackerState
from utils.fed.config import FedConfig
from utils.fed.context import FedContext, build_context
from utils.fed.rounds import Exchange, FederatedRun, InProcessClients
from utils.fed.server import Server

INSTALL = "pip install -r requirements-flower.txt"
CLIENT_MODS: list[Callable] = []  # Flower mods wrapped around every ClientApp this process builds (e.g. a fault)


def require_flower() -> None:
    """flwr and its simulation engine, or one line saying how to install them."""
    try:
        import flwr  # noqa: F401
        import flwr.simulation  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        raise UserError(f"--flower needs Flower and its simulation engine, which are not installed ({e}); run "
                        f"`{INSTALL}`") from None


def worker_config(cfg: FedConfig) -> FedConfig:
    """The configuration a ClientApp rebuilds its parts from: paths made absolute (a worker may start elsewhere)."""
    run = dataclasses.replace(cfg.run, resume=os.path.abspath(cfg.run.resume),
                              dataroot=os.path.abspath(cfg.run.dataroot), out=None)
    return dataclasses.replace(cfg, run=run)


_WORKER: dict[str, InProcessClients] = {}  # per worker process: the clients of each configuration, built once


def worker_clients(text: str) -> InProcessClients:
    """The clients of a configuration (its data loaded, its shards drawn) in this worker process."""
    if text not in _WORKER:
        _WORKER.clear()
        _WORKER[text] = InProcessClients(build_context(FedConfig.from_dict(json.loads(text))))
    return _WORKER[text]


def save_state(state: AttackerState) -> Any:
    """The attacker's state as an ArrayRecord (momentum buffer, the global models it received, in order)."""
    from flwr.app import Array, ArrayRecord

    arrays = {f"received_{i:06d}": Array(t.cpu().numpy()) for i, t in enumerate(state.received)}
    if state.buffer is not None:
        arrays["buffer"] = Array(state.buffer.cpu().numpy())
    return ArrayRecord(arrays)


def load_state(record: Any, device: torch.device) -> AttackerState:
    """The inverse of ``save_state`` (an empty state when the node holds none yet)."""
    if record is None:
        return AttackerState()
    tensor = lambda name: torch.from_numpy(record[name].numpy().copy()).to(device)  # noqa: E731
    received = [tensor(k) for k in sorted(record.keys()) if k.startswith("received_")]
    return AttackerState(tensor("buffer") if "buffer" in record else None, received)


def client_train(message: Any, context: Any) -> Any:
    """A ClientApp's train handler: client k's update of round t (honest or malicious), as in this process."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    config = message.content["config"]
    clients = worker_clients(str(config["fed"]))
    k, t, phase = int(config["client"]), int(config["round"]), str(config["phase"])
    device = clients.ctx.device
    theta = torch.from_numpy(message.content["arrays"]["theta"].numpy().copy()).to(device)
    malicious = clients.attacks(k, phase)
    if malicious:
        clients.attacker.state = load_state(context.state.get("attacker"), device)
    delta = clients.client_update(k, theta, t, phase)
    if malicious:
        context.state["attacker"] = save_state(clients.attacker.state)
    return Message(RecordDict({"update": ArrayRecord({"delta": Array(delta.cpu().numpy())}),
                               "metrics": MetricRecord({"client": k})}), reply_to=message)


def build_client_app() -> Any:
    """Our clients as one Flower ClientApp (the message says which client it is), with CLIENT_MODS around it."""
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=list(CLIENT_MODS))
    app.train()(client_train)
    return app


def lost_clients(replies: list[Any], nodes: list[int], n: int, t: int, timeout: float) -> dict[int, Any]:
    """The update of each client from its reply; one UserError naming every client that sent none."""
    got, lost = {}, []
    for msg in replies:
        if msg.has_error():
            k = nodes.index(msg.metadata.src_node_id) if msg.metadata.src_node_id in nodes else "?"
            lost.append(f"client {k}: {str(msg.error.reason).strip().splitlines()[-1][:200]}")
        else:
            got[int(msg.content["metrics"]["client"])] = msg.content["update"]["delta"].numpy()
    lost += [f"client {k}: no reply within --flower_timeout {timeout:g} s" for k in range(n)
             if k not in got and not any(s.startswith(f"client {k}:") for s in lost)]
    if lost:
        raise UserError(f"Flower lost {len(lost)} of the {n} clients in round {t} ({'; '.join(lost[:3])}); the round "
                        f"was not aggregated: rounds.jsonl keeps the rounds before it, no summary.json was written")
    return got


def strategy_class() -> type:
    """``FederatedStrategy``, a ``flwr.serverapp.strategy.Strategy`` (defined once flwr is importable)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import Strategy

    class FederatedStrategy(Strategy):
        """Our aggregator as a Flower strategy: every node trains every round; the replies are checked (a lost
        client stops the run) and aggregated by the run's Server (scores, --aggregator, θ ← θ + η·AGG)."""

        def __init__(self, server: Server, cfg: FedConfig, nodes: list[int]):
            self.server, self.cfg, self.nodes, self.record = server, cfg, nodes, {}
            self.text = json.dumps(worker_config(cfg).to_dict())

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
            return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                {**dict(config), "client": k, "fed": self.text})}), dst_node_id=node, message_type="train",
                group_id=str(server_round)) for k, node in enumerate(self.nodes)]

        def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
            got = lost_clients(list(replies), self.nodes, len(self.nodes), server_round, self.cfg.flower.timeout)
            updates = torch.stack([torch.from_numpy(got[k].copy()) for k in range(len(self.nodes))])
            self.record = self.server.step(updates.to(self.server.theta.device), server_round)
            return (ArrayRecord({"theta": Array(self.server.theta.cpu().numpy())}),
                    MetricRecord({"update_norm": self.record["update_norm"]}))

        def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
            return []  # the server evaluates the global model itself

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
            return None

        def summary(self) -> None:
            logging.getLogger("flwr").info("FederatedStrategy: --aggregator %s over %d clients",
                                           self.cfg.server.aggregator, len(self.nodes))

    return FederatedStrategy


def flower_exchange(strategy: Any, grid: Any) -> Exchange:
    """A round on Flower: the strategy's messages out, the replies back, the strategy's aggregation."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    def exchange(t: int, phase: str) -> dict:
        started = time.perf_counter()
        arrays = ArrayRecord({"theta": Array(strategy.server.theta.cpu().numpy())})
        messages = strategy.configure_train(t, arrays, ConfigRecord({"round": t, "phase": phase}), grid)
        replies = list(grid.send_and_receive(messages, timeout=strategy.cfg.flower.timeout))
        received = time.perf_counter()
        strategy.aggregate_train(t, replies)
        return {**strategy.record, "clients_s": received - started}

    return exchange


def wait_for_nodes(grid: Any, n: int, timeout: float) -> list[int]:
    """The first n node ids (sorted: client k is always the same node, which keeps its state)."""
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.time() > deadline:
            raise UserError(f"Flower started {len(nodes)} of the {n} client nodes within --flower_timeout {timeout:g} s")
        time.sleep(0.2)
    return nodes[:n]


def run_on_flower(ctx: FedContext, server: Server, out: str) -> dict:
    """Every round of the run on Flower's simulation engine; returns the summary (SPEC "Federated learning")."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    n, result = ctx.cfg.participants(), {}
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        strategy = strategy_class()(server, ctx.cfg, wait_for_nodes(grid, n, ctx.cfg.flower.timeout))
        result["summary"] = FederatedRun(ctx, server, flower_exchange(strategy, grid), out).run()

    if ctx.device.type == "cuda" and not ctx.cfg.flower.gpus:
        raise UserError("--flower on a GPU needs --flower_gpus (the GPU share of one ClientApp, e.g. 0.1)")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # its deprecation notices; errors still show
    resources = {"num_cpus": ctx.cfg.flower.cpus, "num_gpus": ctx.cfg.flower.gpus}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
        run_simulation(server_app=app, client_app=build_client_app(), num_supernodes=n,
                       backend_config={"client_resources": resources, "init_args": {"logging_level": "ERROR"}})
    if "summary" not in result:
        raise UserError("the Flower simulation ended before the run finished (see Flower's log above)")
    return result["summary"]
