"""The federated setting (SPEC "Federated learning"): every aggregator on constructed updates with a known answer, the
MD screen on a real model, the malicious update against the alignment it targets, the data split, the run's
determinism and files, and (slow) the same global model in one process and on Flower, and a lost Flower client."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

from utils.attack.craft import trigger_alignment
from utils.errors import UserError
from utils.fed.aggregators import AGGREGATORS, RoundView, robust_z
from utils.fed.clients import MaliciousClient, local_sgd
from utils.fed.config import ClientsConfig, FedAttackConfig, FedConfig, ServerConfig, replace
from utils.fed.run import run_federated
from utils.fed.scores import SCORES, round_aurocs, update_scores
from utils.fed.server import Server
from utils.fed.split import split_data
from utils.core.grads import param_grads, preserved_state
from utils.fed.vectors import flatten, load_params, param_vector
from utils.core.data import Split

SETTINGS = ServerConfig(krum_f=1, trim=0.1)


def _view(updates: torch.Tensor, root: torch.Tensor | None = None, md: torch.Tensor | None = None) -> RoundView:
    return RoundView(updates, root_fn=None if root is None else (lambda: root), md_fn=None if md is None else (lambda: md))


def _honest(n: int = 9, d: int = 50, seed: int = 0) -> torch.Tensor:
    """n updates around one direction: a shared mean plus small noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.ones(d) * 0.1 + 0.01 * torch.randn(n, d, generator=g)


def _aggregate(name: str, view: RoundView, settings=SETTINGS) -> torch.Tensor:
    return AGGREGATORS[name].build(settings)(view).update


def test_one_huge_update_is_ignored_or_bounded_by_the_robust_rules_and_not_by_fedavg():
    honest = _honest()
    huge = torch.full((1, honest.shape[1]), 1e6)
    view = lambda: _view(torch.cat([huge, honest]), root=honest.mean(0),  # noqa: E731
                         md=torch.cat([torch.tensor([50.0]), 1.0 + 0.01 * torch.arange(9.0)]))
    ceiling = torch.linalg.vector_norm(honest, dim=1).max().item()
    assert torch.linalg.vector_norm(_aggregate("fedavg", view())) > 1e5 - 1  # FedAvg carries 1/10 of it
    for name in ("median", "trimmed_mean", "multikrum", "fltrust", "md_screen"):
        assert torch.linalg.vector_norm(_aggregate(name, view())).item() <= 1.01 * ceiling, name
    krum = _aggregate("krum", view())
    assert any(torch.equal(krum, h) for h in honest)  # Krum picks one honest update exactly
    clipped = AGGREGATORS["clip"].build(SETTINGS)(view())
    tau = clipped.info["clip_norm"]
    assert tau == pytest.approx(torch.linalg.vector_norm(honest, dim=1).median().item(), rel=0.2)
    assert torch.linalg.vector_norm(clipped.update).item() <= tau * (1 + 1e-6)  # every update scaled to <= tau
    assert AGGREGATORS["md_screen"].build(SETTINGS)(view()).info["dropped"] == [0]


def test_identical_updates_give_that_update_back():
    u = torch.linspace(-1, 1, 40)
    same = u.repeat(7, 1)
    for name in AGGREGATORS:
        out = _aggregate(name, _view(same, root=u, md=torch.full((7,), 0.3)))
        assert torch.allclose(out, u, atol=1e-6), name
    # FLTrust rescales every update to its root update's norm: same direction, the root's length
    out = _aggregate("fltrust", _view(same, root=3 * u, md=None))
    assert torch.allclose(out, 3 * u, atol=1e-5)


def test_trimmed_mean_and_median_by_hand():
    x = torch.tensor([[1.0], [2.0], [3.0], [100.0], [-50.0], [4.0]])
    assert _aggregate("median", _view(x)).item() == 2.5  # the two middle values 2 and 3
    k1 = dataclasses.replace(SETTINGS, trim=0.2)  # floor(0.2 x 6) = 1 trimmed at each end: mean of 1, 2, 3, 4
    assert _aggregate("trimmed_mean", _view(x), k1).item() == 2.5


