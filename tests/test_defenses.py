"""MD, DSC, AT, the defenders' registry and the AUROC helper (SPEC "Memorization Discrepancy", "DSC",
"Baselines", "Detectors")."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.attack.craft import pgd_perturb
from utils.defense.config import DSCConfig
from utils.online.config import defence_name
from utils.core.data import Split
from utils.core.train import Learner
from utils.defense.defenders import DEFENDERS, Defender
from utils.defense.dsc import DSCThreshold, calibrate_dsc, dsc_correct
from utils.core.discrepancy import memorization_discrepancies, memorization_discrepancy
from utils.errors import UserError
from utils.core.metrics import auroc


@pytest.fixture(scope="module")
def models(trained_pair):
    """The trained model, its memorized model and one held-out real batch."""
    x, y = trained_pair.batches[2]
    return trained_pair.model, trained_pair.memorized, x, y


def test_md_is_zero_for_identical_models(models):
    model, _, x, _ = models
    md = memorization_discrepancy(model, copy.deepcopy(model), x)
    assert md.shape == (100,)
    assert md.abs().max().item() < 1e-5


def test_md_is_kl_of_memorized_to_current(models):
    model, memorized, x, _ = models
    model.train()
    md = memorization_discrepancy(model, memorized, x)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = F.kl_div(F.log_softmax(model(x), 1), F.softmax(memorized(x), 1), reduction="none").sum(1)
    torch.testing.assert_close(md, expected, atol=1e-5, rtol=1e-4)
    assert (md > 0).all()


def test_md_against_several_memorized_models_equals_one_at_a_time(models):
    """The MD curve's shared forward pass of the current model changes no value, and leaves every mode as found."""
    model, memorized, x, _ = models
    modes = model.training, memorized.training
    model.train()
    memorized.train()
    identical = copy.deepcopy(model)
    together = memorization_discrepancies(model, [memorized, identical], x)
    assert model.training and memorized.training and identical.training
    for md, other in zip(together, (memorized, identical)):
        assert torch.equal(md, memorization_discrepancy(model, other, x))
    assert together[1].abs().max().item() < 1e-5 < together[0].min().item()
    model.train(modes[0])
    memorized.train(modes[1])


def test_dsc_leaves_a_batch_below_threshold_unchanged(models):
    model, memorized, x, y = models
    md = memorization_discrepancy(model, memorized, x).mean().item()
    x_c, steps = dsc_correct(model, memorized, x, y, threshold=md + 1e-3, return_steps=True)
    assert steps == 0 and torch.equal(x_c, x)


def test_dsc_with_zero_threshold_takes_max_steps_and_stays_in_ball(models):
    model, memorized, x, y = models
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_c, steps = dsc_correct(model, memorized, x, y, threshold=0.0, epsilon=0.1, step_size=0.02, max_steps=7,
                             return_steps=True)
    assert steps == 7
    assert (x_c - x).abs().max().item() <= 0.1 + 1e-6 and x_c.min() >= 0 and x_c.max() <= 1
    assert not torch.equal(x_c, x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # the correction descends the current model's loss
        assert F.cross_entropy(model(x_c), y) < F.cross_entropy(model(x), y)


def test_dsc_defender_reports_tau_and_steps(models):
    model, memorized, x, y = models
    learner = Learner(copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.0))
    defender = DEFENDERS["DSC"](DSCConfig(max_steps=3), memorized, DSCThreshold(tau0=0.0, kappa=0.5))
    assert memorization_discrepancy(learner.model, memorized, x).mean() < 2.0
    assert defender.step(learner, x, y, t=4) == {"dsc_tau": 2.0, "dsc_steps": 0}  # τ_4 = 0 + 0.5·4
    info = DEFENDERS["DSC"](DSCConfig(max_steps=3), memorized, DSCThreshold(0.0, 0.0)).step(learner, x, y, 0)
    assert info["dsc_steps"] == 3 and info["dsc_tau"] == 0.0
    assert defender.summary([{"dsc_steps": 1}, {"dsc_steps": 2}]) == {"dsc_mean_steps": 1.5}


def test_calibration_takes_the_quantile_of_clean_batches(models, fashion_mnist):
    model, memorized, _, _ = models
    test = Split(fashion_mnist.test.x[:400], fashion_mnist.test.y[:400])
    cal = calibrate_dsc(DSCConfig(calibrate=0.5, calibrate_batches=4), model, memorized, test, 100,
                        torch.Generator().manual_seed(0))
    assert cal.calibrated and len(cal.clean_batch_md) == 4
    assert cal.tau0 == pytest.approx(float(np.quantile(cal.clean_batch_md, 0.5)), rel=1e-5)
    assert cal.kappa == pytest.approx(0.02 * cal.tau0 / 0.5)
    plain = calibrate_dsc(DSCConfig(), model, memorized, test, 100, torch.Generator())
    assert (plain.tau0, plain.kappa, plain.calibrated) == (0.5, 0.02, False)


def test_at_batch_has_higher_loss_and_the_authors_variant_lower(models):
    model, _, x, y = models
    x_at = pgd_perturb(model, x, y, epsilon=0.1, step_size=0.02, steps=5)
    x_kl = pgd_perturb(model, x, y, epsilon=0.1, step_size=0.02, steps=5, descend_with_kl=True)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        assert F.cross_entropy(model(x_at), y) > clean
        assert F.cross_entropy(model(x_kl), y) < clean
    assert (x_at - x).abs().max().item() <= 0.1 + 1e-6


def _brute_auroc(pos, neg):
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


@pytest.mark.parametrize("pos,neg,expected", [
    ([1, 2, 3], [0], 1.0),
    ([0], [1, 2], 0.0),
    ([1, 1], [1, 1], 0.5),
    ([2, 1], [1, 0], 0.875),
    ([3, 1, 2], [2, 2, 0], 5.0 / 9.0 + 0.5 * 2.0 / 9.0),
])
def test_auroc_hand_computed(pos, neg, expected):
    assert auroc(np.array(pos), np.array(neg)) == pytest.approx(expected)


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40), rng.integers(0, 5, 30)
    assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg))
    with pytest.raises(ValueError):
        auroc(np.array([]), neg)


def test_defenders_are_selected_by_name():
    assert defence_name("OURS") == "DSC" and defence_name("st") == "ST" and defence_name("AT") == "AT"
    with pytest.raises(UserError, match="known: ST, AT, DSC"):
        defence_name("TRADES")
    assert all(issubclass(cls, Defender) for cls in DEFENDERS.values())
