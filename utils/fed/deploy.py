"""Flower's deployment runtime from the submitting side (SPEC "Federated learning", two ways to run; docs/FEDERATED.md,
"Flower's deployment runtime"): ``feder_accu_train.py --flower_superlink HOST:PORT`` sends the app in flower-app/
(as a Flower App Bundle) and the run's configuration (its run config) to a SuperLink the user started, waits for the
run, and turns what Flower reports into the project's one-line errors. The ServerApp it starts on the SuperLink
calls ``run_federated`` with its Grid, so the results are the files of the same ``FederatedRun``. Imports flwr
only when called (``utils.fed.flower`` is the other module that does).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import ssl
import time
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.fed.config import FlowerConfig
from utils.fed.context import FedContext
from utils.fed.flower import worker_config
from utils.io.results import read_json

APP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "flower-app")
HOW = "docs/FEDERATED.md, \"Flower's deployment runtime\""
POLL_S = 1.0  # how often the run's status is asked for


def start_hint(flower: FlowerConfig) -> str:
    """How to start the SuperLink that --flower_superlink names."""
    host, _, port = (flower.superlink or "").rpartition(":")
    tls = "--ssl-certfile CERT --ssl-keyfile KEY --ssl-ca-certfile CA" if flower.root_certificates else "--insecure"
    bind = "" if host in ("127.0.0.1", "localhost") else " --host 0.0.0.0"
    tls_note = "" if flower.root_certificates else "; a SuperLink with TLS needs --flower_root_certificates"
    return (f"start it with `flower-superlink {tls} --disable-runtime-dependency-installation{bind} --port {port}` "
            f"and one `flower-supernode` per client ({HOW}){tls_note}")


def control_client(flower: FlowerConfig) -> Any:
    """A client of the SuperLink's Control API (plain HTTP, or TLS checked against --flower_root_certificates)."""
    from flwr.supercore.control import ControlHttpClient

    certs = flower.root_certificates
    if certs is not None and not os.path.isfile(certs):
        raise UserError(f"--flower_root_certificates {certs!r} is not a file; give the CA certificate (PEM) that "
                        f"signed the SuperLink's certificate")
    try:
        return ControlHttpClient.from_server_address(flower.superlink, insecure=certs is None,
                                                     root_certificates=certs, interceptors=[])
    except ssl.SSLError as e:
        raise UserError(f"--flower_root_certificates {certs!r} holds no CA certificate that Python can read ({e}); "
                        f"give the PEM file of the CA that signed the SuperLink's certificate") from None


def call(client: Any, flower: FlowerConfig, method: str, request: Any) -> Any:
    """One Control API call; a SuperLink that does not answer, or refuses, is one UserError saying what to do."""
    import httpx

    try:
        return getattr(client, method)(request)
    except httpx.HTTPStatusError as e:
        text = " ".join(e.response.text.split())[:200]
        raise UserError(f"the SuperLink at {flower.superlink} refused {method} (HTTP {e.response.status_code}: "
                        f"{text})") from None
    except httpx.HTTPError as e:
        raise UserError(f"no Flower SuperLink answers at {flower.superlink} ({type(e).__name__}: "
                        f"{str(e) or 'no answer'}); {start_hint(flower)}") from None


def check_superlink(flower: FlowerConfig) -> None:
    """Fail fast, before the data are loaded, when no SuperLink answers at --flower_superlink."""
    from flwr.proto.control_pb2 import ListRunsRequest

    client = control_client(flower)
    try:
        call(client, flower, "ListRuns", ListRunsRequest(limit=1))
    finally:
        client.close()


