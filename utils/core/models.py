"""The authors' CIFAR ResNet-18 and a small CNN for the CPU scale; normalisation lives inside the model."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from utils.core.data import DatasetInfo
from utils.errors import UserError

ARCHS = ("resnet18", "cnn")
NORMS = ("bn", "gn")


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


def model_spec(arch: str, info: DatasetInfo, norm: str = "bn", groups: int = 32, width: int = 0) -> ModelSpec:
    """A ModelSpec for an arch on a dataset; unknown arch or norm is a UserError."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    if width < 0:
        raise UserError(f"--width must be >= 0 (0 = the arch's default), got {width}")
    return ModelSpec(arch, info.name, info.num_classes, info.in_channels, norm, groups, width, info.mean, info.std)


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
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
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
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
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
        return self.fc(torch.flatten(self.features(self.normalize(x)), 1))


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for a ModelSpec."""
    if spec.arch == "resnet18":
        return ResNet18(spec)
    if spec.arch == "cnn":
        return SmallCNN(spec)
    raise UserError(f"unknown arch {spec.arch!r}; known archs: {', '.join(ARCHS)}")
