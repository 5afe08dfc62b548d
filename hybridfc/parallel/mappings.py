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
With a world size of 1 nothing is communicated.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from hybridfc.parallel.groups import ProcessGroup, group_rank, group_size

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_vector(values: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """All-gather one small vector per rank: ``(k,)`` -> ``(world_size, k)``, no autograd."""
    world_size = group_size(group)
    if world_size == 1:
        return values.unsqueeze(0).clone()
    out = values.new_empty(world_size * values.numel())
    _all_gather_single(out, values.contiguous(), group=group)
    return out.view(world_size, -1)


def _valid_rows(sizes: Sequence[int], padded: int, device: torch.device) -> torch.Tensor:
    """Indices of the real rows inside the ``(world_size * padded)`` gathered rows."""
    return torch.cat([torch.arange(n, device=device) + r * padded for r, n in enumerate(sizes)])


def _is_even(sizes: Sequence[int]) -> bool:
    return min(sizes) == max(sizes)


def gather_padded(x: torch.Tensor, sizes: Sequence[int], group: ProcessGroup = None) -> torch.Tensor:
    """All-gather rows of uneven count, no autograd: ``(b_r, ...)`` -> ``(sum(sizes), ...)``.

    ``sizes[r]`` is the row count of rank r (known to every rank beforehand).
    """
    world_size = len(sizes)
    if world_size == 1:
        return x
    padded_rows = max(sizes)
    send = x.new_zeros((padded_rows, *x.shape[1:]))
    send[: x.shape[0]] = x
    out = x.new_empty((world_size * padded_rows, *x.shape[1:]))
    _all_gather_single(out, send, group=group)
    if _is_even(sizes):
        return out
    return out[_valid_rows(sizes, padded_rows, x.device)]


def reduce_scatter_padded(
    grad: torch.Tensor, sizes: Sequence[int], group: ProcessGroup = None
) -> torch.Tensor:
    """Sum ``(sum(sizes), ...)`` over ranks and keep this rank's rows: -> ``(b_r, ...)``."""
    world_size = len(sizes)
    if world_size == 1:
        return grad
    padded_rows = max(sizes)
    if _is_even(sizes):
        send = grad.contiguous()
    else:
        send = grad.new_zeros((world_size * padded_rows, *grad.shape[1:]))
        send[_valid_rows(sizes, padded_rows, grad.device)] = grad
    out = grad.new_empty((padded_rows, *grad.shape[1:]))
    _reduce_scatter_single(out, send, group=group)
    return out[: sizes[group_rank(group)]]


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
