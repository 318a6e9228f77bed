"""RepDistiller's CIFAR ShuffleNets (models/ShuffleNetv1.py `ShuffleV1`, models/ShuffleNetv2.py
`ShuffleV2`), with their module and state_dict names so that the released CIFAR-100 checkpoints
load as they are.

Both have a 1x1 stem at full resolution and three stride-2 stages. RepDistiller applies its
ReLUs functionally and returns each stage's pre-activation map from the stage's last block as a
second output; here the blocks return one tensor, and parameter-free modules (which add no
state_dict keys) make both maps tappable:

- `relu1`: the stem's ReLU (RepDistiller's feature 0); `relu2`: ShuffleV2's head ReLU, the map
  the official QuEST config takes from ShuffleV2;
- `layerN`: stage N's post-ReLU output (feature N); `layerN.<last>.preact`: its pre-ReLU map
  (what RepDistiller returns with preact=True).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ShuffleV1: (stage widths, blocks per stage, groups of the 1x1 convs)
SHUFFLENET_V1_SPECS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], int]] = {
    "shufflev1": ((240, 480, 960), (4, 8, 4), 3),
}
# ShuffleV2 (net_size 1): (stage widths + head width, basic blocks per stage after the down block)
SHUFFLENET_V2_SPECS: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    "shufflev2": ((116, 232, 464, 1024), (3, 7, 3)),
}


class ChannelShuffle(nn.Module):
    """Interleave `groups` channel groups: N x (g*k) x H x W viewed as g x k, transposed."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        """Return x with its channels shuffled across the groups."""
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1 -> shuffle -> 3x3 depthwise (strided) -> grouped 1x1.

    Stride 2 concatenates a 3x3 average-pooled input (so the conv path makes out - in channels);
    stride 1 adds the input. The ReLU comes after the merge; `preact` is the merged map before it.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # the first unit after the 24-channel stem does not group its first 1x1 conv
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.preact = nn.Identity()  # tap point for the pre-ReLU merge

    def forward(self, x: Tensor) -> Tensor:
        """relu(merge(bn3(conv3(relu(bn2(conv2(shuffle(relu(bn1(conv1(x)))))))), shortcut(x)))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.shuffle1(out))))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        merged = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(self.preact(merged))


class _ShuffleNet(nn.Module):
    """What both ShuffleNets share: a 1x1 stem (conv1, bn1, relu1; 24 channels) and three stages
    (layer1-3) that each subclass's `_make_layer(out, blocks)` builds."""

    def _stem_and_stages(self, widths: tuple[int, ...], blocks: tuple[int, int, int]) -> None:
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        self.in_planes = 24
        for i in range(3):
            setattr(self, f"layer{i + 1}", self._make_layer(widths[i], blocks[i]))

    def _make_layer(self, out_planes: int, blocks: int) -> nn.Sequential:
        raise NotImplementedError


class ShuffleNetV1(_ShuffleNet):
    """1x1 stem (24 channels), three stages of v1 units, 4x4 average pool, `linear`."""

    def __init__(self, widths: tuple[int, int, int], blocks: tuple[int, int, int], groups: int,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.groups = groups
        self._stem_and_stages(widths, blocks)
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(widths[2], num_classes)
        # RepDistiller keeps PyTorch's default initialisation for both ShuffleNets

    def _make_layer(self, out_planes: int, blocks: int) -> nn.Sequential:
        """A stride-2 unit that concatenates its input, then stride-1 units that add it."""
        units = [Bottleneck(self.in_planes, out_planes - self.in_planes, 2, self.groups)]
        units += [Bottleneck(out_planes, out_planes, 1, self.groups) for _ in range(blocks - 1)]
        self.in_planes = out_planes
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


class SplitBlock(nn.Module):
    """Split the channels at `ratio` into (first part, rest)."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the two channel slices."""
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """ShuffleNet v2 unit: the first half passes through; the second goes 1x1 -> 3x3 depthwise
    -> 1x1 (ReLU after the 1x1s only); concatenated, then shuffled.

    `preact` is RepDistiller's pre-activation output: the concatenation with the last 1x1's BN
    output before its ReLU, and, as there, before the shuffle.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity()  # tap point for the pre-ReLU concatenation

    def forward(self, x: Tensor) -> Tensor:
        """shuffle(cat(x1, relu(bn3(conv3(bn2(conv2(relu(bn1(conv1(x2))))))))))."""
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        self.preact(torch.cat([x1, out], 1))  # only for hooks: the logits do not use it
        return self.shuffle(torch.cat([x1, F.relu(out)], 1))


class DownBlock(nn.Module):
    """ShuffleNet v2 stride-2 unit: two branches on the whole input, each ending in a 1x1-BN-ReLU
    of half the output width (left: 3x3 dw -> 1x1; right: 1x1 -> 3x3 dw -> 1x1), concatenated
    and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid,
                               bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        """shuffle(cat(left(x), right(x)))."""
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(_ShuffleNet):
    """1x1 stem (24 channels), three stages (a down block, then basic blocks), 1x1 head conv2 with
    BN and ReLU, 4x4 average pool, `linear`."""

    def __init__(self, widths: tuple[int, int, int, int], blocks: tuple[int, int, int],
                 num_classes: int = 10) -> None:
        super().__init__()
        self._stem_and_stages(widths, blocks)
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_layer(self, out_planes: int, blocks: int) -> nn.Sequential:
        """A down block to `out_planes` channels, then `blocks` basic blocks."""
        units: list[nn.Module] = [DownBlock(self.in_planes, out_planes)]
        units += [BasicBlock(out_planes) for _ in range(blocks)]
        self.in_planes = out_planes
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def shufflenet(name: str, num_classes: int) -> ShuffleNetV1 | ShuffleNetV2:
    """Build the RepDistiller CIFAR ShuffleNet called `name` (shufflev1 or shufflev2)."""
    if name in SHUFFLENET_V1_SPECS:
        widths, blocks, groups = SHUFFLENET_V1_SPECS[name]
        return ShuffleNetV1(widths, blocks, groups, num_classes)
    widths2, blocks2 = SHUFFLENET_V2_SPECS[name]
    return ShuffleNetV2(widths2, blocks2, num_classes)
