"""Per-sample detectors and the TPR at a fixed FPR (SPEC "Detectors"): each on a case with a known answer."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.core.data import DATASETS, Split
from utils.detect.detectors import (DETECTORS, BatchView, ReferenceFit, activation_clustering_scores, batch_view,
                             build_detectors, fit_from_features, fit_reference, kd_score, lid_mle,
                             logits_and_features, mahalanobis_score, spectral_scores, split_view)
from utils.errors import UserError
from utils.core.metrics import auroc, tpr_at_fpr
from utils.core.models import build_model, model_spec


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def view(logits, y=None, features=None, logits_mem=None, ref_features=None, ref_logits=None) -> BatchView:
    """A BatchView built by hand; unused fields are placeholders."""
    n = len(logits)
    y = torch.zeros(n, dtype=torch.long) if y is None else y
    features = torch.zeros(n, 1) if features is None else features
    return BatchView(torch.zeros(n, 1), y, logits, features, logits_mem, ref_logits, ref_features)


def score(name: str, v: BatchView, fit: ReferenceFit | None = None) -> torch.Tensor:
    return build_detectors([name], fit)[0].score(v)


class Tiny(nn.Module):
    """A two-layer net whose last layer is .fc."""

    def __init__(self, d_in: int = 5, d_hidden: int = 4, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh())
        self.fc = nn.Linear(d_hidden, classes)

    def forward(self, x):
        return self.fc(self.body(x))


# --------------------------------------------------------------------------------------------- TPR at FPR

def test_tpr_at_fpr_hand_cases():
    neg = np.arange(20.0)  # 0..19: at 5 % FPR one negative may be flagged, so flag > 18 (i.e. >= 19)
    assert tpr_at_fpr([18, 18.5, 19, 20, 5], neg, 0.05) == pytest.approx(3 / 5)
    assert tpr_at_fpr([18, 18.5, 19, 20, 5], neg, 0.0) == pytest.approx(1 / 5)  # only 20 > every negative
    assert tpr_at_fpr([18, 18.5, 19, 20, 5], neg, 0.1) == pytest.approx(4 / 5)  # two negatives: > 17
    assert tpr_at_fpr([0.5], np.arange(100.0), 0.29) == 0.0  # k = 29 exactly, despite 0.29·100 < 29 in floats
    assert tpr_at_fpr([69.5, 70.5], np.arange(100.0), 0.29) == 0.5  # flag > 70 (29 negatives: 71..99)


def test_tpr_at_fpr_ties_and_all_equal():
    neg = np.array([0.0] * 18 + [5.0, 5.0])
    assert tpr_at_fpr([5, 5, 6], neg, 0.05) == pytest.approx(1 / 3)  # the tied pair at 5 would be 10 % FPR
    assert tpr_at_fpr([5, 5, 6], neg, 0.1) == 1.0
    assert tpr_at_fpr([1, 1], [1, 1, 1], 0.5) == 0.0  # all equal: flagging any flags every negative
    assert tpr_at_fpr([1, 1], [1, 1, 1], 1.0) == 1.0


def test_tpr_at_fpr_errors():
    with pytest.raises(UserError, match="at least one"):
        tpr_at_fpr([], [1.0])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        tpr_at_fpr([1.0], [0.0], 1.5)
    with pytest.raises(UserError, match="NaN"):
        tpr_at_fpr([float("nan")], [0.0])


# ---------------------------------------------------------------------------------------------- MD family

def test_md_family_is_zero_for_identical_models():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(16, 5, generator=gen())
    v = batch_view(model, copy.deepcopy(model), None, x, torch.zeros(16, dtype=torch.long))
    for name in ("md", "md_reverse", "md_js"):
        s = score(name, v)
        assert s.shape == (16,) and s.abs().max().item() < 1e-6


def test_md_family_hand_computed():
    p_mem, p_cur = [0.5, 0.5], [0.9, 0.1]
    v = view(torch.tensor([p_cur]).log(), logits_mem=torch.tensor([p_mem]).log())
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    js = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) \
        + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    assert score("md", v).item() == pytest.approx(kl, abs=1e-6)
    assert score("md_reverse", v).item() == pytest.approx(reverse, abs=1e-6)
    assert score("md_js", v).item() == pytest.approx(js, abs=1e-6)


def test_md_without_memorized_model_is_a_clear_error():
    with pytest.raises(UserError, match="memorized"):
        score("md", view(torch.zeros(2, 3)))


# ---------------------------------------------------------------------------------- θ_t's own output scores

def test_loss_and_confidence_against_direct_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5]])
    y = torch.tensor([0, 2, 0])
    v = view(logits, y)
    expected_loss = [math.log(sum(math.exp(a) for a in row)) - row[c] for row, c in zip(logits.tolist(), y.tolist())]
    expected_conf = [1 - max(math.exp(a) for a in row) / sum(math.exp(a) for a in row) for row in logits.tolist()]
    torch.testing.assert_close(score("loss", v), torch.tensor(expected_loss))
    torch.testing.assert_close(score("confidence", v), torch.tensor(expected_conf))
    assert score("confidence", v)[1].item() == pytest.approx(2 / 3)  # uniform over 3 classes


def test_grad_norm_matches_autograd_on_the_last_layer():
    torch.manual_seed(0)
    model = Tiny()
    x, y = torch.randn(6, 5, generator=gen(1)), torch.tensor([0, 1, 2, 0, 1, 2])
    s = score("grad_norm", batch_view(model, None, None, x, y))
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        gw, gb = torch.autograd.grad(loss, [model.fc.weight, model.fc.bias])
        assert s[i].item() == pytest.approx((gw.pow(2).sum() + gb.pow(2).sum()).sqrt().item(), rel=1e-5)


# ------------------------------------------------------------------------------------- the fitted detectors

def gaussian_classes(n_per_class: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in 8-d with anisotropic noise; ``shift`` moves every point along the least-variance axis."""
    g = gen(seed)
    scale = torch.tensor([3.0, 2.0, 1.5, 1.0, 1.0, 0.7, 0.5, 0.3])
    means = torch.stack([torch.zeros(8), torch.full((8,), 4.0)])
    y = torch.arange(2).repeat_interleave(n_per_class)
    z = means[y] + torch.randn(len(y), 8, generator=g) * scale
    z[:, 7] += shift
    return z, y


