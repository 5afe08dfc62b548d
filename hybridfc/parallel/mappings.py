"""The head's gradient mapping: :func:`scale_gradient`, the identity forward and a factor
backward (the feature gradient's ``N·∂L/∂e_r`` convention). The all-gather of the features and
the reduce-scatter of their gradient run inside the head's own autograd function
(:mod:`hybridfc.head.cross_entropy`); the collectives themselves, and their accounting, are
:mod:`hybridfc.parallel.collectives`.
"""

from __future__ import annotations

import torch


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient by ``factor`` in backward."""
    if factor == 1:
        return x
    return _ScaleGradient.apply(x, factor)
