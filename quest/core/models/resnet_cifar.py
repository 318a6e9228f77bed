"""CIFAR ResNets (depth 6n+2, three stages) with RepDistiller's module and state_dict names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# depth and per-stage widths (stem, stage1, stage2, stage3) of RepDistiller's model_dict entries
RESNET_CIFAR_SPECS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """Return a bias-free 3x3 convolution with 'same' padding."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def init_resnet_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions and unit/zero BatchNorm, in module order."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; the output is taken after the final ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        # not in-place: a tap on bn1 must not see its output rewritten by the ReLU
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Return relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        # functional ReLU as in RepDistiller, so each block's output (and a stage's) is post-ReLU
        # while self.relu stays a module that runs exactly once per forward
        return torch.relu(out + shortcut)


class ResNetCifar(nn.Module):
    """RepDistiller's CIFAR ResNet: 3x3 stem, three stages of BasicBlocks, global pool, fc."""

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self._in_ch = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[3], n, stride=2)
        # adaptive rather than AvgPool2d(8): identical at 32x32, still valid at other sizes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        init_resnet_weights(self)

    def _make_stage(self, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        """Build one stage; the first block gets a 1x1 conv+BN shortcut when the shape changes."""
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        layers = [BasicBlock(self._in_ch, out_ch, stride, downsample)]
        self._in_ch = out_ch
        layers += [BasicBlock(out_ch, out_ch) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_cifar(name: str, num_classes: int) -> ResNetCifar:
    """Build the RepDistiller CIFAR ResNet called `name` (e.g. 'resnet20', 'resnet8x4')."""
    depth, widths = RESNET_CIFAR_SPECS[name]
    return ResNetCifar(depth, widths, num_classes)
