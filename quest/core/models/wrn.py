"""Wide ResNets (pre-activation, depth 6n+4) with RepDistiller's module and state_dict names."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# depth and widen factor of RepDistiller's model_dict entries
WRN_SPECS: dict[str, tuple[int, int]] = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus identity or 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        # not in-place, so a tap on a BN layer keeps its own (pre-ReLU) output
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_ch == out_ch
        self.convShortcut: nn.Conv2d | None = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # as in the original WRN, a projection shortcut reads the pre-activated input
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One stage of WideBasicBlocks, kept under `.layer` for RepDistiller's key names."""

    def __init__(
        self, n: int, in_ch: int, out_ch: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, drop_rate
                )
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        """Run the stage."""
        return self.layer(x)


class WideResNet(nn.Module):
    """RepDistiller's WRN-d-k: stem conv, three stages, final BN+ReLU, global pool, fc."""

    def __init__(
        self, depth: int, num_classes: int, widen_factor: int = 1, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        # the post-activation output of the last stage is tapped here (module name 'relu')
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def wide_resnet(name: str, num_classes: int) -> WideResNet:
    """Build the RepDistiller WRN called `name` (e.g. 'wrn_40_2')."""
    depth, widen = WRN_SPECS[name]
    return WideResNet(depth, num_classes, widen_factor=widen)
