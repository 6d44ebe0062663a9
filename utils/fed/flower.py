"""The federated rounds on Flower (SPEC "Federated learning", two ways to run): a Flower ``ServerApp`` whose strategy
is our aggregator (``FederatedStrategy``: it sends the global θ to every node, checks that every client answered,
and aggregates with the run's ``Server``), and a ``ClientApp`` that is our honest or malicious client (the same
``InProcessClients.client_update``; the attacker's state lives in the node's ``Context.state``). Run by
``flwr.simulation.run_simulation`` (--flower), or by Flower's deployment runtime: the app in flower-app/
(``build_server_app``, ``build_client_app``) on a SuperLink and SuperNodes the user started (--flower_superlink,
``utils.fed.deploy``; or ``flwr run``). With ``utils.fed.deploy`` the only modules that import flwr, and only when
asked for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shlex
import time
import warnings
from typing import Any, Callable, Iterable

import torch

from utils.errors import UserError
from utils.fed.clients import AttackerState
from utils.fed.config import FedConfig
from utils.fed.context import FedContext, build_context
from utils.fed.flags import parse_config
from utils.fed.rounds import Exchange, FederatedRun, InProcessClients
from utils.fed.server import Server

INSTALL = "pip install -r requirements-flower.txt"
CLIENT_MODS: list[Callable] = []  # Flower mods wrapped around every ClientApp this process builds (e.g. a fault)
NODE_PATHS = ("resume", "dataroot")  # a SuperNode's --node-config may say where these are on its machine


def require_flower(simulation: bool = True) -> None:
    """flwr (and its simulation engine for --flower), or one line saying how to install them."""
    try:
        import flwr  # noqa: F401
        if simulation:
            import flwr.simulation  # noqa: F401
            import ray  # noqa: F401
    except ImportError as e:
        flag, what = ("--flower", "Flower and its simulation engine") if simulation else ("--flower_superlink",
                                                                                          "Flower")
        raise UserError(f"{flag} needs {what}, which {'are' if simulation else 'is'} not installed ({e}); run "
                        f"`{INSTALL}`") from None


def worker_config(cfg: FedConfig) -> FedConfig:
    """The configuration a ClientApp rebuilds its parts from: paths made absolute (a worker may start elsewhere)."""
    run = dataclasses.replace(cfg.run, resume=os.path.abspath(cfg.run.resume),
                              dataroot=os.path.abspath(cfg.run.dataroot), out=None)
    return dataclasses.replace(cfg, run=run)


_WORKER: dict[str, InProcessClients] = {}  # per worker process: the clients of each configuration, built once


def node_paths(text: str, node_config: Any) -> str:
    """The configuration with the paths a SuperNode's --node-config gives (resume=..., dataroot=...: where the
    checkpoint folder and the data are on that node's machine), relative ones from the SuperNode's folder."""
    given = {k: os.path.abspath(str(node_config[k])) for k in NODE_PATHS if k in (node_config or {})}
    if not given:
        return text
    cfg = json.loads(text)
    cfg["run"].update(given)
    return json.dumps(cfg)


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
    clients = worker_clients(node_paths(str(config["fed"]), context.node_config))
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


def lost_clients(replies: list[Any], sent: dict[str, int], n: int, t: int, timeout: float) -> dict[int, Any]:
    """The update of each client from its reply; one UserError naming every client that sent none (``sent``: the
    id of the message each client was sent, which an error reply, the node's or the SuperLink's, answers)."""
    got, lost = {}, []
    for msg in replies:
        if msg.has_error():
            k = sent.get(msg.metadata.reply_to_message_id, "?")
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
            self.server, self.cfg, self.nodes, self.record, self.sent = server, cfg, nodes, {}, []
            self.text = json.dumps(worker_config(cfg).to_dict())

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
            self.sent = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                {**dict(config), "client": k, "fed": self.text})}), dst_node_id=node, message_type="train",
                group_id=str(server_round)) for k, node in enumerate(self.nodes)]
            return self.sent  # the Grid gives each its id as it sends it

        def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
            sent = {m.metadata.message_id: k for k, m in enumerate(self.sent)}
            got = lost_clients(list(replies), sent, len(self.nodes), server_round, self.cfg.flower.timeout)
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


def wait_for_nodes(grid: Any, n: int, timeout: float, deployed: bool = False) -> list[int]:
    """The first n node ids (sorted: client k is always the same node, which keeps its state)."""
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.time() > deadline:
            if deployed:
                raise UserError(f"{len(nodes)} of the {n} SuperNodes the run needs (one per client) connected to "
                                f"the SuperLink within --flower_timeout {timeout:g} s; start {n - len(nodes)} more "
                                f"(docs/FEDERATED.md, \"Flower's deployment runtime\")")
            raise UserError(f"Flower started {len(nodes)} of the {n} client nodes within --flower_timeout "
                            f"{timeout:g} s")
        time.sleep(0.2)
    return nodes[:n]


def flower_rounds(ctx: FedContext, server: Server, out: str, grid: Any, deployed: bool = False) -> dict:
    """Every round, the clients reached through a Flower Grid; returns the summary (SPEC "Federated learning")."""
    nodes = wait_for_nodes(grid, ctx.cfg.participants(), ctx.cfg.flower.timeout, deployed)
    strategy = strategy_class()(server, ctx.cfg, nodes)
    return FederatedRun(ctx, server, flower_exchange(strategy, grid), out).run()


def app_config(run_config: Any) -> FedConfig:
    """The run's configuration from the app's run config: ``config`` (the JSON that --flower_superlink sends) or
    ``args`` (feder_accu_train.py's flags, as a ``flwr run --run-config 'args="..."'`` user writes them)."""
    text, args, err = str(run_config.get("config", "")), str(run_config.get("args", "")), io.StringIO()
    if text:
        return FedConfig.from_dict(json.loads(text))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            return parse_config(shlex.split(args))
    except (SystemExit, ValueError) as e:
        if isinstance(e, UserError):
            raise
        why = (err.getvalue().strip().splitlines() or [str(e)])[-1]
        raise UserError(f"the run config's args must be feder_accu_train.py's flags: {why}") from None


def build_server_app(run: Callable[..., dict]) -> Any:
    """Our server as a Flower ServerApp for the deployment runtime: ``run(config, grid=grid)`` (the federated run,
    ``utils.fed.run.run_federated``) with the configuration of the app's run config."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        run(app_config(context.run_config), grid=grid)

    return app


def run_on_flower(ctx: FedContext, server: Server, out: str) -> dict:
    """Every round of the run on Flower's simulation engine; returns the summary (SPEC "Federated learning")."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    n, result = ctx.cfg.participants(), {}
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        result["summary"] = flower_rounds(ctx, server, out, grid)

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
