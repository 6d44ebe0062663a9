"""The attacker's knobs as configuration (SPEC "The attack"): the step size apart from the number of steps, the
trigger's own steps, the rule that fires the trigger, the objective as a field; every default the authors' attack
bit for bit, every bad value one error naming its flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import online_accu_train
from utils.attack.attacker import AttackConfig, Attacker, FireWatch
from utils.attack.craft import (accumulative_target, alignment_grads, craft_accumulative_poison,
                                craft_poisoned_trigger, poison_objective, second_order_term, trigger_alignment)
from utils.core.grads import param_grads
from utils.errors import UserError
from utils.fields import replace
from utils.io.results import read_jsonl
from utils.report.check import compare
from utils.sweep.overrides import check_value, parse_set, with_overrides
from utils.sweep.presets import cpu_preset


@pytest.fixture(scope="module")
def setting(trained_pair):
    """The trained CNN (eval mode) and four disjoint real batches: trigger, validation, arriving, spare."""
    trained_pair.model.eval()
    return trained_pair.model, trained_pair.batches


def _attacker(cfg: AttackConfig, batches) -> Attacker:
    (xt, yt), (xv, yv), _, _ = batches
    return Attacker(cfg, (xt, yt), (xv, yv), torch.ones(len(yt), dtype=torch.bool))


def _linf(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- the step size -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps,steps", [(0.2, 2), (0.05, 3), (0.03, 1)])
def test_the_default_step_is_the_authors_2eps_over_k_bit_for_bit(setting, eps, steps):
    """The default configuration (step_size 0) crafts the trigger and the poison an explicit 2ε/K crafts."""
    model, batches = setting
    (x, y) = batches[2]
    default = _attacker(AttackConfig(epsilon=eps, num_steps=steps, use_advtrigger=True), batches)
    explicit = _attacker(AttackConfig(epsilon=eps, num_steps=steps, use_advtrigger=True,
                                      step_size=2 * eps / steps), batches)
    for a in (default, explicit):
        a.craft_trigger(model)
    assert torch.equal(default.x_trigger, explicit.x_trigger)
    assert not torch.equal(default.x_trigger, default.x_clean_trigger)
    assert torch.equal(default.poison(model, x, y), explicit.poison(model, x, y))


def test_a_given_step_size_stays_in_the_ball_raises_its_objective_and_is_the_step_taken(setting):
    """α = ε/8 with K = 2: the poison moves at most K·α (< ε), stays in the ball, raises J, and is another poison
    than the default α = 2ε/K, which reaches the ball's edge."""
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    eps, alpha = 0.02, 0.0025
    target = accumulative_target(model, x, y, xt, yt, xv, yv)
    small = craft_accumulative_poison(model, x, y, xt, yt, xv, yv, epsilon=eps, num_steps=2, step_size=alpha,
                                      target=target)
    default = craft_accumulative_poison(model, x, y, xt, yt, xv, yv, epsilon=eps, num_steps=2, target=target)
    assert 0 < _linf(small, x) <= 2 * alpha + 1e-6 and small.min() >= 0 and small.max() <= 1
    assert _linf(default, x) == pytest.approx(eps, abs=1e-6)
    assert not torch.equal(small, default)
    assert poison_objective(model, small, y, target) > poison_objective(model, x, y, target)


def test_a_given_trigger_step_size_lowers_the_alignment_within_the_ball(setting):
    model, ((xt, yt), (xv, yv), _, _) = setting
    eps, alpha = 0.05, 0.01
    x_adv = craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=eps, num_steps=3, step_size=alpha)
    assert 0 < _linf(x_adv, xt) <= 3 * alpha + 1e-6
    assert trigger_alignment(model, x_adv, yt, xv, yv) < trigger_alignment(model, xt, yt, xv, yv)
    assert not torch.equal(x_adv, craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=eps, num_steps=3))


@pytest.mark.parametrize("size", [-0.01, 0.41, float("nan")])
def test_a_step_outside_0_2eps_is_refused_by_the_crafting_functions(setting, size):
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    with pytest.raises(UserError, match="step size"):
        craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=0.2, step_size=size)
    with pytest.raises(UserError, match="step size"):
        craft_accumulative_poison(model, x, y, xt, yt, xv, yv, epsilon=0.2, step_size=size)


# --- the trigger's own steps ---------------------------------------------------------------------------------------

