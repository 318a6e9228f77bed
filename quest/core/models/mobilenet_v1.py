"""The official QuEST ImageNet student of RN50_MNv2: the `MobileNet` class of valeoai/QuEST's
feature_extractors/MobileNetV2_ImageNet.py. Despite that file's name it is a MobileNet-V1
(depthwise-separable convolutions ending in 1024 channels, 4,231,976 parameters with 1,000
classes), the same network as mdistiller's and CRD's ImageNet "MobileNet-V1" student."""

from __future__ import annotations

from torch import Tensor, nn

# (output channels, stride) of the 13 depthwise-separable blocks after the 32-channel stem
_DW_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 conv, BN, ReLU (the stem)."""
    # ReLUs not in place (the official ones are): a tap on a BN output must stay intact
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU())


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    """The official `MobileNet`, with its module and state_dict names (features.N.M.*,
    classifier.2.*). `features` ends in the last block's ReLU: 1024x7x7 at 224 pixels, the map
    RN50_MNv2.py taps (extract_from 'features'). Weights keep PyTorch's default init, as there."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        blocks = [_conv_bn(3, 32, 2)]
        in_ch = 32
        for out_ch, stride in _DW_BLOCKS:
            blocks.append(_conv_dw(in_ch, out_ch, stride))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        # official: AvgPool2d(7), Reshape(-1, 1024), Linear(1024, 1000); the adaptive pool is the
        # same at 224 pixels and also accepts smaller images
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                        nn.Linear(in_ch, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        return self.classifier(self.features(x))


def mobilenet_v1(name: str, num_classes: int) -> MobileNetV1:
    """Build the official QuEST ImageNet MobileNet (`name` is the zoo's, 'mobilenet_v1')."""
    return MobileNetV1(num_classes)