@pytest.fixture(scope="module")
def gauss_fit() -> ReferenceFit:
    z, y = gaussian_classes(200, seed=0)
    return fit_from_features(z, y, num_classes=3)  # class 2 has no samples


def test_fit_from_features_class_statistics(gauss_fit):
    z, y = gaussian_classes(200, seed=0)
    torch.testing.assert_close(gauss_fit.class_means[:2], torch.stack([z[y == 0].mean(0), z[y == 1].mean(0)]))
    assert gauss_fit.class_counts.tolist() == [200, 200, 0]
    assert gauss_fit.lid_batches.shape == (4, 100, 8) and gauss_fit.kd_features.shape == (400, 8)
    assert gauss_fit.kd_bandwidth > 0 and gauss_fit.self_radius == pytest.approx(1e-3 * gauss_fit.kd_bandwidth)


def test_mahalanobis_is_zero_at_a_class_mean_and_separates_a_shift(gauss_fit):
    at_mean = mahalanobis_score(gauss_fit.class_means[:2], gauss_fit)
    assert at_mean.abs().max().item() < 1e-4
    z = torch.randn(5, 8, generator=gen(14))
    by_hand = torch.stack([torch.stack([(v - m) @ gauss_fit.precision @ (v - m) for m in gauss_fit.class_means[:2]])
                           for v in z]).min(dim=1).values  # class 2 has no samples: not a candidate
    torch.testing.assert_close(mahalanobis_score(z, gauss_fit), by_hand, rtol=1e-4, atol=1e-4)
    clean, _ = gaussian_classes(100, seed=1)
    shifted, _ = gaussian_classes(100, seed=2, shift=2.0)  # ≈ 6.7 standard deviations along the thinnest axis
    a = auroc(score("mahalanobis", view(torch.zeros(200, 2), ref_features=shifted, ref_logits=torch.zeros(200, 2)),
                    gauss_fit).numpy(),
              mahalanobis_score(clean, gauss_fit).numpy())
    assert a > 0.95


def test_kd_hand_computed_and_leaves_the_query_itself_out():
    feats = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0]])
    fit = fit_from_features(feats.repeat(25, 1), torch.tensor([0, 0, 1, 1]).repeat(25), num_classes=2)
    fit.kd_features, fit.kd_labels = feats, torch.tensor([0, 0, 1, 1])
    fit.kd_bandwidth, fit.self_radius = 0.5, 1e-4
    z = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    s = kd_score(z, torch.tensor([0, 0]), fit)
    # z0: distances² 1 and 2 to class 0's points; σ² = 0.25
    assert s[0].item() == pytest.approx(-math.log(0.5 * (math.exp(-1 / 0.5) + math.exp(-2 / 0.5))), rel=1e-5)
    # z1 is the fitted point (0, 0) itself: only (1, 0) counts, at distance² 1
    assert s[1].item() == pytest.approx(1 / 0.5, rel=1e-5)
    assert kd_score(z, torch.tensor([2, 2]), fit).isinf().all()  # a class without clean samples: density 0


