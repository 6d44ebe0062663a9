"""Per-sample detector scores of one arriving batch, higher = more suspicious (SPEC "Detectors").

Every detector has one call shape, as torchattacks has for attacks: ``Detector(fit).score(view)`` with a
``BatchView`` of the batch (``batch_view``). The fitted detectors (kd, lid, mahalanobis) take a
``ReferenceFit`` of clean training samples (``fit_reference``); its math is ``fit_from_features``, so it can be
checked on synthetic features. ``DETECTORS`` lists them all, in the order of the SPEC's table.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.core.data import Split
from utils.core.discrepancy import js_md_from_logits, md_from_logits, reverse_md_from_logits
from utils.errors import UserError
from utils.core.grads import eval_mode

EXACT = "donot_use_mm_for_euclid_dist"  # cdist without the matmul shortcut: exact, and 0 for equal rows


# ------------------------------------------------------------------------------------------ the batch's view

@dataclass
class BatchView:
    """What the detectors see of one batch: θ_t's logits and features, θ_mem's logits, θ_0's logits and features."""

    x: torch.Tensor  # images in [0, 1]
    y: torch.Tensor  # the labels that arrived with the batch
    logits: torch.Tensor  # θ_t, eval mode
    features: torch.Tensor  # θ_t's penultimate features (the input of .fc)
    logits_mem: torch.Tensor | None = None  # θ_mem, eval mode; None without a memorized model
    ref_logits: torch.Tensor | None = None  # the fixed reference θ_0, eval mode; None without one
    ref_features: torch.Tensor | None = None  # θ_0's penultimate features


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x; θ) and the input of the model's last linear layer ``.fc`` (read by a forward pre-hook)."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UserError(f"{type(model).__name__} has no linear last layer named .fc, so its penultimate "
                        f"features cannot be read; the detectors need a model that ends in `self.fc = nn.Linear(...)`")
    seen: list[torch.Tensor] = []
    handle = fc.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[-1].flatten(1)


@torch.no_grad()
def batch_view(model: nn.Module, memorized: nn.Module | None, reference: nn.Module | None,
               x: torch.Tensor, y: torch.Tensor) -> BatchView:
    """One forward pass per model, each in eval mode (modes restored after), no gradients (SPEC "Detectors")."""
    models = list({id(m): m for m in (model, memorized, reference) if m is not None}.values())
    with eval_mode(*models):
        logits, features = logits_and_features(model, x)
        logits_mem = memorized(x) if memorized is not None else None
        if reference is None:
            ref_logits = ref_features = None
        elif reference is model:
            ref_logits, ref_features = logits, features
        else:
            ref_logits, ref_features = logits_and_features(reference, x)
    return BatchView(x, y, logits, features, logits_mem, ref_logits, ref_features)


def split_view(view: BatchView, i: int, parts: int) -> BatchView:
    """The i-th of ``parts`` equal consecutive batches of a view (a view of batches concatenated for speed)."""
    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.chunk(parts)[i]

    return BatchView(*(part(getattr(view, f.name)) for f in fields(BatchView)))


# ---------------------------------------------------------------------------------------- the reference fit

