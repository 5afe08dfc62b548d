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

The feature exchange is part of the same autograd function, so that it can overlap the
compute. The local batch travels in K chunks (:mod:`hybridfc.parallel.chunks`), all their
all-gathers started before the function runs: chunk j's logits are computed as soon as chunk j
has arrived, while the later chunks are still on the wire. Backward: each chunk's feature
gradient is computed and its reduce-scatter started at once, so it travels while the next
chunk's gradient and then the weight gradient ``(C_r, d)`` are computed. The softmax statistics
of all chunks travel together after the last chunk (the two all-reduces above). Rows keep their
place in the gathered batch whatever K is, so K changes when work happens, not what is computed.
"""

from __future__ import annotations

from typing import Optional

import torch

from hybridfc.head.margins import Margin
from hybridfc.parallel.chunks import ChunkedGather, ChunkLayout, scatter_chunk, tiles
from hybridfc.parallel.collectives import all_reduce
from hybridfc.parallel.groups import ProcessGroup

_NORM_FLOOR = 1e-12


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
    """Feature all-gather, class-parallel margin softmax cross-entropy and the feature gradients'
    reduce-scatter, over the chunks of the local batch (module docstring)."""

    @staticmethod
    def forward(ctx, embeddings, weight, local_target, margin: Margin, gathered: ChunkedGather, rank: int,
                group: ProcessGroup, workspace: Optional[LogitsWorkspace], logit_offset: Optional[torch.Tensor]):
        layout = gathered.layout
        batch = sum(layout.sizes)
        rows = torch.nonzero(local_target >= 0).squeeze(1)   # a host sync: before the chunks, not among them
        cols = local_target[rows]
        features = embeddings.new_empty(batch, embeddings.shape[1])
        inv_feature_norm = embeddings.new_empty(batch) if margin.normalize else None
        if workspace is None:
            logits = features.new_empty(batch, weight.shape[0])
        else:
            logits = workspace.take(batch, weight.shape[0], features)
        weight_t = weight.t()
        for chunk in range(layout.chunks):
            for (start, end), part in zip(layout.blocks(chunk), _rank_parts(gathered.wait(chunk), layout, chunk)):
                for tile in tiles(start, end):
                    rows_in_part = slice(tile.start - start, tile.stop - start)
                    _prepare_features_(features[tile], part[rows_in_part],
                                       None if inv_feature_norm is None else inv_feature_norm[tile])
                    torch.mm(features[tile], weight_t, out=logits[tile])

        inv_norm = _inverse_row_norms(weight) if margin.normalize else None
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

        ctx.save_for_backward(features, inv_feature_norm, weight, logits, rows, cols, dpsi, inv_norm)
        ctx.scale, ctx.workspace, ctx.layout, ctx.rank, ctx.group = margin.scale, workspace, layout, rank, group
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad_loss):
        features, inv_feature_norm, weight, softmax, rows, cols, dpsi, inv_norm = ctx.saved_tensors
        grad_logits = softmax
        target_prob = softmax[rows, cols]
        grad_logits.mul_((ctx.scale * grad_loss).unsqueeze(1))
        grad_logits[rows, cols] = ctx.scale * dpsi * (target_prob - 1) * grad_loss[rows]
        if inv_norm is not None:
            grad_logits.mul_(inv_norm)
        layout = ctx.layout
        scattered = [scatter_chunk(_chunk_feature_gradient(grad_logits, weight, features, inv_feature_norm,
                                                           layout, chunk), layout, chunk, ctx.group)
                     for chunk in range(layout.chunks)]
        grad_weight = grad_logits.t() @ features
        if inv_norm is not None:
            _project_out_row_direction_(grad_weight, weight, inv_norm)
        if ctx.workspace is not None:
            ctx.workspace.give_back(grad_logits)
        grad_embeddings = features.new_empty(layout.sizes[ctx.rank], features.shape[1])
        for chunk, pending in enumerate(scattered):
            grad_embeddings[layout.local_rows(ctx.rank, chunk)] = pending.wait()
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None


def _rank_parts(rows: torch.Tensor, layout: ChunkLayout, chunk: int) -> tuple[torch.Tensor, ...]:
    """A gathered chunk ``(Σ_r rows, d)`` split into each rank's rows."""
    return rows.split(layout.chunk_sizes(chunk))


