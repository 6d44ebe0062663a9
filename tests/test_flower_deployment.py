"""Flower's deployment runtime (SPEC "Federated learning", two ways to run; docs/FEDERATED.md, "Flower's deployment
runtime"): a SuperLink and SuperNodes started here as subprocesses on 127.0.0.1 (free ports; FLWR_HOME and HOME in
the test's folder, so nothing is written outside it), the app in flower-app/ run with `flwr run` and with
`feder_accu_train.py --flower_superlink`, each finding the in-process run's global model bit for bit; a SuperNode
killed mid-round; no SuperLink at all. Every process started here is stopped, also when a test fails (process
groups, a fixture that checks that none is left). And (fast) how the app reads its run config and a SuperNode's
paths."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

BIN = os.path.dirname(sys.executable)  # flower-superlink, flower-supernode, flwr (and the processes they start)
TINY = ["--model_name", "epoch2.pth", "--no_download", "--device", "cpu", "--clients", "2", "--malicious", "0.5",
        "--batch_size", "20", "--test_batch_size", "50", "--root_size", "20", "--eval_subset", "100", "--boost", "2",
        "--threads", "1"]
SAME = ("t", "phase", "test_err", "alignment", "scores", "weights", "dropped", "update_norm", "malicious")
NOT_TIMINGS = ("costs", "total_seconds", "trigger_round_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A SuperLink and its SuperNodes on this machine, each in its own process group, logs in the test's folder."""

    def __init__(self, folder):
        self.folder, self.home, self.procs = folder, str(folder / "flwr_home"), []
        os.makedirs(self.home)
        self.env = {**os.environ, "FLWR_HOME": self.home, "HOME": self.home, "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
                    "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
        self.port, self.node_ids = free_port(), []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(argv, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def up(self, nodes: int) -> "Federation":
        """The SuperLink (the command docs/FEDERATED.md gives), then ``nodes`` SuperNodes, each connected."""
        self.start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                 "--port", str(self.port)])
        wait_until(lambda: "Uvicorn running" in self.log("superlink"), "the SuperLink to start", self)
        for i in range(nodes):
            self.start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                         "--port", str(free_port())])
        for i in range(nodes):
            wait_until(lambda: "SuperNode ID:" in self.log(f"supernode{i}"), f"SuperNode {i} to connect", self)
            self.node_ids.append(int(re.search(r"SuperNode ID: (\d+)", self.log(f"supernode{i}")).group(1)))
        return self

    def client_of(self, node: int) -> int:
        """Client k is the k-th SuperNode by id (utils.fed.flower.wait_for_nodes)."""
        return sorted(self.node_ids).index(self.node_ids[node])

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> list[str]:
        """Every process group ended (SIGTERM, then SIGKILL), then the processes Flower detached from them (the
        SuperLink's SuperExec and ServerApp, in a session of their own) once their parent monitors notice, or
        SIGKILL; returns the processes still alive that carry this federation's FLWR_HOME (none)."""
        for proc in self.procs:
            self.kill(proc, signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(proc)
            proc.wait()
        marker, deadline = f"FLWR_HOME={self.home}", time.time() + 10
        while (left := left_with(marker)) and time.time() < deadline:
            time.sleep(0.2)
        for pid in left:
            try:
                os.kill(int(pid.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        return left_with(marker)


def left_with(marker: str) -> list[str]:
    """The live (not zombie) processes whose environment holds ``marker``: 'pid command line'."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and marker in environ:
            found.append(f"{pid} {cmd}")
    return found


def wait_until(ready, what: str, fed: Federation, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not ready():
        dead = [p.args[0] for p in fed.procs if p.poll() is not None]
        assert not dead and time.time() < deadline, f"waiting for {what}: {dead or 'timed out'}"
        time.sleep(0.2)


@pytest.fixture
def federation(tmp_path):
    """A Federation; stopped at the end whatever happened, and checked to leave no process behind."""
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        left = fed.stop()
        assert left == [], left


def tiny(tiny_run: str, small_data: str, out: str, *extra: str) -> list[str]:
    return ["--resume", tiny_run, "--dataroot", small_data, "--out", out, *TINY, *extra]


def results(out: str) -> tuple[list[dict], dict]:
    rounds = [json.loads(line) for line in open(os.path.join(out, "rounds.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    return ([{k: r.get(k) for k in SAME} for r in rounds],
            {k: v for k, v in summary.items() if k not in NOT_TIMINGS})


@pytest.mark.slow
def test_flwr_run_and_the_launcher_find_the_in_process_global_model(federation, tiny_run, small_data, tmp_path,
                                                                    repo_root):
    """Two SuperNodes, an attacker (its momentum and the models it received kept in its node's Context.state) and an
    honest client. `feder_accu_train.py --flower_superlink` (2 accumulative rounds and the trigger round) and
    `flwr run flower-app` (the run config's args; the trigger round alone, to keep the test short) write the
    in-process runs' rounds and summaries, bit for bit, timings aside."""
    from feder_accu_train import parse_config
    from utils.fed.run import run_federated

    for rounds in ("2", "0"):
        run_federated(parse_config(tiny(tiny_run, small_data, str(tmp_path / f"one_{rounds}"), "--rounds", rounds)))
    federation.up(nodes=2)
    launched = subprocess.run([sys.executable, "feder_accu_train.py", *tiny(
        tiny_run, small_data, str(tmp_path / "launched_2"), "--rounds", "2", "--flower_superlink",
        f"127.0.0.1:{federation.port}")], cwd=repo_root, env=federation.env, capture_output=True, text=True,
        timeout=400)
    assert launched.returncode == 0, launched.stderr
    assert "round 3 (trigger)" in launched.stdout and "[fedavg, flower] start err" in launched.stdout
    (tmp_path / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{federation.port}"\n'
        f'insecure = true\n')
    flags = " ".join(tiny(tiny_run, small_data, str(tmp_path / "flwr_run_0"), "--rounds", "0"))
    done = subprocess.run(["flwr", "run", "flower-app", "test", "--run-config", f'args="{flags}"', "--stream"],
                          cwd=repo_root, env=federation.env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0 and "[fedavg] start err" in done.stdout, done.stdout + done.stderr
    for out, rounds in (("launched_2", 3), ("flwr_run_0", 1)):
        one = results(str(tmp_path / f"one_{out[-1]}"))
        assert len(one[0]) == rounds and results(str(tmp_path / out)) == one, out
        assert json.load(open(tmp_path / out / "config.json"))["runtime"] == "flower deployment"
        assert sorted(os.listdir(tmp_path / out)) == ["config.json", "log.txt", "rounds.jsonl", "summary.json"]


@pytest.mark.slow
def test_a_supernode_killed_mid_round_stops_the_run_naming_its_client(federation, tiny_run, small_data, tmp_path,
                                                                      repo_root):
    """SuperNode 1 is killed (SIGKILL, its process group) as round 2 starts: one `error:` line naming its client,
    rounds.jsonl keeps round 1 whole, no summary.json."""
    federation.up(nodes=2)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "feder_accu_train.py", *tiny(
        tiny_run, small_data, str(out), "--rounds", "3", "--flower_timeout", "45", "--flower_superlink",
        f"127.0.0.1:{federation.port}")], cwd=repo_root, env=federation.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    federation.procs.append(proc)
    wait_until(lambda: (out / "rounds.jsonl").is_file() and (out / "rounds.jsonl").read_text().count("\n") >= 1,
               "round 1", federation, timeout=240)
    federation.kill(federation.procs[2])  # SuperNode 1: the node, its SuperExec, its ClientApp
    stdout, stderr = proc.communicate(timeout=240)
    k = federation.client_of(1)
    assert proc.returncode == 1, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stdout + stderr, stderr
    assert re.search(rf"lost 1 of the 2 clients in round 2 \(client {k}: (Error: Node Unavailable|no reply within "
                     rf"--flower_timeout 45 s)", lines[0]), lines[0]
    assert [json.loads(line)["t"] for line in open(out / "rounds.jsonl")] == [1]
    assert (out / "rounds.jsonl").read_text().endswith("\n")
    assert sorted(os.listdir(out)) == ["config.json", "rounds.jsonl"]


@pytest.mark.slow
def test_no_superlink_is_one_error_line_saying_how_to_start_one(tiny_run, small_data, tmp_path, repo_root):
    """--flower_superlink where nothing listens: exit 1, one `error:` line with the SuperLink's start command on that
    port, before the data are loaded, and no results folder."""
    port = free_port()
    done = subprocess.run([sys.executable, "feder_accu_train.py", *tiny(
        tiny_run, small_data, str(tmp_path / "none"), "--flower_superlink", f"127.0.0.1:{port}")], cwd=repo_root,
        env={**os.environ, "HOME": str(tmp_path), "FLWR_HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: no Flower SuperLink answers at 127.0.0.1:{port}")
    assert f"flower-superlink --insecure --disable-runtime-dependency-installation --port {port}" in lines[0]
    assert "flower-supernode" in lines[0] and not os.path.exists(tmp_path / "none")


def test_the_app_reads_feder_accu_train_flags_or_the_launchers_json_from_its_run_config(tmp_path):
    """The run config's ``args`` are feder_accu_train.py's flags (checked as the script checks them); ``config``, the
    JSON --flower_superlink sends, wins; a SuperNode's --node-config moves resume/dataroot (relative: from its
    folder) and nothing else."""
    from feder_accu_train import parse_config
    from utils.errors import UserError
    from utils.fed.flower import app_config, node_paths

    flags = "--rounds 3 --aggregator md_screen --resume 'ckpt dir' --out runs/x"
    cfg = app_config({"args": flags, "config": ""})
    assert cfg == parse_config(["--rounds", "3", "--aggregator", "md_screen", "--resume", "ckpt dir", "--out",
                                "runs/x"])
    assert app_config({"args": flags, "config": json.dumps(parse_config([]).to_dict())}) == parse_config([])
    assert app_config({"args": "", "config": ""}) == parse_config([])
    with pytest.raises(UserError, match="args must be feder_accu_train.py's flags: .*unrecognized arguments: --bogus"):
        app_config({"args": "--bogus 1", "config": ""})
    with pytest.raises(UserError, match="--clients must lie in"):
        app_config({"args": "--clients 0", "config": ""})
    text = json.dumps(cfg.to_dict())
    assert node_paths(text, {}) == text and node_paths(text, {"partition-id": 0}) == text
    moved = json.loads(node_paths(text, {"dataroot": "fm_data", "resume": "ckpt"}))
    assert (moved["run"]["dataroot"], moved["run"]["resume"]) == (os.path.abspath("fm_data"), os.path.abspath("ckpt"))
    assert {k: v for k, v in moved["run"].items() if k not in ("dataroot", "resume")} == {
        k: v for k, v in cfg.to_dict()["run"].items() if k not in ("dataroot", "resume")}


def test_a_lost_client_is_named_from_the_message_its_error_answers():
    """The SuperLink's own error reply (a dead node) comes from node 0, not the client's node: the client is the one
    whose message it answers; a client with no reply at all is named too; no round is aggregated over fewer."""
    from types import SimpleNamespace

    from utils.errors import UserError
    from utils.fed.flower import lost_clients

    def reply(to: str, reason: str | None = None, k: int = 0):
        return SimpleNamespace(has_error=lambda: reason is not None, error=SimpleNamespace(reason=reason),
                               metadata=SimpleNamespace(reply_to_message_id=to, src_node_id=0),
                               content={"metrics": {"client": k}, "update": {"delta": SimpleNamespace(
                                   numpy=lambda: [k])}})

    sent = {"m0": 0, "m1": 1, "m2": 2}
    assert lost_clients([reply("m0", k=0), reply("m2", k=2), reply("m1", k=1)], sent, 3, 1, 30) == {0: [0], 1: [1],
                                                                                                    2: [2]}
    with pytest.raises(UserError, match=r"lost 2 of the 3 clients in round 4 \(client 1: Error: Node Unavailable; "
                                        r"client 2: no reply within --flower_timeout 30 s\)"):
        lost_clients([reply("m0", k=0), reply("m1", "Error: Node Unavailable")], sent, 3, 4, 30)
