"""The authors' CIFAR ResNet-18 and a small CNN for the CPU scale; normalisation lives inside the model.

In eval mode a convolution followed by BatchNorm runs as one convolution with the BatchNorm folded into its weight
and bias (``conv_norm``): the same function, and its input gradients (the attack's double backward) no longer pass
through BatchNorm's activation-sized backward (docs/results/bench_phases/)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.core.data import DatasetInfo
from utils.errors import UserError

ARCHS = ("resnet18", "cnn")
NORMS = ("bn", "gn")
# The weights' memory layout of every model this process builds (``use_memory_format``): channels_last runs oneDNN's
# NHWC convolutions, about twice as fast on the CPU for evaluation and training steps (bench/bench_phases.py); the
# values are the same function, the floats differ in the last bits from the contiguous layout.
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
MEMORY_FORMAT_HELP = ("the weights' memory layout: channels_last (default; the faster convolutions on the CPU) or "
                      "contiguous (the layout of runs made before it existed); the floats differ between the two")
_memory_format = {"value": "channels_last"}


def use_memory_format(name: str) -> None:
    """Build every later model of this process in this layout (``MEMORY_FORMATS``); set once per run, with the
    threads and the CPU kernels."""
    if name not in MEMORY_FORMATS:
        raise UserError(f"unknown memory format {name!r}; known: {', '.join(MEMORY_FORMATS)}")
    _memory_format["value"] = name


def memory_format() -> str:
    """The layout models are built in now (``use_memory_format``)."""
    return _memory_format["value"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    arch: str
    dataset: str
    num_classes: int
    in_channels: int
    norm: str = "bn"  # "bn" (BatchNorm) or "gn" (GroupNorm)
    groups: int = 32  # GroupNorm groups (ignored for bn)
    width: int = 0  # base width; 0 = the arch's default (resnet18: 64, cnn: 16)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @staticmethod
    def from_dict(d: dict) -> "ModelSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return ModelSpec(**d)


def model_spec(arch: str, info: DatasetInfo, norm: str = "bn", groups: int = 32, width: int = 0,
               normalize: bool = True) -> ModelSpec:
    """A ModelSpec for an arch on a dataset (``normalize``: the dataset's mean/std inside the model; off: the model
    sees [0, 1] pixels, as the authors' ResNet-18); unknown arch or norm is a UserError."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    if width < 0:
        raise UserError(f"--width must be >= 0 (0 = the arch's default), got {width}")
    mean, std = (info.mean, info.std) if normalize else ((0.0,) * info.in_channels, (1.0,) * info.in_channels)
    return ModelSpec(arch, info.name, info.num_classes, info.in_channels, norm, groups, width, mean, std)


def _norm_layer(spec: ModelSpec, channels: int) -> nn.Module:
    if spec.norm == "bn":
        return nn.BatchNorm2d(channels)
    g = min(spec.groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class Normalize(nn.Module):
    """(x - mean) / std with the dataset's statistics, so inputs stay in [0, 1] pixel units."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(conv(x)); in eval mode with BatchNorm, one convolution with the norm folded in: weight W·s, bias b − μ·s
    with s = γ / √(σ² + eps) (the same affine map; the parameters γ, b and W stay differentiable)."""
    if norm.training or not isinstance(norm, nn.BatchNorm2d) or conv.bias is not None:
        return norm(conv(x))
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), shift, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A Sequential's layers in order, each Conv2d with the norm that follows it through ``conv_norm``."""
    mods, i = list(layers), 0
    while i < len(mods):
        if isinstance(mods[i], nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], (nn.BatchNorm2d,
                                                                                              nn.GroupNorm)):
            x, i = conv_norm(mods[i], mods[i + 1], x), i + 2
        else:
            x, i = mods[i](x), i + 1
    return x


class BasicBlock(nn.Module):
    def __init__(self, spec: ModelSpec, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm_layer(spec, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm_layer(spec, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            _norm_layer(spec, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        identity = x if self.downsample is None else run_layers(self.downsample, x)
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """The authors' CIFAR ResNet-18: 3x3 stride-1 stem, max-pool kept, [2, 2, 2, 2] basic blocks."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        w = spec.width or 64
        self.normalize = Normalize(spec.mean, spec.std)
        self.conv1 = nn.Conv2d(spec.in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = _norm_layer(spec, w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], w
        for i, planes in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(spec, inplanes, planes, stride), BasicBlock(spec, planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, spec.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallCNN(nn.Module):
    """CPU-scale CNN: three 3x3 conv-norm-ReLU stages (w, 2w, 4w channels), two max-pools, a linear head."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        w = spec.width or 16

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), _norm_layer(spec, cout), nn.ReLU(inplace=True)]

        self.normalize = Normalize(spec.mean, spec.std)
        self.features = nn.Sequential(*stage(spec.in_channels, w), nn.MaxPool2d(2),
                                      *stage(w, 2 * w), nn.MaxPool2d(2),
                                      *stage(2 * w, 4 * w), nn.AdaptiveAvgPool2d(3))
        self.fc = nn.Linear(4 * w * 9, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(run_layers(self.features, self.normalize(x)), 1))


def channels_last_safe(model: nn.Module) -> bool:
    """False for a model with a strided 1x1 convolution on fewer than 8 channels (ResNet-18 below width 8): oneDNN
    (torch 2.14) corrupts the heap on those in channels_last with its AVX2 kernels, i.e. the portable ones
    (measured: 1x1 stride-2 convolutions with 1-7 input channels; 8 and more, 3x3 ones and AVX-512 are fine)."""
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 8
                   for m in model.modules())


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for a ModelSpec, its weights in this process's layout (``use_memory_format``;
    contiguous where ``channels_last_safe`` says channels_last is not)."""
    if spec.arch not in ARCHS:
        raise UserError(f"unknown arch {spec.arch!r}; known archs: {', '.join(ARCHS)}")
    model = ResNet18(spec) if spec.arch == "resnet18" else SmallCNN(spec)
    layout = memory_format() if channels_last_safe(model) else "contiguous"
    return model.to(memory_format=MEMORY_FORMATS[layout])
