"""RepDistiller's CIFAR MobileNetV2 (models/mobilenetv2.py, `mobile_half`): expansion 6, width
0.5, a stride-2 3x3 stem and a 1280-wide 1x1 head, with its module and state_dict names so that
its released CIFAR-100 checkpoints load as they are.

RepDistiller's features are [conv1, blocks[1], blocks[2], blocks[4], blocks[6], pooled]; the
inverted-residual blocks end in a BN (a linear bottleneck), so the stage outputs are not
rectified. `conv2` (1x1 conv-BN-ReLU, 1280 x 2 x 2 for a 32-pixel image) is the map the official
QuEST configs take from this student; its BN, `conv2.1`, is the pre-ReLU counterpart.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quest.core.models.vgg import init_fan_out_weights

# name -> (expansion ratio T, width multiplier)
MOBILENETV2_SPECS: dict[str, tuple[int, float]] = {"mobilenetv2_half": (6, 0.5)}

# (expansion, channels before the width multiplier, blocks, first stride); t is replaced by T
# except for the first stage, which never expands
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    """conv (no bias) -> BN -> ReLU as indices 0, 1, 2 (RepDistiller's conv_bn / conv_1x1_bn).

    The ReLU is not in place, so a tap on the BN (index 1) keeps the pre-activation map.
    """
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (strided), 1x1 linear projection, each with BN, as `conv.0-7`;
    identity shortcut when the stride is 1 and the width is kept.

    Unlike torchvision's, the expand conv is present even for an expansion of 1.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = in_ch * expansion
        self.use_res_connect = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x + conv(x) with the identity shortcut, conv(x) without."""
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """Stem `conv1`, seven stages in the ModuleList `blocks`, head `conv2`, pool, `classifier`."""

    def __init__(self, expansion: int, width_mult: float, num_classes: int = 100) -> None:
        super().__init__()
        in_ch = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_ch, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _STAGES:
            out_ch = int(c * width_mult)
            ratio = expansion if t is None else t
            layers: list[nn.Module] = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(in_ch, out_ch, stride, ratio))
                in_ch = out_ch
            self.blocks.append(nn.Sequential(*layers))
        # RepDistiller widens the head only for multipliers above 1
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_ch, self.last_channel, 1, 1)
        # a single linear layer inside a Sequential: its keys are classifier.0.*
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        # RepDistiller's pool for its fixed 32-pixel input: kernel 32 // 16 = 2 over the 2x2 map
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """RepDistiller's init: conv N(0, sqrt(2 / (k*k*out))), BN 1 / 0, linear N(0, 0.01)."""
        init_fan_out_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        out = self.conv1(x)
        for stage in self.blocks:
            out = stage(out)
        out = self.avgpool(self.conv2(out))
        return self.classifier(torch.flatten(out, 1))


def mobilenetv2(name: str, num_classes: int) -> MobileNetV2:
    """Build the RepDistiller CIFAR MobileNetV2 called `name` (mobilenetv2_half)."""
    expansion, width = MOBILENETV2_SPECS[name]
    return MobileNetV2(expansion, width, num_classes)
