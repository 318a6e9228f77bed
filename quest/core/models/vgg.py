"""CIFAR VGGs with batch norm (RepDistiller's vgg*_bn), with its module and state_dict names."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# conv widths of the five blocks; RepDistiller's model_dict maps 'vgg8' etc. to the _bn variants
VGG_SPECS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _make_block(widths: tuple[int, ...], in_ch: int) -> nn.Sequential:
    """Return conv-BN-ReLU repeated, minus the final ReLU (applied by the reluN modules)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
    # the block ends at its last BN, as in RepDistiller, so 'blockN' taps the pre-ReLU map
    return nn.Sequential(*layers[:-1])



def init_fan_out_weights(model: nn.Module) -> None:
    """RepDistiller's VGG and MobileNetV2 init: conv N(0, sqrt(2 / (k*k*out))), BN 1 / 0,
    linear N(0, 0.01), biases 0 (in module order, so the draws match theirs)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)

class VGG(nn.Module):
    """Five conv blocks separated by max-pools, global average pool, one linear classifier."""

    def __init__(self, widths: tuple[tuple[int, ...], ...], num_classes: int = 10) -> None:
        super().__init__()
        self.block0 = _make_block(widths[0], 3)
        self.block1 = _make_block(widths[1], widths[0][-1])
        self.block2 = _make_block(widths[2], widths[1][-1])
        self.block3 = _make_block(widths[3], widths[2][-1])
        self.block4 = _make_block(widths[4], widths[3][-1])
        # parameter-free modules for the post-ReLU output of each block, so they can be tapped
        self.relu0 = nn.ReLU()
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(widths[4][-1], num_classes)

        init_fan_out_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        # RepDistiller pools here only for 64-pixel inputs (so block4 stays 4x4); kept as is
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


def vgg_bn(name: str, num_classes: int) -> VGG:
    """Build the RepDistiller VGG-with-BN called `name` (e.g. 'vgg8')."""
    return VGG(VGG_SPECS[name], num_classes)


# The official QuEST transfer student (valeoai/QuEST, feature_extractors/VGG_ImageNet.py, cfg
# "vgg9"): eight conv-BN-ReLU layers in five max-pooled blocks, global average pool, one linear
# layer. 'G' is the global pool, which the official VGG moves into its classifier.
VGG9_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG9(nn.Module):
    """The official QuEST VGG9 for 224-pixel images, with its module and state_dict names.

    `features` is one Sequential indexed as the official one, so its transfer configs' taps
    '21' and '28' (the max-pools after the fourth and fifth blocks, post-ReLU: 512x14x14 and
    512x7x7 at 224 pixels) are `features.21` and `features.28` here, and an official checkpoint's
    keys (features.N.*, classifier.2.*) load as they are.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG9_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                # not in place (the official ReLUs are): a tap on a BN output must stay intact
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.BatchNorm2d(v),
                           nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)
        # official: AdaptiveAvgPool2d(1), Reshape(-1, 512), Linear (the same indices)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                        nn.Linear(in_ch, num_classes))
        # the official _initialize_weights is RepDistiller's fan-out init, in module order
        init_fan_out_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        return self.classifier(self.features(x))


def vgg9(name: str, num_classes: int) -> VGG9:
    """Build the official QuEST VGG9 (`name` is the zoo's, 'vgg9')."""
    return VGG9(num_classes)
