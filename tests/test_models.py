"""utils.models: output shapes per arch/norm/input, normalisation inside the model, bad specs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from utils.core.data import dataset_info
from utils.errors import UserError
from utils.core.models import ARCHS, ModelSpec, Normalize, build_model, model_spec


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("dataset,channels,size", [("fashion-mnist", 1, 28), ("cifar10", 3, 32),
                                                   ("cifar100", 3, 32)])
def test_output_shapes(arch, norm, dataset, channels, size):
    info = dataset_info(dataset)
    spec = model_spec(arch, info, norm=norm, groups=2, width=4)
    assert spec.in_channels == channels and spec.num_classes == info.num_classes
    torch.manual_seed(0)
    model = build_model(spec)
    norms = {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}
    assert norms == ({nn.BatchNorm2d} if norm == "bn" else {nn.GroupNorm})
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == channels and first_conv.out_channels == 4  # the width is used
    x = torch.rand(3, channels, size, size)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (3, info.num_classes)
        assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_default_widths():
    info = dataset_info("cifar10")
    resnet = build_model(model_spec("resnet18", info))
    cnn = build_model(model_spec("cnn", info))
    assert resnet.conv1.out_channels == 64 and resnet.fc.in_features == 512
    assert next(m for m in cnn.modules() if isinstance(m, nn.Conv2d)).out_channels == 16


def test_group_norm_groups_divide_channels():
    spec = model_spec("cnn", dataset_info("cifar10"), norm="gn", groups=3, width=4)  # 3 divides none of 4, 8, 16
    for m in build_model(spec).modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and 1 <= m.num_groups <= 3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_normalisation_lives_inside_the_model(arch, dataset):
    info = dataset_info(dataset)
    spec = model_spec(arch, info, width=4)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    assert isinstance(model.normalize, Normalize)
    c = info.in_channels
    mean = torch.tensor(info.mean).view(1, c, 1, 1)
    std = torch.tensor(info.std).view(1, c, 1, 1)
    x = torch.rand(2, c, info.image_size, info.image_size)
    assert torch.allclose(model.normalize(x), (x - mean) / std)
    # The dataset statistics come from the spec, not the weights: a twin built with mean 0 / std 1 and the same
    # weights gives the same logits on pre-normalised input, and different logits on raw [0, 1] input.
    plain = dataclasses.replace(spec, mean=(0.0,) * c, std=(1.0,) * c)
    twin = build_model(plain).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), twin((x - mean) / std), atol=1e-5)
        assert not torch.allclose(model(x), twin(x), atol=1e-3)
    # The statistics follow the model to another dtype/device with .to().
    assert model.double().normalize.mean.dtype == torch.float64


def test_spec_dict_round_trip():
    spec = model_spec("resnet18", dataset_info("svhn"), norm="gn", groups=8, width=4)
    d = spec.to_dict()
    assert d["mean"] == list(dataset_info("svhn").mean)
    assert ModelSpec.from_dict(d) == spec


def test_unknown_arch_and_bad_spec():
    info = dataset_info("cifar10")
    with pytest.raises(UserError) as e:
        model_spec("vgg16", info)
    assert "vgg16" in str(e.value) and all(a in str(e.value) for a in ARCHS)
    bad = ModelSpec("vgg16", "cifar10", 10, 3)
    with pytest.raises(UserError, match="vgg16"):
        build_model(bad)
    with pytest.raises(UserError, match="norm"):
        model_spec("cnn", info, norm="ln")
    with pytest.raises(UserError, match="width"):
        model_spec("cnn", info, width=-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_folds_batchnorm_into_the_convolution_without_changing_the_function(arch):
    """conv_norm in eval mode is the same affine map as BatchNorm after the convolution (logits and input gradients
    to float rounding), and in train mode it is the modules' own path, bit for bit."""
    import utils.core.models as models

    torch.manual_seed(0)
    model = build_model(model_spec(arch, dataset_info("cifar10"), width=8))
    with torch.no_grad():  # running statistics that are not the initial ones
        model.train()(torch.rand(64, 3, 32, 32))
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    plain = lambda conv, norm, t: norm(conv(t))  # noqa: E731

    def logits_and_input_grad(mode: bool, conv_norm) -> tuple[torch.Tensor, torch.Tensor]:
        saved, models.conv_norm = models.conv_norm, conv_norm
        try:
            out = model.train(mode)(x)
            return out.detach(), torch.autograd.grad(out.square().sum(), x)[0]
        finally:
            models.conv_norm = saved

    folded, unfolded = logits_and_input_grad(False, models.conv_norm), logits_and_input_grad(False, plain)
    assert not torch.equal(folded[0], unfolded[0]) or arch == "cnn"  # another order of float operations ...
    for a, b in zip(folded, unfolded):  # ... for the same function
        assert (a - b).norm() <= 1e-5 * b.norm(), ((a - b).norm() / b.norm()).item()
    for a, b in zip(logits_and_input_grad(True, models.conv_norm), logits_and_input_grad(True, plain)):
        assert torch.equal(a, b)


def test_channels_last_is_used_except_where_onednn_fails():
    """The default layout is channels_last; ResNet-18 below width 8 (strided 1x1 convolutions on fewer than 8
    channels, which oneDNN's AVX2 kernels corrupt the heap on) is built contiguous; --memory_format contiguous is
    honoured."""
    import utils.core.models as models

    def layout(arch: str, width: int) -> bool:
        conv = next(m for m in build_model(model_spec(arch, dataset_info("cifar10"), width=width)).modules()
                    if isinstance(m, nn.Conv2d) and m.in_channels > 3)
        return conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()

    assert models.memory_format() == "channels_last"
    assert layout("cnn", 4) and layout("resnet18", 8) and not layout("resnet18", 4)
    models.use_memory_format("contiguous")
    try:
        assert not layout("cnn", 4) and not layout("resnet18", 8)
    finally:
        models.use_memory_format("channels_last")
    with pytest.raises(UserError, match="unknown memory format"):
        models.use_memory_format("nhwc")