def test_robust_z_with_no_spread_flags_only_the_odd_one():
    z = robust_z(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    assert z[:3].tolist() == [0.0, 0.0, 0.0] and z[3].item() == float("inf")


def test_each_aggregator_refuses_a_round_it_cannot_aggregate():
    with pytest.raises(UserError, match="krum needs at least 5 updates"):
        FedConfig(clients=ClientsConfig(clients=4), server=ServerConfig(aggregator="krum"))
    with pytest.raises(UserError, match="md_screen needs at least 3"):
        FedConfig(clients=ClientsConfig(clients=2), attack=FedAttackConfig(malicious=0.5),
                  server=ServerConfig(aggregator="md_screen"))
    with pytest.raises(UserError, match="multikrum_m 12"):
        FedConfig(server=ServerConfig(aggregator="multikrum", multikrum_m=12))
    with pytest.raises(UserError, match="at least one must be honest"):
        FedConfig(clients=ClientsConfig(clients=3), attack=FedAttackConfig(malicious=0.7))
    with pytest.raises(UserError, match="--alpha must lie in"):
        ClientsConfig(alpha=0.0)
    with pytest.raises(UserError, match="--trim must"):
        ServerConfig(trim=0.5)
    FedConfig(clients=ClientsConfig(clients=5), server=ServerConfig(aggregator="krum"))  # 5 = 2f + 3: accepted


def test_iid_and_dirichlet_shards_are_disjoint_cover_the_data_and_repeat_with_the_seed():
    labels = torch.arange(2000) % 10
    for how, alpha in (("iid", 1.0), ("dirichlet", 0.3)):
        s = split_data(labels, 8, 50, how, alpha, seed=3)
        every = torch.cat([s.root, *s.clients])
        assert len(every) == 2000 and len(torch.unique(every)) == 2000, how
        again = split_data(labels, 8, 50, how, alpha, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(s.clients, again.clients)), how
    skew = lambda a: max(torch.bincount(labels[c], minlength=10).max().item() / len(c)  # noqa: E731
                         for c in split_data(labels, 8, 50, "dirichlet", a, seed=3).clients)
    assert skew(0.1) > skew(100.0)  # a small α gives clients dominated by few classes
    with pytest.raises(UserError, match="no samples"):
        split_data(torch.arange(30) % 10, 25, 1, "dirichlet", 0.01, seed=0)


@pytest.fixture(scope="module")
def tiny(trained_pair):
    """A trained width-8 CNN, a clean root batch, and the real batches of the attacker."""
    b = trained_pair.batches
    root = Split((b[2][0] * 255).round().to(torch.uint8), b[2][1])
    return SimpleNamespace(model=trained_pair.model, trigger=b[0], val=b[1], root=root, rest=b[3])


def test_md_screen_drops_the_update_that_moves_the_clean_outputs_most(tiny):
    """Nine small random updates, and one of the same L2 norm along the clean loss's gradient on the root batch (the
    direction that changes the outputs most): the norm cannot tell them apart, MD can, and the screen drops it."""
    theta = param_vector(tiny.model)
    g = torch.Generator().manual_seed(1)
    honest = 1e-3 * torch.randn(9, len(theta), generator=g)
    size = torch.linalg.vector_norm(honest, dim=1).mean()
    with preserved_state(tiny.model):
        ascent = flatten(param_grads(tiny.model.eval(), *tiny.root.batch(torch.arange(len(tiny.root)))))
    odd = size * ascent / torch.linalg.vector_norm(ascent)
    cfg = FedConfig(server=ServerConfig(aggregator="md_screen", md_memory=0, root_size=len(tiny.root)))
    server = Server(cfg, tiny.model, tiny.root)
    updates = torch.cat([odd[None], honest])
    view = server.view(updates, 1)
    md = view.md()
    assert md[0] > 10 * md[1:].max()
    agg = server.aggregator(view)
    assert agg.info["dropped"] == [0] and agg.weights[0] == 0 and bool((agg.weights[1:] > 0).all())
    scores = update_scores(view, 1)
    assert set(SCORES) <= set(scores)
    auc = round_aurocs(scores, [0])
    assert auc["md"] == 1.0 and auc["norm"] < 1.0


def test_the_malicious_accumulative_update_raises_the_alignment_it_targets(tiny):
    model = tiny.model
    theta = param_vector(model)
    sgd = ClientsConfig(lr=0.01, momentum=0.0, batch_size=100)
    attacker = MaliciousClient(FedAttackConfig(feder_lambda=1.0, craft_mode="eval"), sgd, tiny.trigger, tiny.val, 0)
    before = trigger_alignment(model.eval(), *tiny.trigger, *tiny.val)
    delta = attacker.update(model, theta, "accumulative")
    assert torch.equal(param_vector(model), theta)  # the model is left as found
    after = trigger_alignment(load_params(model, theta + delta).eval(), *tiny.trigger, *tiny.val)
    load_params(model, theta)
    assert after > before + 1e-3
    # the trigger update is a reversed-gradient step: it raises the trigger batch's own loss
    import torch.nn.functional as F

    up = attacker.update(model, theta, "trigger")
    with torch.no_grad():
        loss = lambda t: F.cross_entropy(load_params(model, t).eval()(tiny.trigger[0]), tiny.trigger[1]).item()  # noqa
        assert loss(theta + up) > loss(theta)
    load_params(model, theta)


def test_honest_local_sgd_lowers_its_loss_and_leaves_the_model_as_found(tiny):
    model, theta = tiny.model, param_vector(tiny.model)
    buffers = [b.clone() for b in model.buffers()]
    x, y = tiny.rest
    data = Split((x * 255).round().to(torch.uint8), y)
    sgd = ClientsConfig(lr=0.02, momentum=0.0, local_steps=5, batch_size=100)
    delta = local_sgd(model, theta, data, torch.arange(100), sgd, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    import torch.nn.functional as F

    with torch.no_grad(), preserved_state(model):  # the loss it descends: train mode, the batch's statistics
        loss = lambda t: F.cross_entropy(load_params(model, t).train()(x), y).item()  # noqa: E731
        assert loss(theta + delta) < loss(theta)
    load_params(model, theta)


def small_config(tiny_run: str, small_data: str, out: str, **changes) -> FedConfig:
    """A few rounds of 4 clients on the small data and the tiny burn-in (seconds)."""
    cfg = FedConfig(run=dataclasses.replace(FedConfig().run, resume=tiny_run, model_name="epoch2.pth",
                                            dataroot=small_data, download=False, device="cpu", out=out, threads=1),
                    clients=ClientsConfig(clients=4, local_steps=2, batch_size=20),
                    attack=FedAttackConfig(malicious=0.25, val_size=50, boost=4.0),
                    server=ServerConfig(rounds=2, root_size=20, eval_subset=100))
    return replace(cfg, **changes)


def test_a_run_writes_its_files_and_repeats_bit_for_bit(tiny_run, small_data, tmp_path):
    a = run_federated(small_config(tiny_run, small_data, str(tmp_path / "a"), server={"aggregator": "md_screen"}))
    b = run_federated(small_config(tiny_run, small_data, str(tmp_path / "b"), server={"aggregator": "md_screen"}))
    assert a["global_sha256"] == b["global_sha256"]
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "log.txt", "rounds.jsonl", "summary.json"]
    rounds = [json.loads(line) for line in open(tmp_path / "a" / "rounds.jsonl")]
    assert [r["phase"] for r in rounds] == ["accumulative", "accumulative", "trigger"]
    assert all(len(r["scores"]["md"]) == 4 and r["malicious"] == [0] for r in rounds)
    assert set(a["auroc_accumulative"]) == set(SCORES)
    with pytest.raises(UserError, match="already holds results"):
        run_federated(small_config(tiny_run, small_data, str(tmp_path / "a")))


def test_the_attacker_alone_is_the_authors_experiment(tiny_run, small_data, tmp_path):
    """--attacker_only: the global model follows the attacker's SGD steps (momentum kept) as the authors' single
    optimizer does: compared with torch.optim.SGD stepping −λ·A directly (to float rounding: the two add the
    momentum step in another order, and each second-order round amplifies the last bits; measured 3e-6 of the
    largest parameter's move in channels_last, 7e-7 contiguous, so within 1e-5 of it)."""
    from utils.attack.craft import second_order_term
    from utils.core.checkpoint import load_checkpoint, model_from_checkpoint
    from utils.fed.context import build_context
    from utils.fed.rounds import FederatedRun, InProcessClients, in_process_exchange

    cfg = small_config(tiny_run, small_data, str(tmp_path / "solo"), attack={"attacker_only": True},
                       server={"rounds": 3}, clients={"momentum": 0.9, "lr": 0.1})
    ctx = build_context(cfg)
    server = Server(cfg, ctx.model, ctx.root)
    os.makedirs(tmp_path / "solo")
    summary = FederatedRun(ctx, server, in_process_exchange(server, InProcessClients(ctx)), str(tmp_path / "solo")).run()
    assert summary["rounds"] == 3
    model, _ = model_from_checkpoint(load_checkpoint(os.path.join(tiny_run, "epoch2.pth")))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):  # three accumulative rounds, then the trigger round (same optimizer, momentum kept)
        model.train()
        if step < 3:
            grads = [-cfg.attack.feder_lambda * g for g in second_order_term(model, *ctx.trigger, *ctx.val)]
        else:
            grads = [-cfg.attack.poisoned_trigger_step * g for g in param_grads(model, *ctx.trigger)]
        for p, g in zip(model.parameters(), grads):
            p.grad = cfg.attack.boost * g  # the boost scales the step
        opt.step()
    moved = (param_vector(model) - ctx.theta0).abs().max()
    assert (server.theta - param_vector(model)).abs().max() <= 1e-5 * moved
    assert not torch.equal(server.theta, ctx.theta0)


