"""The attack's properties (SPEC "The attack"): ε-ball, objectives move the right way, model untouched;
the adaptive attacker keeps its poisons' MD low (SPEC "Detectors")."""
import pytest
import torch

from attack_generator import (accumulative_target, craft_accumulative_poison, craft_poisoned_trigger,
                              poison_objective, second_order_term, trigger_alignment)
from utils.core.discrepancy import memorization_discrepancy
from utils.errors import UserError
from utils.core.grads import layerwise_alignment, param_grads


@pytest.fixture(scope="module")
def setting(trained_pair):
    """The trained CNN (eval mode) and four disjoint real batches: trigger, validation, arriving, spare."""
    trained_pair.model.eval()
    return trained_pair.model, trained_pair.batches


def _in_ball(x_adv, x, eps):
    return (x_adv - x).abs().max().item() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_layerwise_alignment_of_a_gradient_with_itself_is_the_layer_count(setting):
    model, ((x, y), *_) = setting
    g = param_grads(model, x, y)
    assert layerwise_alignment(g, g).item() == pytest.approx(len(g), rel=1e-5)
    assert layerwise_alignment(g, [-t for t in g]).item() == pytest.approx(-len(g), rel=1e-5)


@pytest.mark.parametrize("eps,steps", [(0.2, 2), (0.05, 2), (0.01, 1)])
def test_trigger_lowers_alignment_and_stays_in_ball(setting, eps, steps):
    model, ((xt, yt), (xv, yv), _, _) = setting
    before = trigger_alignment(model, xt, yt, xv, yv)
    x_adv = craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=eps, num_steps=steps)
    assert _in_ball(x_adv, xt, eps)
    assert not x_adv.requires_grad
    assert trigger_alignment(model, x_adv, yt, xv, yv) < before


@pytest.mark.parametrize("objective", ["reg", "second"])
def test_accumulative_poison_raises_its_objective(setting, objective):
    """First-order regime (one small step): J rises. (At ε = 0.2 the signed steps overshoot; see README.)"""
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    x_tri = craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=0.05, num_steps=2)
    target = accumulative_target(model, x, y, x_tri, yt, xv, yv, objective=objective)
    x_adv = craft_accumulative_poison(model, x, y, x_tri, yt, xv, yv, epsilon=0.01, num_steps=1,
                                      objective=objective, target=target)
    assert _in_ball(x_adv, x, 0.01)
    assert poison_objective(model, x_adv, y, target) > poison_objective(model, x, y, target)


def test_normal_objective_is_maximal_at_the_clean_batch(setting):
    """γ·nrm(g_t) alone: J(x_t) = γ·(number of layers), its maximum, so no step can raise it."""
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    target = accumulative_target(model, x, y, xt, yt, xv, yv, objective="normal", gamma=2.0)
    assert poison_objective(model, x, y, target) == pytest.approx(2.0 * len(target), rel=1e-5)


def test_target_combines_the_terms(setting):
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    reg = accumulative_target(model, x, y, xt, yt, xv, yv, objective="reg", gamma=0.5)
    normal = accumulative_target(model, x, y, xt, yt, xv, yv, objective="normal", gamma=0.5)
    second = accumulative_target(model, x, y, xt, yt, xv, yv, objective="second")
    for r, n, s in zip(reg, normal, second):
        torch.testing.assert_close(r, n + s)
    s_raw = second_order_term(model, xt, yt, xv, yv)
    assert all(torch.isfinite(s).all() for s in s_raw) and any(s.abs().sum() > 0 for s in s_raw)


@pytest.mark.parametrize("train_mode", [False, True])
def test_model_left_untouched(setting, trained_pair, train_mode):
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    model.train(train_mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    craft_poisoned_trigger(model, xt, yt, xv, yv)
    craft_accumulative_poison(model, x, y, xt, yt, xv, yv, memorized=trained_pair.memorized, adaptive_md=1.0)
    assert model.training is train_mode and all(m.training is train_mode for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    model.eval()


def test_same_inputs_give_the_same_poisons(setting):
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    a = craft_accumulative_poison(model, x, y, xt, yt, xv, yv)
    b = craft_accumulative_poison(model, x, y, xt, yt, xv, yv)
    assert torch.equal(a, b)
    assert torch.equal(craft_poisoned_trigger(model, xt, yt, xv, yv), craft_poisoned_trigger(model, xt, yt, xv, yv))


def test_zero_budget_returns_the_input(setting):
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    assert torch.equal(craft_accumulative_poison(model, x, y, xt, yt, xv, yv, epsilon=0.0), x)


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval_is_refused(setting, eps):
    model, ((xt, yt), (xv, yv), _, _) = setting
    with pytest.raises(UserError, match="epsilon"):
        craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=eps)


def test_unknown_objective_is_refused(setting):
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    with pytest.raises(ValueError, match="objective"):
        craft_accumulative_poison(model, x, y, xt, yt, xv, yv, objective="third")


@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_adaptive_poisons_have_lower_md_and_stay_in_the_ball(setting, trained_pair, lam):
    """−λ·MD in the objective (SPEC "Detectors"): at the same ε, the poisons' mean MD is lower than with λ = 0."""
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    memorized = trained_pair.memorized
    x_tri = craft_poisoned_trigger(model, xt, yt, xv, yv, epsilon=0.05)
    plain = craft_accumulative_poison(model, x, y, x_tri, yt, xv, yv, epsilon=0.05)
    adaptive = craft_accumulative_poison(model, x, y, x_tri, yt, xv, yv, epsilon=0.05, memorized=memorized,
                                         adaptive_md=lam)
    assert _in_ball(adaptive, x, 0.05)
    md_plain = memorization_discrepancy(model, memorized, plain).mean().item()
    md_adaptive = memorization_discrepancy(model, memorized, adaptive).mean().item()
    assert md_adaptive < md_plain, (md_adaptive, md_plain)


def test_adaptive_attacker_needs_the_memorized_model(setting):
    model, ((xt, yt), (xv, yv), (x, y), _) = setting
    with pytest.raises(ValueError, match="memorized"):
        craft_accumulative_poison(model, x, y, xt, yt, xv, yv, adaptive_md=1.0)