def test_the_trigger_is_crafted_with_its_own_steps_and_step_size(setting):
    model, batches = setting
    (xt, yt), (xv, yv), _, _ = batches
    a = _attacker(AttackConfig(epsilon=0.05, num_steps=2, trigger_steps=5, use_advtrigger=True), batches)
    a.craft_trigger(model)
    assert torch.equal(a.x_trigger, craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=0.05, num_steps=5))
    b = _attacker(AttackConfig(epsilon=0.05, num_steps=2, use_advtrigger=True), batches)
    b.craft_trigger(model)
    assert not torch.equal(a.x_trigger, b.x_trigger)
    c = _attacker(AttackConfig(epsilon=0.05, step_size=0.01, trigger_steps=4, trigger_step_size=0.003,
                               use_advtrigger=True), batches)
    c.craft_trigger(model)
    assert torch.equal(c.x_trigger, craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=0.05, num_steps=4,
                                                           step_size=0.003))
    assert AttackConfig(step_size=0.01).trigger_crafting == (2, 0.01)  # no trigger_step_size: the poisons' step


# --- A's gradients, computed once for the next poison ----------------------------------------------------------------

def test_the_alignments_gradients_with_their_graph_are_the_plain_ones_bit_for_bit(setting):
    model, ((xt, yt), (xv, yv), _, _) = setting
    g_t, g_v = alignment_grads(model, xt, yt, xv, yv)
    for kept, plain in ((g_t, param_grads(model, xt, yt)), (g_v, param_grads(model, xv, yv))):
        assert all(a.requires_grad and torch.equal(a.detach(), b) for a, b in zip(kept, plain))
    s_kept = second_order_term(model, xt, yt, xv, yv, grads=(g_t, g_v))
    assert all(torch.equal(a, b) for a, b in zip(s_kept, second_order_term(model, xt, yt, xv, yv)))


@pytest.mark.parametrize("mode,objective", [("eval", "reg"), ("train", "reg"), ("eval", "second")])
def test_a_poison_after_a_at_the_same_weights_is_the_same_poison(setting, mode, objective):
    """A measured, then a poison at the same θ: the poison equals that of an attacker that never measured A (in eval
    mode the kept gradients are used up by it; train mode keeps none); A equals ``trigger_alignment``; BN statistics
    left as found."""
    model, batches = setting
    (xt, yt), (xv, yv), (x, y), _ = batches
    cfg = AttackConfig(epsilon=0.05, craft_mode=mode, objective=objective)
    measured, fresh = _attacker(cfg, batches), _attacker(cfg, batches)
    buffers = [b.clone() for b in model.buffers()]
    value = measured.alignment(model)
    assert value == measured.alignment(model) == trigger_alignment(model.train(mode == "train"), xt, yt, xv, yv)
    assert (measured.kept is not None) == (mode == "eval")
    assert torch.equal(measured.poison(model, x, y), fresh.poison(model, x, y))
    assert measured.kept is None and all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    model.eval()


def test_kept_gradients_are_not_used_once_the_weights_change(setting):
    """A learner's step (autograd sees it) or a change through ``.data`` (it does not) after A: the poison is
    crafted from gradients at the new θ, the poison a fresh attacker crafts there."""
    model, batches = setting
    (x, y) = batches[2]
    saved = [p.detach().clone() for p in model.parameters()]
    cfg = AttackConfig(epsilon=0.05)
    try:
        for change in ("step", "data"):
            measured, fresh = _attacker(cfg, batches), _attacker(cfg, batches)
            measured.alignment(model)
            p = next(model.parameters())
            if change == "step":
                torch.optim.SGD(model.parameters(), lr=0.1).step() if p.grad is not None else None
                with torch.no_grad():
                    p.add_(0.01)
            else:
                p.data.add_(0.01)
            assert not measured.kept.holds(model, measured.x_trigger)
            assert torch.equal(measured.poison(model, x, y), fresh.poison(model, x, y))
    finally:
        with torch.no_grad():
            for p, v in zip(model.parameters(), saved):
                p.copy_(v)


def test_no_gradients_are_kept_when_no_poison_needs_them(setting):
    model, batches = setting
    for cfg in (AttackConfig(poison=False), AttackConfig(objective="normal"), AttackConfig(craft_mode="train")):
        a = _attacker(cfg, batches)
        a.alignment(model)
        assert a.kept is None


# --- when the trigger fires ----------------------------------------------------------------------------------------