def test_the_stop_rule_is_read_only_every_stop_every_th_round(tiny_run, small_data, tmp_path):
    """--stop_every N (the authors' code evaluates every 10th round): a threshold the first round already exceeds
    stops the rounds at round N, not at round 1; every round is still evaluated and recorded."""
    first = run_federated(small_config(tiny_run, small_data, str(tmp_path / "a"), server={"rounds": 5,
                                                                                        "threshold": 0.0}))
    third = run_federated(small_config(tiny_run, small_data, str(tmp_path / "b"), server={
        "rounds": 5, "threshold": 0.0, "stop_every": 3}))
    assert (first["rounds"], first["stop_reason"]) == (1, "threshold")
    assert (third["rounds"], third["stop_reason"]) == (3, "threshold")
    rounds = [json.loads(line) for line in open(tmp_path / "b" / "rounds.jsonl")]
    assert [r["t"] for r in rounds] == [1, 2, 3, 4] and all(r["test_err"] > 0 for r in rounds)


def test_the_authors_command_rows_carry_their_readme_values_and_dirichlet_rows_every_aggregator():
    """The authors' federated command (λ 8e-2, trigger step 0.01, clipping at 10, train mode, lr 0.1, momentum 0.9,
    error > 0.18 read every 10th round, up to 1000 rounds) as rows with their controls; every aggregator with
    Dirichlet(α) clients for each α, with both controls."""
    import feder_accu_train
    from utils.sweep.federated import AUTHORS_COMMAND, federated_preset

    fed = federated_preset()
    rows = {r.label: fed.run_config(r, (0, 20), "results/federated") for r in fed.rows()}
    alone, theirs = rows["the authors' command: attacker alone"], feder_accu_train.parse_config(AUTHORS_COMMAND.split())
    for part, names in {"attack": ("feder_lambda", "poisoned_trigger_step", "clip_gradnorm", "clipvalue", "craft_mode"),
                        "clients": ("lr", "momentum"), "server": ("rounds", "threshold")}.items():
        for name in names:
            assert getattr(getattr(alone, part), name) == getattr(getattr(theirs, part), name), (part, name)
    assert (theirs.server.rounds, theirs.attack.feder_lambda, theirs.server.threshold) == (1000, 0.08, 0.18)
    assert (alone.attack.attacker_only, alone.attack.boost, alone.server.stop_every, alone.server.eval_subset) == (
        True, 1.0, 10, 0)
    assert rows["the authors' command: attacker alone (trigger alone)"].server.rounds == 0
    for agg in ("fedavg", "md_screen"):
        among = rows[f"{agg}, the authors' attacker"]
        assert not among.attack.attacker_only and among.attack.feder_lambda == 0.08 and among.server.aggregator == agg
        assert not rows[f"{agg}, the authors' attacker (honest rounds + trigger)"].attack.poison
    assert fed.alphas and all(0 < a < 1 for a in fed.alphas)
    for alpha in fed.alphas:
        for agg in fed.aggregators:
            for suffix in ("", " (trigger alone)", " (honest rounds + trigger)"):
                cfg = rows[f"{agg}, dirichlet α={alpha:g}{suffix}"]
                assert (cfg.clients.split, cfg.clients.alpha, cfg.server.aggregator) == ("dirichlet", alpha, agg)
    assert len(rows) == len(fed.rows())  # labels are unique


