"""IR-ResNets of insightface (Deng et al., ArcFace 2019) for aligned 112x112 faces.

Improved residual units ``BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN`` plus a shortcut
(``conv1x1(stride) → BN`` where the shape changes), after a ``conv3x3(64) → BN → PReLU`` stem;
four stages of widths 64/128/256/512 (times ``width``), each halving the resolution, so a
112x112 face leaves the body as 7x7. The head is ``BN2d → Dropout → flatten →
Linear(C·7·7 → embedding_size) → BatchNorm1d``, insightface's "BN-dropout-FC-BN" (option E).
The attribute names follow insightface's, so its checkpoints load with ``load_state_dict``.

>>> model = iresnet50(embedding_size=512)
>>> model(torch.randn(4, 3, 112, 112)).shape
torch.Size([4, 512])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hybridfc.models.cifar_resnet import conv3x3, init_weights, scaled_channels

STAGE_WIDTHS = (64, 128, 256, 512)
STRIDE = 16  # four stride-2 stages
STEM_WIDTH = 64


class IBasicBlock(nn.Module):
    """``bn3(conv2(prelu(bn2(conv1(bn1(x)))))) + downsample(x)``, the stride on ``conv2``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = _projection(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) → (B, C, ⌈H/stride⌉, ⌈W/stride⌉)``."""
        out = self.prelu(self.bn2(self.conv1(self.bn1(x))))
        return self.bn3(self.conv2(out)) + self.downsample(x)


def _projection(in_channels: int, channels: int, stride: int) -> nn.Module:
    """``conv1x1(stride) → BN`` when the block changes the shape, else the identity."""
    if stride == 1 and in_channels == channels:
        return nn.Identity()
    conv = nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


class IResNet(nn.Module):
    """An IR-ResNet mapping ``(B, in_channels, image_size, image_size)`` to ``(B, embedding_size)``.

    ``layers`` holds the number of blocks of each of the four stages; ``image_size`` (a
    multiple of 16) fixes the input the flattening head accepts.
    """

    def __init__(self, layers: Sequence[int], embedding_size: int, in_channels: int = 3, width: float = 1.0,
                 dropout: float = 0.0, image_size: int = 112) -> None:
        super().__init__()
        if len(layers) != len(STAGE_WIDTHS):
            raise ValueError(f"layers must give {len(STAGE_WIDTHS)} block counts, got {list(layers)}")
        if image_size <= 0 or image_size % STRIDE:
            raise ValueError(f"image_size must be a positive multiple of {STRIDE}, got {image_size}")
        self.image_size = image_size
        stem = scaled_channels(STEM_WIDTH, width)
        widths = [scaled_channels(c, width) for c in STAGE_WIDTHS]
        self.conv1 = conv3x3(in_channels, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.prelu = nn.PReLU(stem)
        self.layer1 = _stage(stem, widths[0], layers[0])
        self.layer2 = _stage(widths[0], widths[1], layers[1])
        self.layer3 = _stage(widths[1], widths[2], layers[2])
        self.layer4 = _stage(widths[2], widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[3] * (image_size // STRIDE) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, image_size, image_size) → (B, embedding_size)``."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images (image_size), "
                             f"got {tuple(x.shape[-2:])}")
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _stage(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
    """``blocks`` improved residual units; the first one halves the resolution."""
    layers = [IBasicBlock(in_channels, channels, stride=2)]
    layers += [IBasicBlock(channels, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def iresnet18(embedding_size: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0,
              image_size: int = 112) -> IResNet:
    """IR-ResNet-18: blocks ``[2, 2, 2, 2]``; the arguments as for :class:`IResNet`."""
    return IResNet((2, 2, 2, 2), embedding_size, in_channels, width, dropout, image_size)


def iresnet34(embedding_size: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0,
              image_size: int = 112) -> IResNet:
    """IR-ResNet-34: blocks ``[3, 4, 6, 3]``; the arguments as for :class:`IResNet`."""
    return IResNet((3, 4, 6, 3), embedding_size, in_channels, width, dropout, image_size)


def iresnet50(embedding_size: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0,
              image_size: int = 112) -> IResNet:
    """IR-ResNet-50: blocks ``[3, 4, 14, 3]``; the arguments as for :class:`IResNet`."""
    return IResNet((3, 4, 14, 3), embedding_size, in_channels, width, dropout, image_size)


def iresnet100(embedding_size: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0,
               image_size: int = 112) -> IResNet:
    """IR-ResNet-100: blocks ``[3, 13, 30, 3]``; the arguments as for :class:`IResNet`."""
    return IResNet((3, 13, 30, 3), embedding_size, in_channels, width, dropout, image_size)
