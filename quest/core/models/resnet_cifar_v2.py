"""RepDistiller's CIFAR ResNet50 (models/resnetv2.py): bottleneck blocks [3, 4, 6, 3] at widths
64-512 (x4), a 3x3 stem without max-pool, with its module and state_dict names so that its
released CIFAR-100 checkpoints load as they are."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quest.core.models.resnet_cifar import init_resnet_weights

RESNET_V2_SPECS: dict[str, tuple[int, int, int, int]] = {"resnet50_cifar": (3, 4, 6, 3)}


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BN; projection shortcut when the
    shape changes; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNetV2(nn.Module):
    """Stem conv3x3-BN-ReLU, four bottleneck stages (strides 1, 2, 2, 2), pool, linear."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()  # the stem's activation, a module so that it can be tapped
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        init_resnet_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def resnet_v2(name: str, num_classes: int) -> ResNetV2:
    """Build the RepDistiller CIFAR ResNet called `name` (resnet50_cifar)."""
    return ResNetV2(RESNET_V2_SPECS[name], num_classes)