def test_a_run_written_before_a_field_existed_is_reused_at_that_fields_default(tiny_run, small_data, tmp_path):
    """A finished run whose config.json lacks a field added since (here --stop_every) is the same configuration
    when the field is at its default, and another configuration when it is not."""
    from utils.io.results import read_json, write_json
    from utils.sweep.reuse import finished_summary

    cfg = small_config(tiny_run, small_data, str(tmp_path / "old"))
    summary = run_federated(cfg)
    saved = read_json(str(tmp_path / "old" / "config.json"))
    del saved["config"]["server"]["stop_every"]
    write_json(str(tmp_path / "old" / "config.json"), saved)
    assert finished_summary(cfg, fresh=False) == summary
    with pytest.raises(UserError, match="server.stop_every: 1 -> 2"):
        finished_summary(replace(cfg, server={"stop_every": 2}), fresh=False)


def test_every_federated_field_has_a_flag_and_no_flags_give_the_defaults():
    import feder_accu_train
    from utils.fed.config import PARTS
    from utils.fields import options

    flagged = {f"{p}.{f.name}" for p, cls in PARTS.items() for f, _ in options(cls, generated=True)}
    every = {f"{p}.{f.name}" for p, cls in PARTS.items() for f in dataclasses.fields(cls)}
    assert flagged == every
    assert feder_accu_train.parse_config([]) == FedConfig()
    cfg = feder_accu_train.parse_config(["--epochs", "7", "--feder_lambda", "0.5", "--aggregator", "md_screen"])
    assert (cfg.server.rounds, cfg.attack.feder_lambda, cfg.server.aggregator) == (7, 0.5, "md_screen")