def app_bundle() -> Any:
    """The app in flower-app/ as a Flower App Bundle (what ``flwr run flower-app`` sends)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.fab import Fab

    if not os.path.isfile(os.path.join(APP_DIR, "pyproject.toml")):
        raise UserError(f"the Flower app folder {APP_DIR!r} is missing; --flower_superlink needs the project "
                        f"installed from its repository (pip install -e \".[flower]\")")
    content = build_fab_from_disk(Path(APP_DIR))
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def submit(client: Any, flower: FlowerConfig, text: str) -> int:
    """Start the run on the SuperLink (the app, its configuration as the run config's ``config``); its id."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest

    request = StartRunRequest(fab=fab_to_proto(app_bundle()), override_config=user_config_to_proto({"config": text}),
                              federation="")
    response = call(client, flower, "StartRun", request)
    if not response.HasField("run_id"):
        raise UserError(f"the SuperLink at {flower.superlink} did not start the run"
                        f"{f' ({response.note})' if response.HasField('note') else ''}")
    return int(response.run_id)


def run_status(client: Any, flower: FlowerConfig, run_id: int) -> Any:
    """The run's status (status, sub_status, details) as the SuperLink reports it."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    runs = call(client, flower, "ListRuns", ListRunsRequest(run_id=run_id)).run_dict
    if run_id not in runs:
        raise UserError(f"the SuperLink at {flower.superlink} no longer knows Flower run {run_id}")
    return run_from_proto(runs[run_id]).status


def show_rounds(path: str, shown: int) -> int:
    """Print the rounds appended to rounds.jsonl since the last call (when the SuperLink writes to a folder this
    machine sees); returns how many are shown."""
    if not os.path.isfile(path):
        return shown
    with open(path) as f:
        lines = [line for line in f.read().split("\n")[:-1] if line.strip()]  # whole lines only
    for line in lines[shown:]:
        r = json.loads(line)
        print(f"round {r['t']} ({r['phase']}): test err {r['test_err']:.4f}", flush=True)
    return max(shown, len(lines))


def wait_for(client: Any, flower: FlowerConfig, run_id: int, out: str) -> Any:
    """Wait until the run finishes; Ctrl-C or SIGTERM stops it on the SuperLink. Returns its final status."""
    from flwr.common.constant import Status
    from flwr.proto.control_pb2 import StopRunRequest

    shown = 0
    try:
        while (status := run_status(client, flower, run_id)).status != Status.FINISHED:
            shown = show_rounds(os.path.join(out, "rounds.jsonl"), shown)
            time.sleep(POLL_S)
    except KeyboardInterrupt as e:
        call(client, flower, "StopRun", StopRunRequest(run_id=run_id))
        raise type(e)(f"Flower run {run_id} was stopped on the SuperLink; the finished rounds are kept in "
                      f"{os.path.join(out, 'rounds.jsonl')!r}, no summary.json was written") from None
    show_rounds(os.path.join(out, "rounds.jsonl"), shown)
    return status


def failure(status: Any, run_id: int) -> str:
    """One line for a run that did not complete: the ServerApp's error as it raised it."""
    details = str(status.details).strip()
    for prefix in ("ServerApp failed with exception: ", "ServerApp failed with exception:"):
        details = details[len(prefix):] if details.startswith(prefix) else details
    details = details.splitlines()[-1] if details else "no details"
    if status.sub_status == "stopped":
        return (f"Flower run {run_id} was stopped ({details}); rounds.jsonl keeps the finished rounds, no "
                f"summary.json was written")
    return f"{details} (Flower run {run_id}, {status.sub_status}; the SuperLink's log has Flower's own)"


def deployed_config(ctx: FedContext, out: str) -> str:
    """The configuration the ServerApp runs: paths absolute (the SuperLink and its ServerApp run elsewhere)."""
    cfg = worker_config(ctx.cfg)
    return json.dumps(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=os.path.abspath(out))).to_dict())


def run_deployed(ctx: FedContext, out: str) -> dict:
    """The run on the SuperLink at --flower_superlink: submitted, waited for, its summary (SPEC "Federated
    learning"). The ServerApp writes config.json, rounds.jsonl and summary.json into ``out`` on its machine."""
    flower = ctx.cfg.flower
    client = control_client(flower)
    try:
        run_id = submit(client, flower, deployed_config(ctx, out))
        print(f"Flower run {run_id} submitted to the SuperLink at {flower.superlink}", flush=True)
        status = wait_for(client, flower, run_id, out)
    finally:
        client.close()
    if status.sub_status != "completed":
        raise UserError(failure(status, run_id))
    path = os.path.join(os.path.abspath(out), "summary.json")
    if not os.path.isfile(path):
        raise UserError(f"Flower run {run_id} finished, but {path!r} is not on this machine: the ServerApp wrote "
                        f"the results on the SuperLink's machine")
    return read_json(path)