def test_kd_far_points_score_higher(gauss_fit):
    near, y_near = gaussian_classes(100, seed=3)
    far, y_far = gaussian_classes(100, seed=4, shift=5.0)  # ≈ 17 sd off the thinnest axis
    pred = lambda y: F.one_hot(y, 3).float()  # noqa: E731  (logits whose argmax is y)
    s_near = score("kd", view(torch.zeros(200, 3), ref_features=near, ref_logits=pred(y_near)), gauss_fit)
    s_far = score("kd", view(torch.zeros(200, 3), ref_features=far, ref_logits=pred(y_far)), gauss_fit)
    assert auroc(s_far.numpy(), s_near.numpy()) > 0.95


def test_lid_recovers_the_dimension_of_a_uniform_cloud():
    estimates = {}
    for d in (2, 8):
        ref = torch.rand(2000, d, generator=gen(d))
        query = 0.25 + 0.5 * torch.rand(200, d, generator=gen(100 + d))  # inside: no boundary effect
        estimates[d] = lid_mle(query, ref, k=20).mean().item()
    assert 1.6 < estimates[2] < 2.6
    assert 6.5 < estimates[8] < 11


def test_lid_is_higher_off_a_low_dimensional_subspace():
    basis = torch.linalg.qr(torch.randn(10, 2, generator=gen(5))).Q  # a 2-d subspace of R^10
    clean = torch.randn(500, 2, generator=gen(6)) @ basis.T
    fit = fit_from_features(clean, torch.zeros(500, dtype=torch.long), num_classes=1)
    on = torch.randn(100, 2, generator=gen(7)) @ basis.T
    off = on + 0.3 * torch.randn(100, 10, generator=gen(8))
    s = score("lid", view(torch.zeros(200, 1), ref_features=torch.cat([off, on]), ref_logits=torch.zeros(200, 1)),
              fit)
    assert auroc(s[:100].numpy(), s[100:].numpy()) > 0.9
    assert s[100:].median().item() < 3.0


def test_lid_leaves_the_query_itself_out():
    ref = torch.rand(100, 3, generator=gen(9))
    with_self = lid_mle(ref[:5], ref, k=20)  # each query is in the reference batch
    without = torch.stack([lid_mle(ref[i:i + 1], torch.cat([ref[:i], ref[i + 1:]]), k=20)[0] for i in range(5)])
    torch.testing.assert_close(with_self, without)


# -------------------------------------------------------------------------------- the in-batch detectors

def test_spectral_signature_ranks_the_shifted_points_first():
    g = gen(10)
    z = torch.randn(55, 10, generator=g)
    z[50:, 0] += 6.0  # a few poisons, shifted along one direction
    y = torch.zeros(56, dtype=torch.long)
    z = torch.cat([z, torch.randn(1, 10, generator=g)])
    y[55] = 3  # a class with one sample
    s = spectral_scores(z, y)
    assert set(s.topk(5).indices.tolist()) == {50, 51, 52, 53, 54}
    assert s[55].item() == 0.0


def test_activation_clustering_small_cluster_scores_higher_and_is_deterministic():
    g = gen(11)
    big = torch.randn(40, 16, generator=g)
    small = torch.randn(8, 16, generator=g) + 8.0
    other = torch.randn(2, 16, generator=g)  # a class with 2 samples: scores 0
    z = torch.cat([big, small, other])
    y = torch.tensor([1] * 48 + [4] * 2)
    state = torch.random.get_rng_state()
    s = activation_clustering_scores(z, y)
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG
    torch.testing.assert_close(s[:40], torch.full((40,), 1 - 40 / 48))
    torch.testing.assert_close(s[40:48], torch.full((8,), 1 - 8 / 48))
    assert s[48:].tolist() == [0.0, 0.0]
    assert torch.equal(activation_clustering_scores(z, y), s)
    perm = torch.randperm(50, generator=gen(12))
    torch.testing.assert_close(activation_clustering_scores(z[perm], y[perm]), s[perm])


# ------------------------------------------------------------------------- real models, fitting, the registry

INFO = DATASETS["fashion-mnist"]


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model_spec("cnn", INFO, width=4))


def fake_split(n: int = 240) -> Split:
    g = gen(13)
    return Split(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))