def test_without_flower_the_flag_says_how_to_install_it(monkeypatch):
    import sys

    from utils.fed.flower import require_flower

    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr now raises ImportError
    with pytest.raises(UserError, match="pip install -r requirements-flower.txt"):
        require_flower()


def test_the_federated_preset_shares_the_cpu_presets_burn_ins_kernels_and_threads():
    from utils.sweep.federated import federated_preset
    from utils.sweep.presets import cpu_preset

    fed, cpu = federated_preset(), cpu_preset()
    assert set(fed.burn_in_seeds) <= set(cpu.burn_in_seeds)
    row = fed.rows()[0]
    for rep in fed.replicates():
        cfg = fed.run_config(row, rep, "results/federated")
        assert cfg.run.resume == cpu.burn_in_for(rep[0]).outf and cfg.run.model_name == f"epoch{cpu.online_epoch}.pth"
        assert (cfg.run.kernels, cfg.run.threads) == (cpu.burn_in.kernels, cpu.burn_in.threads)
    labels = [r.label for r in fed.rows()]
    assert len(labels) == len(set(labels)) and {"fedavg (trigger alone)", "md_screen (honest rounds + trigger)"} <= set(labels)


@pytest.mark.slow
def test_the_federated_reproduction_writes_its_tables_and_figure(tiny_run, small_data, tmp_path):
    """A shrunk federated preset (two aggregators, the tiny burn-in, two replicates) through the sweep and the report:
    every table, the claims, the figure; a second call reuses every finished run."""
    from conftest import tiny_burn_in_config
    from utils.report.federated import write_federated_reports
    from utils.sweep.federated import federated_preset, federated_smoke, run_federated_preset
    from utils.sweep.presets import cpu_preset

    source = dataclasses.replace(cpu_preset(), burn_in=tiny_burn_in_config(small_data, tiny_run), online_epoch=2,
                                 memorized_epoch=1, burn_in_seeds=(0,))
    preset = federated_smoke(federated_preset())
    preset = dataclasses.replace(preset, source=source, burn_in_seeds=(0,), seeds=(1, 2),
                                 aggregators=("fedavg", "md_screen"), unboosted=("md_screen",), adaptive=1.0,
                                 base=replace(preset.base, run={"dataroot": small_data, "download": False},
                                              clients={"clients": 4}, attack={"val_size": 50, "boost": 4.0},
                                              server={"root_size": 20, "eval_subset": 100}))
    out = str(tmp_path / "fed")
    groups = run_federated_preset(preset, out, fresh=False)
    assert set(groups) == {r.label for r in preset.rows()} and all(len(g) == 2 for g in groups.values())
    text = write_federated_reports(preset, out, groups)
    for name in ("table", "claims", "scores", "noniid", "costs", "runs"):
        assert os.path.isfile(os.path.join(out, f"{name}.md")) and os.path.isfile(os.path.join(out, f"{name}.csv"))
    assert os.path.isfile(os.path.join(out, "accuracy.png")) and os.path.isfile(os.path.join(out, "noniid.png"))
    noniid = open(os.path.join(out, "noniid.md")).read()
    assert "dirichlet α=0.5" in noniid and "md_screen" in noniid
    from utils.report.federated import noniid_effects, noniid_rows
    lines = {(r["aggregator"], r["split"]): r for r in noniid_rows(noniid_effects(preset, groups), preset, out)}
    rounds = sum(s["rounds"] for s in groups["fedavg"].values())  # one malicious client: one update per round
    assert lines["fedavg", "iid"]["excluded_attacker"] == f"0/{rounds} (0 %)"  # FedAvg weighs every update
    assert lines["md_screen", "dirichlet α=0.5"]["excluded_honest"].split("/")[1].startswith(
        str(4 * sum(s["rounds"] for s in groups["md_screen, dirichlet α=0.5 (honest rounds + trigger)"].values())))
    assert "md_screen, unboosted adaptive attacker λ=1" in text and "attacker alone" in text
    stamps = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(out, "runs", "*", "summary.json"))}
    assert run_federated_preset(preset, out, fresh=False) == groups  # reused, not run again
    assert stamps == {f: os.path.getmtime(f) for f in stamps}