def test_fire_watch_counts_batches_and_waits_out_the_patience():
    batches = FireWatch(AttackConfig(fire="batches", fire_after=3))
    assert [batches.observe(n)[0] for n in (1, 2, 3)] == [False, False, True] and batches.summary() == {}
    peak = FireWatch(AttackConfig(fire="alignment_peak", fire_patience=2), start_alignment=0.0)
    seen = [peak.observe(n, a) for n, a in enumerate([-1.0, -2.0, -1.5, -2.0, -3.0], start=1)]
    assert [fired for fired, _ in seen] == [False, False, False, True, False]  # -2.0 again is no new low
    assert [r["fire_since_best"] for _, r in seen] == [0, 0, 1, 2, 0]
    assert peak.summary() == {"fire_best_alignment": -3.0, "fire_best_batch": 5}
    rising = FireWatch(AttackConfig(fire="alignment_peak"), start_alignment=-1.0)
    assert rising.observe(1, -0.5)[0]  # patience 1: the first batch that does not lower A fires
    assert not FireWatch(AttackConfig()).observe(10 ** 6, -9.0)[0]  # threshold: the learner's rule, not this one


def _run(tiny_run, small_data, out, *extra):
    argv = ["--resume", tiny_run, "--model_name", "epoch2.pth", "--memorized_model",
            os.path.join(tiny_run, "epoch1.pth"), "--dataroot", small_data, "--no_download", "--device", "cpu",
            "--out", str(out), "--batch_size", "50", "--test_batch_size", "100", "--lr", "0.1",
            "--use_advtrigger", "--epsilon", "0.05", "--eval_subset", "100", "--no_md", *extra]
    assert online_accu_train.main(argv) == 0
    return json.load(open(os.path.join(out, "summary.json"))), read_jsonl(os.path.join(out, "steps.jsonl"))


@pytest.mark.slow
def test_fire_batches_ignores_the_test_error(tiny_run, small_data, tmp_path):
    """--fire batches fires after exactly --fire_after batches, where the threshold would have fired at once (0.0)
    or never (1.0); --epochs still caps the phase."""
    early, steps = _run(tiny_run, small_data, tmp_path / "early", "--epochs", "5", "--threshold", "0.0", "--fire",
                        "batches", "--fire_after", "3")
    assert steps[0]["test_err"] > 0.0  # the threshold rule would have fired at the first batch
    assert (early["stop_reason"], early["steps"], len(steps)) == ("batches", 3, 3)
    never, steps = _run(tiny_run, small_data, tmp_path / "never", "--epochs", "5", "--threshold", "1.0", "--fire",
                        "batches", "--fire_after", "2")
    assert (never["stop_reason"], never["steps"], len(steps)) == ("batches", 2, 2)
    capped, _ = _run(tiny_run, small_data, tmp_path / "capped", "--epochs", "2", "--fire", "batches",
                     "--fire_after", "4")
    assert (capped["stop_reason"], capped["steps"]) == ("epochs", 2)
    default, _ = _run(tiny_run, small_data, tmp_path / "default", "--epochs", "5", "--threshold", "0.0")
    assert (default["stop_reason"], default["steps"]) == ("threshold", 1)
    assert not any(k.startswith("fire_") for k in default)  # the default's summary is what it was


@pytest.mark.slow
def test_fire_alignment_peak_fires_once_a_stops_falling_for_the_patience(tiny_run, small_data, tmp_path):
    """The same run with the threshold out of reach gives A per batch; --fire alignment_peak stops where A has made
    no new low (the start's A included) for --fire_patience batches, on the same A it logged; under --no_alignment
    the rule computes the same A itself."""
    common = ("--epochs", "8", "--threshold", "1.0")
    ref, ref_steps = _run(tiny_run, small_data, tmp_path / "ref", *common)
    a = [ref["alignment_start"]] + [s["alignment"] for s in ref_steps]
    patience = 2
    since, best, expected = 0, a[0], None
    for n, value in enumerate(a[1:], start=1):
        since, best = (0, value) if value < best else (since + 1, best)
        if since >= patience:
            expected = n
            break
    assert expected is not None and expected < 8, a  # the tiny run's A makes no new low twice in a row
    peak, steps = _run(tiny_run, small_data, tmp_path / "peak", *common, "--fire", "alignment_peak",
                       "--fire_patience", str(patience))
    assert (peak["stop_reason"], peak["steps"], len(steps)) == ("alignment_peak", expected, expected)
    assert [s["test_err"] for s in steps] == [s["test_err"] for s in ref_steps[:expected]]
    assert [s["fire_alignment"] for s in steps] == [s["alignment"] for s in steps] == a[1:expected + 1]
    assert steps[-1]["fire_since_best"] == patience
    assert peak["fire_best_alignment"] == min(a[:expected + 1])
    blind, blind_steps = _run(tiny_run, small_data, tmp_path / "blind", *common, "--fire", "alignment_peak",
                              "--fire_patience", str(patience), "--no_alignment")
    assert blind["steps"] == expected and "alignment" not in blind_steps[0]
    assert [s["fire_alignment"] for s in blind_steps] == a[1:expected + 1]


