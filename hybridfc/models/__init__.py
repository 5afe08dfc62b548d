"""Backbones producing embeddings for the class-parallel margin-softmax head.

CIFAR-style ResNets (``resnet20/32/56``) for small images and insightface's IR-ResNets
(``iresnet18/34/50/100``) for 112x112 faces; every one maps ``(B, C, H, W)`` to
``(B, embedding_size)`` and ends in ``Linear → BatchNorm1d``.

>>> model = build_backbone("iresnet50", embedding_size=512, dropout=0.1)
>>> model(torch.randn(4, 3, 112, 112)).shape
torch.Size([4, 512])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from hybridfc.models.cifar_resnet import CifarResNet, resnet20, resnet32, resnet56
from hybridfc.models.iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
}
BACKBONES: tuple[str, ...] = tuple(_REGISTRY)


def build_backbone(name: str, embedding_size: int, **kwargs: Any) -> nn.Module:
    """The backbone ``name`` (one of :data:`BACKBONES`); ``kwargs`` go to its constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return _REGISTRY[name](embedding_size, **kwargs)


__all__ = ["BACKBONES", "CifarResNet", "IResNet", "build_backbone", "iresnet18", "iresnet34", "iresnet50",
           "iresnet100", "resnet20", "resnet32", "resnet56"]