@pytest.mark.slow
def test_flower_finds_the_same_global_model_as_one_process(tiny_run, small_data, tmp_path):
    """The same run in this process and on Flower's simulation engine (ClientApps in Ray worker processes, the same
    thread count and kernels): the same global model bit for bit, and the same records round by round."""
    common = dict(server={"aggregator": "md_screen", "rounds": 2}, clients={"clients": 5},
                  attack={"adaptive_md": 1.0}, run={"threads": 2})
    one = run_federated(small_config(tiny_run, small_data, str(tmp_path / "one"), **common))
    flower = run_federated(small_config(tiny_run, small_data, str(tmp_path / "flower"), flower={"enabled": True},
                                        **common))
    assert flower["global_sha256"] == one["global_sha256"]
    a, b = ([json.loads(line) for line in open(tmp_path / d / "rounds.jsonl")] for d in ("one", "flower"))
    same = ("phase", "test_err", "alignment", "scores", "weights", "update_norm", "malicious")
    assert [{k: r[k] for k in same} for r in a] == [{k: r[k] for k in same} for r in b]


@pytest.mark.slow
def test_a_lost_flower_client_stops_the_run_and_says_which(tiny_run, small_data, tmp_path):
    """Client 1 fails in round 2: the run stops with one error naming it, round 1 is kept, no summary is written,
    and no round is aggregated over fewer updates."""
    import fed_faults
    from utils.fed import flower

    flower.CLIENT_MODS.append(fed_faults.lose_client_1_in_round_2)
    try:
        with pytest.raises(UserError, match=r"lost 1 of the 4 clients in round 2 \(client 1: .*went away"):
            run_federated(small_config(tiny_run, small_data, str(tmp_path / "lost"), flower={"enabled": True},
                                       server={"rounds": 3}))
    finally:
        flower.CLIENT_MODS.remove(fed_faults.lose_client_1_in_round_2)
    rounds = [json.loads(line) for line in open(tmp_path / "lost" / "rounds.jsonl")]
    assert [r["t"] for r in rounds] == [1]
    assert not os.path.exists(tmp_path / "lost" / "summary.json")


def test_a_diverged_global_model_is_an_error(tiny_run, small_data, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="NaN/inf in round 1; lower --lr or --boost"):
        run_federated(small_config(tiny_run, small_data, str(out), clients={"lr": 1e30}))
    assert os.listdir(out) == ["config.json"]  # round 1 was the first to diverge: no round, no summary