@dataclass
class ReferenceFit:
    """What the fitted detectors keep of the reference features of clean training samples (SPEC "Detectors")."""

    num_classes: int
    class_means: torch.Tensor  # (C, d) μ_c; rows of classes without samples are 0
    class_counts: torch.Tensor  # (C,) int64: samples per class
    precision: torch.Tensor  # (d, d) (Σ + λI)⁻¹, Σ the tied (pooled within-class) covariance
    kd_features: torch.Tensor  # (N_kd, d): at most kd_per_class samples per class, in draw order
    kd_labels: torch.Tensor  # (N_kd,) their labels
    kd_bandwidth: float  # σ: the median nearest-neighbour distance within a class
    lid_batches: torch.Tensor  # (B, L, d): B reference batches of L samples
    lid_k: int  # neighbours of the LID estimate
    self_radius: float  # fitted points this close to a query are the query itself (1e-3·σ)

    def to_dict(self) -> dict:
        """A plain dict of tensors, ints and floats (``torch.save`` / ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_dict(d: dict) -> "ReferenceFit":
        """The fit that ``to_dict`` wrote; a UserError names missing or unexpected keys."""
        names = [f.name for f in fields(ReferenceFit)]
        missing, extra = [n for n in names if n not in d], sorted(set(d) - set(names))
        if missing or extra:
            raise UserError(f"not a saved ReferenceFit: missing keys {missing}, unexpected keys {extra}")
        return ReferenceFit(int(d["num_classes"]), d["class_means"], d["class_counts"], d["precision"],
                            d["kd_features"], d["kd_labels"], float(d["kd_bandwidth"]), d["lid_batches"],
                            int(d["lid_k"]), float(d["self_radius"]))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ReferenceFit":
        """The fit with its tensors on a device (float tensors also cast to ``dtype`` when given)."""
        def move(v):
            if not isinstance(v, torch.Tensor):
                return v
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
        return ReferenceFit(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def class_gaussian(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                   ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """μ_c, n_c and (Σ + λI)⁻¹, Σ = (1/N) Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ, λ = ridge·tr(Σ)/d (SPEC "Detectors")."""
    f = features.double()
    counts = torch.bincount(labels, minlength=num_classes)
    means = torch.zeros(num_classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, labels, f)
    means /= counts.clamp_min(1).unsqueeze(1)
    centred = f - means[labels]
    cov = centred.T @ centred / len(f)
    lam = ridge * cov.trace().item() / cov.shape[0] or ridge  # all features constant: an absolute ridge
    eye = torch.eye(cov.shape[0], dtype=f.dtype, device=f.device)
    precision = torch.cholesky_inverse(torch.linalg.cholesky(cov + lam * eye))
    return means.to(features.dtype), counts, precision.to(features.dtype)


def median_nn_distance(features: torch.Tensor, labels: torch.Tensor) -> float:
    """The median over samples of the distance to the nearest other sample of the same class (1.0 if none > 0)."""
    nearest = []
    for c in torch.unique(labels).tolist():
        f = features[labels == c]
        if len(f) >= 2:
            d = torch.cdist(f, f, compute_mode=EXACT).fill_diagonal_(float("inf"))
            nearest.append(d.min(dim=1).values)
    d = torch.cat(nearest) if nearest else features.new_zeros(0)
    d = d[d > 0]
    return d.median().item() if len(d) else 1.0


def fit_from_features(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, kd_per_class: int = 500,
                      lid_k: int = 20, lid_batch: int = 100, lid_batches: int = 10,
                      ridge: float = 1e-3) -> ReferenceFit:
    """The ReferenceFit of clean samples' reference features and true labels (SPEC "Detectors")."""
    if features.dim() != 2 or labels.shape != (len(features),):
        raise UserError(f"need features (N, d) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise UserError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if not 1 <= lid_k < lid_batch:
        raise UserError(f"LID needs 1 <= k < batch size, got k = {lid_k}, batch size {lid_batch}")
    if len(features) < lid_batch:
        raise UserError(f"the fitted detectors need at least {lid_batch} clean samples (one LID reference "
                        f"batch), got {len(features)}")
    if kd_per_class < 1 or lid_batches < 1 or ridge <= 0:
        raise UserError(f"need kd_per_class >= 1, lid_batches >= 1 and ridge > 0, got {kd_per_class}, "
                        f"{lid_batches}, {ridge}")
    labels = labels.long()
    means, counts, precision = class_gaussian(features, labels, num_classes, ridge=ridge)
    keep = torch.cat([torch.nonzero(labels == c).squeeze(1)[:kd_per_class] for c in range(num_classes)])
    kd_features, kd_labels = features[keep], labels[keep]
    sigma = median_nn_distance(kd_features, kd_labels)
    b = min(lid_batches, len(features) // lid_batch)
    lid = features[:b * lid_batch].reshape(b, lid_batch, features.shape[1])
    return ReferenceFit(num_classes, means, counts, precision, kd_features, kd_labels, sigma, lid, lid_k,
                        1e-3 * sigma)


@torch.no_grad()
def fit_reference(reference_model: nn.Module, split: Split, *, n_samples: int, generator: torch.Generator,
                  batch_size: int = 500, kd_per_class: int = 500, lid_k: int = 20, lid_batch: int = 100,
                  lid_batches: int = 10, ridge: float = 1e-3) -> ReferenceFit:
    """``fit_from_features`` on the reference features of ``n_samples`` clean samples drawn with ``generator``."""
    if not 1 <= n_samples <= len(split):
        raise UserError(f"n_samples must lie in [1, {len(split)}] (the split's size), got {n_samples}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    idx = torch.randperm(len(split), generator=generator, device=generator.device)[:n_samples]
    feats, labels = [], []
    with eval_mode(reference_model):
        for chunk in idx.split(batch_size):
            x, y = split.batch(chunk)
            feats.append(logits_and_features(reference_model, x)[1])
            labels.append(y)
    return fit_from_features(torch.cat(feats), torch.cat(labels), num_classes=reference_model.fc.out_features,
                             kd_per_class=kd_per_class, lid_k=lid_k, lid_batch=lid_batch,
                             lid_batches=lid_batches, ridge=ridge)


# ------------------------------------------------------------------------------------------ the score math

def grad_norm_from_logits(logits: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖∇_(W,b) CE‖₂ of the last layer = ‖p − e_y‖₂·√(‖h‖₂² + 1) per sample (SPEC "Detectors")."""
    residual = F.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return residual.norm(dim=1) * (features.pow(2).sum(dim=1) + 1).sqrt()


def kd_score(z: torch.Tensor, predicted: torch.Tensor, fit: ReferenceFit) -> torch.Tensor:
    """−log (1/m) Σ_i exp(−‖z − f_i‖²/2σ²) over the fitted f_i of the predicted class (SPEC "Detectors")."""
    out = torch.full((len(z),), float("inf"), dtype=z.dtype, device=z.device)
    for c in torch.unique(predicted).tolist():
        rows = predicted == c
        ref = fit.kd_features[fit.kd_labels == c]
        if len(ref) == 0:
            continue  # no clean sample of this class: density 0
        d = torch.cdist(z[rows], ref, compute_mode=EXACT)
        other = d > fit.self_radius  # the query itself (a fitted sample that arrives again) is left out
        log_k = (-d.pow(2) / (2 * fit.kd_bandwidth ** 2)).masked_fill(~other, float("-inf"))
        m = other.sum(dim=1)
        log_density = torch.logsumexp(log_k, dim=1) - m.clamp_min(1).to(z.dtype).log()
        out[rows] = torch.where(m > 0, -log_density, out[rows])
    return out


def lid_mle(query: torch.Tensor, reference: torch.Tensor, *, k: int, self_radius: float = 0.0) -> torch.Tensor:
    """LID(z) = −((1/k) Σ_{i≤k} log(r_i/r_k))⁻¹, r_i the i-th nearest reference distance (SPEC "Detectors")."""
    d = torch.cdist(query, reference, compute_mode=EXACT)
    d = d.masked_fill(d <= self_radius, float("inf"))  # the query itself is not its own neighbour
    r = d.topk(k, dim=1, largest=False).values  # ascending
    tiny = torch.finfo(r.dtype).tiny
    mean_log = torch.log(r.clamp_min(tiny) / r[:, -1:].clamp_min(tiny)).mean(dim=1)
    return -1.0 / mean_log.clamp_max(-tiny)  # all k distances equal: the largest finite value


def lid_score(z: torch.Tensor, fit: ReferenceFit) -> torch.Tensor:
    """The mean of LID(z) over the fitted reference batches (SPEC "Detectors")."""
    return torch.stack([lid_mle(z, ref, k=fit.lid_k, self_radius=fit.self_radius)
                        for ref in fit.lid_batches]).mean(dim=0)


def mahalanobis_score(z: torch.Tensor, fit: ReferenceFit, w: torch.Tensor | None = None) -> torch.Tensor:
    """min_c (z − μ_c)ᵀ (Σ + λI)⁻¹ (z − μ_c), the squared distance, over classes with samples (SPEC "Detectors")."""
    if w is None:  # P = W Wᵀ, so the form is ‖Wᵀ(z − μ_c)‖²
        w = torch.linalg.cholesky(fit.precision.double()).to(z.dtype)
    dist = ((z @ w).unsqueeze(1) - (fit.class_means @ w).unsqueeze(0)).pow(2).sum(dim=2)  # (n, C)
    dist = dist.masked_fill((fit.class_counts == 0).unsqueeze(0), float("inf"))
    return dist.min(dim=1).values


def _classes(y: torch.Tensor) -> list[torch.Tensor]:
    """The sample indices of each label present, in label order."""
    return [torch.nonzero(y == c).squeeze(1) for c in torch.unique(y).tolist()]


def spectral_scores(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨z_i − z̄_c, v_c⟩², v_c the top right singular vector of class c's centred features (SPEC "Detectors")."""
    out = torch.zeros(len(z), dtype=z.dtype, device=z.device)
    for rows in _classes(y):
        if len(rows) < 2:
            continue
        r = z[rows] - z[rows].mean(dim=0)
        v = torch.linalg.svd(r, full_matrices=False).Vh[0]
        out[rows] = (r @ v).pow(2)
    return out


def two_means(points: torch.Tensor, *, max_iter: int = 100) -> torch.Tensor:
    """Lloyd's 2-means from a deterministic start: the point farthest from the mean, then the point farthest
    from it (first index on ties); a point goes to centre 1 only if strictly closer. Returns 0/1 per point."""
    i0 = (points - points.mean(dim=0)).pow(2).sum(dim=1).argmax()
    i1 = (points - points[i0]).pow(2).sum(dim=1).argmax()
    centres = points[torch.stack([i0, i1])].clone()
    assign = torch.zeros(len(points), dtype=torch.long, device=points.device)
    for it in range(max_iter):
        d = (points.unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(dim=2)
        new = (d[:, 1] < d[:, 0]).long()
        if it > 0 and torch.equal(new, assign):
            break
        assign = new
        for j in (0, 1):
            if (assign == j).any():
                centres[j] = points[assign == j].mean(dim=0)
    return assign


def activation_clustering_scores(z: torch.Tensor, y: torch.Tensor, *, max_dims: int = 10) -> torch.Tensor:
    """1 − |own cluster|/n_c after 2-means on class c's features reduced by PCA (SPEC "Detectors")."""
    out = torch.zeros(len(z), dtype=z.dtype, device=z.device)
    for rows in _classes(y):
        m = len(rows)
        if m < 3:
            continue
        r = z[rows] - z[rows].mean(dim=0)
        q = min(max_dims, m - 1, r.shape[1])
        projected = r @ torch.linalg.svd(r, full_matrices=False).Vh[:q].T
        assign = two_means(projected)
        sizes = torch.bincount(assign, minlength=2).to(z.dtype)
        out[rows] = 1 - sizes[assign] / m
    return out


# ------------------------------------------------------------------------------------------- the detectors

class Detector:
    """A per-sample score of a BatchView, higher = more suspicious (SPEC "Detectors")."""

    name = "detector"
    needs_memorized = False  # reads view.logits_mem
    needs_fit = False  # takes a ReferenceFit
    needs_reference = False  # reads view.ref_features / view.ref_logits

    def __init__(self, fit: ReferenceFit | None = None):
        if self.needs_fit and fit is None:
            raise UserError(f"detector {self.name!r} needs a ReferenceFit of clean training samples "
                            f"(utils.detectors.fit_reference)")
        self.fit = fit

    def score(self, view: BatchView) -> torch.Tensor:
        """Shape (n,), float, higher = more suspicious."""
        raise NotImplementedError

    def __call__(self, view: BatchView) -> torch.Tensor:
        return self.score(view)

    def _mem(self, view: BatchView) -> torch.Tensor:
        if view.logits_mem is None:
            raise UserError(f"detector {self.name!r} needs the memorized model's logits, and there is no "
                            f"memorized model")
        return view.logits_mem

    def _ref(self, view: BatchView) -> torch.Tensor:
        if view.ref_features is None or view.ref_logits is None:
            raise UserError(f"detector {self.name!r} needs the reference model's features; pass the reference "
                            f"model to batch_view")
        return view.ref_features

    def _fit_like(self, z: torch.Tensor) -> ReferenceFit:
        """The fit on z's device and dtype (moved once, then kept)."""
        assert self.fit is not None
        if self.fit.class_means.device != z.device or self.fit.class_means.dtype != z.dtype:
            self.fit = self.fit.to(z.device, z.dtype)
        return self.fit


class MD(Detector):
    """KL(p_mem ‖ p_cur), Zhu et al. ICML 2023."""
    name, needs_memorized = "md", True

    def score(self, view: BatchView) -> torch.Tensor:
        return md_from_logits(view.logits, self._mem(view)).clamp_min(0.0)


class ReverseMD(Detector):
    """KL(p_cur ‖ p_mem)."""
    name, needs_memorized = "md_reverse", True

    def score(self, view: BatchView) -> torch.Tensor:
        return reverse_md_from_logits(view.logits, self._mem(view)).clamp_min(0.0)


class JSMD(Detector):
    """Jensen–Shannon divergence of p_mem and p_cur."""
    name, needs_memorized = "md_js", True

    def score(self, view: BatchView) -> torch.Tensor:
        return js_md_from_logits(view.logits, self._mem(view)).clamp_min(0.0)


class Loss(Detector):
    """CE(f(x; θ_t), y) with the arriving label."""
    name = "loss"

    def score(self, view: BatchView) -> torch.Tensor:
        return F.cross_entropy(view.logits, view.y, reduction="none")


class GradNorm(Detector):
    """‖∇ CE‖₂ with respect to θ_t's last layer (weight and bias), in closed form."""
    name = "grad_norm"

    def score(self, view: BatchView) -> torch.Tensor:
        return grad_norm_from_logits(view.logits, view.features, view.y)


class Confidence(Detector):
    """1 − max_c p_c(x; θ_t)."""
    name = "confidence"

    def score(self, view: BatchView) -> torch.Tensor:
        return 1 - F.softmax(view.logits, dim=1).max(dim=1).values


class KD(Detector):
    """Kernel density of θ_0's features under the predicted class, Feinman et al. 2017."""
    name, needs_fit, needs_reference = "kd", True, True

    def score(self, view: BatchView) -> torch.Tensor:
        z = self._ref(view)
        return kd_score(z, view.ref_logits.argmax(dim=1), self._fit_like(z))


class LID(Detector):
    """Local intrinsic dimensionality of θ_0's features, Ma et al. ICLR 2018."""
    name, needs_fit, needs_reference = "lid", True, True

    def score(self, view: BatchView) -> torch.Tensor:
        z = self._ref(view)
        return lid_score(z, self._fit_like(z))


class Mahalanobis(Detector):
    """Minimum class-conditional Mahalanobis distance of θ_0's features, Lee et al. NeurIPS 2018."""
    name, needs_fit, needs_reference = "mahalanobis", True, True
    _w: torch.Tensor | None = None  # the Cholesky factor of the fit's precision, computed once

    def score(self, view: BatchView) -> torch.Tensor:
        z = self._ref(view)
        fit = self._fit_like(z)
        if self._w is None or self._w.device != z.device or self._w.dtype != z.dtype:
            self._w = torch.linalg.cholesky(fit.precision.double()).to(z.dtype)
        return mahalanobis_score(z, fit, self._w)


class Spectral(Detector):
    """Spectral signatures within the batch's classes, Tran et al. NeurIPS 2018."""
    name, needs_reference = "spectral", True

    def score(self, view: BatchView) -> torch.Tensor:
        return spectral_scores(self._ref(view), view.y)


class ActivationClustering(Detector):
    """2-means within the batch's classes, Chen et al. 2018 (PCA instead of their ICA)."""
    name, needs_reference = "activation_clustering", True

    def score(self, view: BatchView) -> torch.Tensor:
        return activation_clustering_scores(self._ref(view), view.y)


DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (
    MD, ReverseMD, JSMD, Loss, GradNorm, Confidence, KD, LID, Mahalanobis, Spectral, ActivationClustering)}


def build_detectors(names: Sequence[str], fit: ReferenceFit | None = None) -> list[Detector]:
    """The named detectors, in the given order; a UserError for an unknown name or a fitted one without a fit."""
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise UserError(f"unknown detector(s) {', '.join(map(repr, unknown))}; known: {', '.join(DETECTORS)}")
    return [DETECTORS[n](fit) for n in names]
