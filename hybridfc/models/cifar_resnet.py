"""CIFAR-style ResNets (He et al. 2016, §4.2) ending in an embedding for a margin-softmax head.

A network of depth ``6n + 2`` is a 3x3 stem, three stages of ``n`` basic blocks of widths
16/32/64 (times ``width``; the last two stages halve the resolution) and global average
pooling, so any image size works; 32x32 is the intended one. The shortcut that changes shape
is the paper's parameter-free option A: subsample by the stride and zero-pad the new channels.
The head is ``Linear(64·width → embedding_size) → BatchNorm1d``: an embedding, not class logits.

>>> model = resnet20(embedding_size=128)
>>> model(torch.randn(8, 3, 32, 32)).shape
torch.Size([8, 128])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGE_WIDTHS = (16, 32, 64)


def scaled_channels(channels: int, width: float) -> int:
    """``channels·width`` rounded, at least 1; ``width`` must be positive."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, round(channels * width))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out), BatchNorm weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``(B, C, H, W) → (B, C + extra, ⌈H/s⌉, ⌈W/s⌉)``, the new channels zero."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, the stride on the first conv."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        reshapes = stride != 1 or in_channels != channels
        self.shortcut = PadShortcut(stride, channels - in_channels) if reshapes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) → (B, C, ⌈H/stride⌉, ⌈W/stride⌉)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet of ``depth = 6n + 2`` layers mapping ``(B, in_channels, H, W)`` to ``(B, embedding_size)``."""

    def __init__(self, depth: int, embedding_size: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        widths = [scaled_channels(c, width) for c in STAGE_WIDTHS]
        self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks = (depth - 2) // 6
        self.stage1 = _stage(widths[0], widths[0], blocks, stride=1)
        self.stage2 = _stage(widths[0], widths[1], blocks, stride=2)
        self.stage3 = _stage(widths[1], widths[2], blocks, stride=2)
        self.fc = nn.Linear(widths[2], embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W) → (B, embedding_size)``."""
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.features(self.fc(x))


def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` basic blocks, the first one taking the stride and the change of width."""
    layers = [BasicBlock(in_channels, channels, stride)]
    layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet20(embedding_size: int, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-20 (n = 3): about 0.27M parameters at width 1, plus the embedding head."""
    return CifarResNet(20, embedding_size, in_channels, width)


def resnet32(embedding_size: int, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-32 (n = 5): about 0.46M parameters at width 1, plus the embedding head."""
    return CifarResNet(32, embedding_size, in_channels, width)


def resnet56(embedding_size: int, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-56 (n = 9): about 0.85M parameters at width 1, plus the embedding head."""
    return CifarResNet(56, embedding_size, in_channels, width)