def _prepare_features_(out: torch.Tensor, rows: torch.Tensor, inv_norm: Optional[torch.Tensor]) -> None:
    """``out = rows``, L2-normalised with ``F.normalize``'s floor when ``inv_norm`` (filled here) is given."""
    if inv_norm is None:
        out.copy_(rows)
        return
    torch.linalg.vector_norm(rows, dim=1, out=inv_norm)
    inv_norm.clamp_min_(_NORM_FLOOR).reciprocal_()
    torch.mul(rows, inv_norm.unsqueeze(1), out=out)


def _chunk_feature_gradient(grad_logits: torch.Tensor, weight: torch.Tensor, features: torch.Tensor,
                            inv_feature_norm: Optional[torch.Tensor], layout: ChunkLayout,
                            chunk: int) -> torch.Tensor:
    """∂L/∂(gathered features) of ``chunk``'s rows, in rank order, ``(Σ_r rows of chunk, d)``."""
    out = features.new_empty(sum(layout.chunk_sizes(chunk)), features.shape[1])
    offset = 0
    for start, end in layout.blocks(chunk):
        for tile in tiles(start, end):
            part = out[tile.start - start + offset: tile.stop - start + offset]
            torch.mm(grad_logits[tile], weight, out=part)
            if inv_feature_norm is not None:
                _normalize_backward_(part, features[tile], inv_feature_norm[tile])
        offset += end - start
    return out


def _normalize_backward_(grad: torch.Tensor, normalized: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """Turn ∂L/∂x̂ into ∂L/∂x in place, x̂ = x / max(‖x‖, floor): ``(g − x̂ (x̂·g)) / ‖x‖``
    (``g / floor`` where the floor held, as ``F.normalize``'s gradient)."""
    along = (normalized * grad).sum(dim=1)
    along.masked_fill_(inv_norm >= 1 / _NORM_FLOOR, 0)
    grad.addcmul_(normalized, along.unsqueeze(1), value=-1).mul_(inv_norm.unsqueeze(1))


def _inverse_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``1 / max(‖w_c‖, 1e-12)`` for every row, ``(C_r,)`` (``F.normalize``'s floor)."""
    return torch.linalg.vector_norm(weight, dim=1).clamp_min_(_NORM_FLOOR).reciprocal_()


def _project_out_row_direction_(grad: torch.Tensor, weight: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """Turn ``M = ∂L/∂ŵ_c / ‖w_c‖`` into ``∂L/∂w_c`` in place: ``M_c − (ŵ_c·M_c) ŵ_c``."""
    row_dots = torch.bmm(weight.unsqueeze(1), grad.unsqueeze(2)).view(-1)
    along = row_dots * inv_norm * inv_norm
    grad.addcmul_(weight, along.unsqueeze(1), value=-1)


def margin_cross_entropy(
    embeddings: torch.Tensor,
    gathered: ChunkedGather,
    weight: torch.Tensor,
    local_target: torch.Tensor,
    margin: Margin,
    rank: int = 0,
    group: ProcessGroup = None,
    workspace: Optional[LogitsWorkspace] = None,
    logit_offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample loss ``(B,)`` of a softmax whose classes are split over ``group``.

    Args:
        embeddings: ``(b_r, d)`` this rank's embeddings, at least fp32; their gradient is
            ``∂L/∂e_r`` summed over the ranks' losses (the head scales it by N).
        gathered: the all-gather of ``embeddings`` over ``group``, chunk by chunk, in flight
            (:class:`~hybridfc.parallel.chunks.ChunkedGather`); the backward pass sends each
            chunk's feature gradient back as soon as it is computed.
        weight: ``(C_r, d)`` this rank's class rows, raw: an angular margin normalises them here,
            and the features too.
        local_target: ``(B,)`` int64, the target's row in ``weight``, or -1 where the target
            class lives on another rank; B is the gathered batch in rank-major order.
        margin: the target-logit transform and scale.
        rank, group: this rank, and the ranks that hold the other classes.
        workspace: where to borrow the logits buffer from (used only when a backward pass
            will follow, which hands the buffer back).
        logit_offset: ``(C_r,)`` added to the (scaled) logits of each class before the softmax,
            never to a target logit; a constant, so the gradient keeps its form.

    Returns the same ``(B,)`` losses on every rank. The backward pass may run once: it reuses
    the softmax buffer for the gradient.
    """
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    if not (torch.is_grad_enabled() and (embeddings.requires_grad or weight.requires_grad)):
        workspace = None
    return _MarginCrossEntropy.apply(embeddings.to(dtype), weight.to(dtype), local_target, margin, gathered, rank,
                                     group, workspace, logit_offset)