def test_batch_view_reads_the_fc_input_and_restores_modes():
    model, memorized, reference = small_cnn(0), small_cnn(1), small_cnn(2)
    model.train()
    memorized.eval()
    reference.train()
    reference.features[1].eval()  # a mixed-mode model keeps its mix
    buffers = [b.clone() for b in model.buffers()]
    x, y = fake_split(8).batch(torch.arange(8))
    v = batch_view(model, memorized, reference, x, y)
    assert model.training and not memorized.training and reference.training
    assert not reference.features[1].training and reference.features[4].training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # eval: BN statistics untouched
    model.eval()
    reference.eval()
    with torch.no_grad():
        h = torch.flatten(model.features(model.normalize(x)), 1)
        torch.testing.assert_close(v.features, h)
        torch.testing.assert_close(v.logits, model.fc(h))
        torch.testing.assert_close(v.logits_mem, memorized(x))
        torch.testing.assert_close(v.ref_logits, reference(x))
    assert v.features.shape == (8, 4 * 4 * 9) and not v.features.requires_grad
    assert batch_view(model, None, model, x, y).ref_features is not None


def test_logits_and_features_needs_a_linear_fc():
    with pytest.raises(UserError, match=r"\.fc"):
        logits_and_features(nn.Sequential(nn.Linear(3, 2)), torch.zeros(1, 3))
    fit = fit_from_features(torch.randn(100, 2), torch.zeros(100, dtype=torch.long), num_classes=3)
    with pytest.raises(UserError, match="reference model"):
        score("kd", view(torch.zeros(2, 3)), fit)  # a view built without a reference model


def test_fit_reference_round_trip_and_seeded(tmp_path):
    model, split = small_cnn(0), fake_split()
    state = torch.random.get_rng_state()
    fit = fit_reference(model, split, n_samples=200, generator=gen(0), batch_size=64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert fit.num_classes == 10 and fit.lid_batches.shape == (2, 100, 144) and fit.lid_k == 20
    path = tmp_path / "fit.pt"
    torch.save(fit.to_dict(), path)
    back = ReferenceFit.from_dict(torch.load(path, weights_only=True))
    again = fit_reference(model, split, n_samples=200, generator=gen(0), batch_size=100)
    other = fit_reference(model, split, n_samples=200, generator=gen(1))
    for key, value in fit.to_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(back.to_dict()[key], value), key
            torch.testing.assert_close(again.to_dict()[key], value, rtol=1e-4, atol=1e-5)
        else:
            assert back.to_dict()[key] == value and type(back.to_dict()[key]) is type(value), key
    assert not torch.equal(other.class_counts, fit.class_counts)
    with pytest.raises(UserError, match="missing"):
        ReferenceFit.from_dict({"num_classes": 10})


def test_every_detector_scores_a_real_batch():
    model, split = small_cnn(0), fake_split()
    memorized, reference = small_cnn(1), small_cnn(2)
    fit = fit_reference(reference, split, n_samples=200, generator=gen(0))
    x, y = split.batch(torch.arange(200, 240))
    v = batch_view(model, memorized, reference, x, y)
    for detector in build_detectors(list(DETECTORS), fit):
        s = detector.score(v)
        assert s.shape == (40,) and s.dtype == torch.float32 and torch.isfinite(s).all(), detector.name
        assert torch.equal(detector.score(v), s), detector.name  # deterministic


def test_a_concatenated_view_split_scores_like_separate_views():
    """The online measurement runs one forward pass over poisoned, clean and noise batches together and splits
    the view: every detector (spectral and clustering look within a batch) scores as on each batch alone."""
    model, split = small_cnn(0), fake_split()
    memorized, reference = small_cnn(1), small_cnn(2)
    fit = fit_reference(reference, split, n_samples=200, generator=gen(0))
    batches = [split.batch(torch.arange(a, a + 30)) for a in (0, 100, 200)]
    whole = batch_view(model, memorized, reference, torch.cat([x for x, _ in batches]),
                       torch.cat([y for _, y in batches]))
    for i, (x, y) in enumerate(batches):
        alone, part = batch_view(model, memorized, reference, x, y), split_view(whole, i, 3)
        for detector in build_detectors(list(DETECTORS), fit):
            torch.testing.assert_close(detector.score(part), detector.score(alone), rtol=1e-4, atol=1e-5,
                                       msg=detector.name)


def test_registry_order_and_errors():
    assert list(DETECTORS) == ["md", "md_reverse", "md_js", "loss", "grad_norm", "confidence", "kd", "lid",
                               "mahalanobis", "spectral", "activation_clustering"]
    assert [d.name for d in build_detectors(["loss", "md"])] == ["loss", "md"]
    with pytest.raises(UserError, match="unknown detector.*'nope'.*known: md, md_reverse"):
        build_detectors(["loss", "nope"])
    for name in ("kd", "lid", "mahalanobis"):
        assert DETECTORS[name].needs_fit
        with pytest.raises(UserError, match="ReferenceFit"):
            build_detectors([name], None)
    assert {n for n, d in DETECTORS.items() if d.needs_memorized} == {"md", "md_reverse", "md_js"}
