"""Collectives of the class-parallel head, wrapped as autograd functions.

Forward and backward of each function are a matching pair of collectives over an explicit
process group:

================================  =====================================  ======================
function                          forward                                backward
================================  =====================================  ======================
:func:`gather_rows`               all-gather of uneven ``(b_r, d)``      reduce-scatter (sum)
:func:`scale_gradient`            identity                               multiply by a factor
================================  =====================================  ======================

Uneven local batches (the last batch of an epoch) are padded to the largest one before the
all-gather and the padding is dropped afterwards, so every rank sends one tensor of one shape.
With a world size of 1 nothing is communicated. The collectives themselves, and their
accounting, are :mod:`hybridfc.parallel.collectives`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hybridfc.parallel.collectives import gather_padded, reduce_scatter_padded
from hybridfc.parallel.groups import ProcessGroup


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: Sequence[int], group: ProcessGroup) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        return gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter_padded(grad, ctx.sizes, ctx.group), None, None


def gather_rows(x: torch.Tensor, sizes: Sequence[int], group: ProcessGroup = None) -> torch.Tensor:
    """All-gather ``(b_r, d)`` rows of every rank into ``(B, d)``, B = sum(sizes), rank order.

    Backward: the ``(B, d)`` gradient is summed over ranks (reduce-scatter) and each rank
    receives the rows it contributed, i.e. the exact gradient of a loss that every rank
    computes over the gathered rows through its own part of the graph.
    """
    if len(sizes) == 1:
        return x
    return _GatherRows.apply(x, list(sizes), group)


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
