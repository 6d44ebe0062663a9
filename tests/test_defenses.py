"""MD, DSC, AT and the AUROC helper (SPEC "Memorization Discrepancy", "DSC", "Baselines")."""
import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import online_accu_train
from utils.checkpoint import save_checkpoint
from utils.data import DATASETS, BatchLoader, Split, load_split
from utils.defenses import get_defender, dsc_correct, pgd_perturb
from utils.discrepancy import memorization_discrepancy
from utils.errors import UserError
from utils.metrics import auroc
from utils.models import build_model, model_spec
from utils.train import set_seed, train_epoch

INFO = DATASETS["fashion-mnist"]


@pytest.fixture(scope="module")
def models():
    """A memorized model (after 1 epoch on 2000 real images) and the current one (after 2 more epochs)."""
    set_seed(0)
    train = load_split("fashion-mnist", "data", True, download=False)
    sub = Split(train.x[:2000], train.y[:2000])
    model = build_model(model_spec("cnn", INFO, width=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = BatchLoader(sub, 100, shuffle=True)
    train_epoch(model, loader, opt)
    memorized = copy.deepcopy(model).eval()
    train_epoch(model, loader, opt)
    train_epoch(model, loader, opt)
    model.eval()
    x, y = Split(train.x[2000:2100], train.y[2000:2100]).batch(torch.arange(100))
    return model, memorized, x, y


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
    # the correction descends the current model's loss
    with torch.no_grad():
        assert F.cross_entropy(model(x_c), y) < F.cross_entropy(model(x), y)


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
    assert get_defender("OURS")[0] == "DSC"
    assert get_defender("st")[0] == "ST"
    assert get_defender("AT")[0] == "AT"
    with pytest.raises(UserError, match="known: ST, AT, DSC"):
        get_defender("TRADES")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    set_seed(0)
    folder = tmp_path_factory.mktemp("ck")
    spec = model_spec("cnn", INFO, width=4)
    for epoch in (1, 2):
        save_checkpoint(str(folder / f"epoch{epoch}.pth"), build_model(spec), spec, epoch=epoch, err_cls=0.5, args={})
    other = model_spec("cnn", INFO, width=6)
    save_checkpoint(str(folder / "other.pth"), build_model(other), other, epoch=1, err_cls=0.5, args={})
    return folder


def _run(folder, out, *extra):
    argv = ["--resume", str(folder), "--model_name", "epoch2.pth", "--device", "cpu", "--out", str(out),
            "--batch_size", "50", "--test_batch_size", "100", "--lr", "0.1", "--threshold", "1.0",
            "--epochs", "2", "--use_advtrigger", "--epsilon", "0.05", *extra]
    assert online_accu_train.main(argv) == 0
    return json.load(open(out / "summary.json"))


def test_dsc_run_end_to_end_reports_md_and_steps(ckpts, tmp_path):
    s = _run(ckpts, tmp_path / "d", "--med", "OURS", "--memorized_model", str(ckpts / "epoch1.pth"),
             "--dsc_tau0", "0", "--dsc_kappa", "0", "--dsc_max_steps", "3")
    assert s["dsc_mean_steps"] == 3
    assert 0.0 <= s["md_auroc_poison_vs_clean"] <= 1.0 and 0.0 <= s["md_auroc_poison_vs_noise"] <= 1.0


def test_calibrated_dsc_sets_tau_from_clean_batches(ckpts, tmp_path):
    _run(ckpts, tmp_path / "c", "--med", "DSC", "--memorized_model", str(ckpts / "epoch1.pth"),
         "--dsc_calibrate", "0.5", "--dsc_calibrate_batches", "4")
    cfg = json.load(open(tmp_path / "c" / "config.json"))["dsc"]
    assert cfg["calibrated"] and cfg["tau0"] == pytest.approx(float(np.quantile(cfg["clean_batch_md"], 0.5)))
    assert cfg["kappa"] == pytest.approx(0.02 * cfg["tau0"] / 0.5)


def test_dsc_needs_a_matching_memorized_model(ckpts, tmp_path):
    with pytest.raises(UserError, match="not found"):
        _run(ckpts, tmp_path / "m", "--med", "DSC")  # default <resume>/epoch20.pth is missing
    with pytest.raises(UserError, match="width"):
        _run(ckpts, tmp_path / "w", "--med", "DSC", "--memorized_model", str(ckpts / "other.pth"))