# --- configuration: fields, --set, one error line ------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["--step_size", "-0.1"], "--step_size must lie in [0, 2]"),
    (["--step_size", "0.5"], "--step_size must be at most 2 x --epsilon = 0.4"),
    (["--epsilon", "0.05", "--trigger_step_size", "0.2"], "--trigger_step_size must be at most 2 x --epsilon = 0.1"),
    (["--trigger_steps", "-1"], "--trigger_steps must lie in [0, 1000]"),
    (["--trigger_steps", "1001"], "--trigger_steps must lie in [0, 1000]"),
    (["--fire", "batches"], "--fire batches needs --fire_after"),
    (["--fire", "batches", "--fire_after", "0"], "--fire_after must lie in [1, 1000000]"),
    (["--fire_after", "3"], "--fire_after is read only by --fire batches"),
    (["--fire", "alignment_peak", "--fire_patience", "0"], "--fire_patience must lie in [1, 1000000]"),
    (["--fire", "batches", "--fire_after", "2", "--fire_patience", "2"],
     "--fire_patience is read only by --fire alignment_peak"),
    (["--gamma", "-1"], "--gamma must lie in [0, 1000000]"),
    (["--poison_scale", "1.5"], "--poison_scale must lie in [0, 1]"),
])
def test_a_bad_knob_is_refused_naming_its_flag(argv, words):
    with pytest.raises(UserError) as e:
        online_accu_train.parse_config(argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_bad_fire_rule_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        online_accu_train.parse_config(["--fire", "never"])
    assert e.value.code == 2 and "--fire: invalid choice: 'never'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_bad_knob_is_one_error_line_from_the_script(repo_root, tmp_path):
    done = subprocess.run([sys.executable, "online_accu_train.py", "--fire", "batches", "--out", str(tmp_path / "r")],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: --fire batches needs --fire_after N: the arriving batches before the trigger fires"], done.stderr


def test_every_knob_is_a_field_reachable_by_set():
    """--set reaches every knob, typed and checked by its field (the objective too, which three flags set)."""
    changes = dict(parse_set(s) for s in ("attack.objective=normal", "attack.step_size=0.01", "attack.trigger_steps=4",
                                         "attack.trigger_step_size=0.02", "attack.fire=batches", "attack.fire_after=7",
                                         "attack.gamma=0.5", "attack.poison_scale=0.5",
                                         "attack.online_advtrigger=true"))
    for path, value in changes.items():
        check_value(f"--set {path}", path, value)
    a = with_overrides(cpu_preset(), changes).base.attack
    assert (a.objective, a.step_size, a.trigger_steps, a.trigger_step_size, a.fire, a.fire_after, a.gamma,
            a.poison_scale, a.online_advtrigger) == ("normal", 0.01, 4, 0.02, "batches", 7, 0.5, 0.5, True)
    assert online_accu_train.parse_config(["--only_second"]).attack.objective == "second"
    with pytest.raises(UserError, match="--set attack.objective must be one of reg, normal, second, got 'third'"):
        check_value("--set attack.objective", "attack.objective", "third")
    with pytest.raises(UserError, match="--only_reg/--only_normal/--only_second must be one of"):
        AttackConfig(objective="third")
    with pytest.raises(UserError, match="--fire batches needs --fire_after"):
        with_overrides(cpu_preset(), {"attack.fire": "batches"})


def test_the_defaults_are_the_authors_attack_and_a_published_preset_predating_the_knobs_is_no_difference():
    cfg = online_accu_train.parse_config([]).attack
    assert (cfg.step_size, cfg.trigger_crafting, cfg.fire, cfg.fire_after, cfg.fire_patience) == (
        0.0, (2, 0.0), "threshold", None, None)
    base = replace(cpu_preset().base)
    mine = {"preset": {"base": base.to_dict()}, "burn_ins": {}, "runs": {}, "claims": []}
    old = json.loads(json.dumps(mine))
    for knob in ("step_size", "trigger_steps", "trigger_step_size", "fire", "fire_after", "fire_patience"):
        del old["preset"]["base"]["attack"][knob]  # a fingerprint published before the knobs existed
    assert compare(mine, old).config_diff == []
    mine["preset"]["base"]["attack"]["step_size"] = 0.01
    assert compare(mine, old).config_diff == ["base.attack.step_size: 0.0 published, 0.01 here"]
