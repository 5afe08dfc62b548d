"""Class-parallel margin softmax cross-entropy: the head's math in one place.

Each rank holds the rows ``W_r`` of its shard and the gathered batch ``E`` ``(B, d)``. Rank r
computes the logits of its classes only, ``(B, C_r)``, and the ranks agree on the softmax
with two all-reduces: the row maximum, then the sum of exponentials and the target logit
fused in one ``(2, B)`` tensor. The softmax is computed in place in the logits buffer and the
backward pass overwrites that buffer with the gradient, so one ``(B, C_r)`` buffer is all the
memory the loss needs, and a :class:`LogitsWorkspace` keeps it from one step to the next. For
angular margins the class rows are normalised inside the kernel: the logits' columns are scaled
by ``s/‖w_c‖`` and the backward pass projects the row gradient, so no normalised copy of the
``(C_r, d)`` shard, and none of its gradient, is ever made. Logits, softmax and loss are at
least fp32, whatever the input dtype.
No probability is clamped: a sample's loss is ``log Σ exp − target`` however large it is.
"""

from __future__ import annotations

from typing import Optional

import torch

from hybridfc.head.margins import Margin
from hybridfc.parallel.collectives import all_reduce
from hybridfc.parallel.groups import ProcessGroup


class LogitsWorkspace:
    """One ``(B, C_r)`` buffer lent to a forward pass and handed back by its backward pass.

    Reusing the buffer saves the page faults of a fresh allocation of that size every step
    (about a fifth of the step on CPU at a million classes). A forward pass that finds the
    buffer lent out, or of another shape, allocates a new one, so overlapping forward passes
    stay correct; a graph that is never backpropagated just keeps its buffer until freed.
    """

    def __init__(self) -> None:
        self._buffer: Optional[torch.Tensor] = None

    def take(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        buffer, self._buffer = self._buffer, None
        if buffer is None or buffer.shape != (rows, cols) or buffer.dtype != like.dtype or buffer.device != like.device:
            return like.new_empty(rows, cols)
        return buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer


class _MarginCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, local_target, margin: Margin, group: ProcessGroup,
                workspace: Optional[LogitsWorkspace], logit_offset: Optional[torch.Tensor]):
        rows = torch.nonzero(local_target >= 0).squeeze(1)
        cols = local_target[rows]
        inv_norm = _inverse_row_norms(weight) if margin.normalize else None
        if workspace is None:
            logits = features @ weight.t()
        else:
            logits = torch.mm(features, weight.t(), out=workspace.take(features.shape[0], weight.shape[0], features))
        if inv_norm is not None:
            logits.mul_(inv_norm * margin.scale)
        if logit_offset is not None:
            logits.add_(logit_offset)
        psi, dpsi = margin.target_logit(logits[rows, cols] / margin.scale)
        logits[rows, cols] = margin.scale * psi

        row_max = logits.amax(dim=1) if logits.shape[1] else logits.new_full((logits.shape[0],), -torch.inf)
        row_max = all_reduce(row_max, "max", group)
        logits.sub_(row_max.unsqueeze(1)).exp_()

        stats = logits.new_zeros(2, logits.shape[0])
        stats[0] = logits.sum(dim=1)
        stats[1, rows] = margin.scale * psi - row_max[rows]
        sum_exp, target = all_reduce(stats, "sum", group)
        logits.div_(sum_exp.unsqueeze(1))

        ctx.save_for_backward(features, weight, logits, rows, cols, dpsi, inv_norm)
        ctx.scale, ctx.workspace = margin.scale, workspace
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad_loss):
        features, weight, softmax, rows, cols, dpsi, inv_norm = ctx.saved_tensors
        grad_logits = softmax
        target_prob = softmax[rows, cols]
        grad_logits.mul_((ctx.scale * grad_loss).unsqueeze(1))
        grad_logits[rows, cols] = ctx.scale * dpsi * (target_prob - 1) * grad_loss[rows]
        if inv_norm is not None:
            grad_logits.mul_(inv_norm)
        grad_weight = grad_logits.t() @ features
        if inv_norm is not None:
            _project_out_row_direction_(grad_weight, weight, inv_norm)
        grad_features = grad_logits @ weight
        if ctx.workspace is not None:
            ctx.workspace.give_back(grad_logits)
        return grad_features, grad_weight, None, None, None, None, None


def _inverse_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``1 / max(‖w_c‖, 1e-12)`` for every row, ``(C_r,)`` (``F.normalize``'s floor)."""
    return torch.linalg.vector_norm(weight, dim=1).clamp_min_(1e-12).reciprocal_()


def _project_out_row_direction_(grad: torch.Tensor, weight: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """Turn ``M = ∂L/∂ŵ_c / ‖w_c‖`` into ``∂L/∂w_c`` in place: ``M_c − (ŵ_c·M_c) ŵ_c``."""
    row_dots = torch.bmm(weight.unsqueeze(1), grad.unsqueeze(2)).view(-1)
    along = row_dots * inv_norm * inv_norm
    grad.addcmul_(weight, along.unsqueeze(1), value=-1)


def margin_cross_entropy(
    features: torch.Tensor,
    weight: torch.Tensor,
    local_target: torch.Tensor,
    margin: Margin,
    group: ProcessGroup = None,
    workspace: Optional[LogitsWorkspace] = None,
    logit_offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample loss ``(B,)`` of a softmax whose classes are split over ``group``.

    Args:
        features: ``(B, d)`` gathered features, already normalised when the margin is angular.
        weight: ``(C_r, d)`` this rank's class rows, raw: an angular margin normalises them here.
        local_target: ``(B,)`` int64, the target's row in ``weight``, or -1 where the target
            class lives on another rank.
        margin: the target-logit transform and scale.
        group: the ranks that hold the other classes.
        workspace: where to borrow the logits buffer from (used only when a backward pass
            will follow, which hands the buffer back).
        logit_offset: ``(C_r,)`` added to the (scaled) logits of each class before the softmax,
            never to a target logit; a constant, so the gradient keeps its form.

    Returns the same ``(B,)`` losses on every rank. The backward pass may run once: it reuses
    the softmax buffer for the gradient.
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    if not (torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad)):
        workspace = None
    return _MarginCrossEntropy.apply(features.to(dtype), weight.to(dtype), local_target, margin, group, workspace,
                                     logit_offset)
