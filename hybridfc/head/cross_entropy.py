"""Class-parallel margin softmax cross-entropy: the head's math in one place.

Each rank holds the rows ``W_r`` of its shard and the gathered batch ``E`` ``(B, d)``. Rank r
computes the logits of its classes only, ``(B, C_r)``, one tile at a time
(:mod:`hybridfc.head.tiles`), and does the rest of the forward pass on each tile right after its
GEMM, while it is in cache: the column scale, the logit offset, the target's margin logit, and the
tile's softmax statistics, its row maxima ``m_t`` and ``Σ exp(x − m_t)``. The ranks then agree on
the softmax with two all-reduces: the row maximum ``M``, then the sums of exponentials rescaled to
``M`` and the target logit, fused in one ``(2, B)`` tensor.

What survives the forward pass is the mode's choice (``logits``):

* ``"store"``: one ``(B, C_r)`` buffer holding ``exp(x − m_t)``, kept from one step to the next
  by a :class:`LogitsWorkspace`. The backward pass turns each tile into the logits' gradient in
  place (one product by a row factor, one by a column factor) and adds the tile's share of the
  feature gradient at once; the weight gradient is one GEMM over the buffer. Three GEMMs.
* ``"recompute"``: the per-sample log-sum-exp ``(B,)`` only. The backward pass computes each
  tile's logits again (a fourth GEMM) and adds its share to both gradients, so the loss needs a
  tile of memory, not ``B · C_r``.

For angular margins the class rows are normalised inside the kernel: the logits' columns are
scaled by ``s/‖w_c‖`` and the backward pass projects the row gradient, so no normalised copy of
the ``(C_r, d)`` shard, and none of its gradient, is ever made. Logits, softmax and loss are at
least fp32, whatever the input dtype. No probability is clamped: a sample's loss is
``log Σ exp − target`` however large it is.

The feature exchange is part of the same autograd function, so that it can overlap the compute.
The local batch travels in K chunks (:mod:`hybridfc.parallel.chunks`), all their all-gathers
started before the function runs: chunk j's logits are computed as soon as chunk j has arrived,
while the later chunks are still on the wire. With ``store``, each chunk's feature gradient is
sent as soon as it is computed, while the next chunk's and then the weight gradient are
computed; ``recompute`` sends them after its one sweep over the tiles, whose sum of the weight
gradient runs over the rows in one order whatever K is. On CPU every tile and every sum is the
same whatever K is, so K changes when work happens, never a bit of what is computed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from hybridfc.head.margins import Margin
from hybridfc.head.tiles import Cells, TileGrid, TileShape
from hybridfc.parallel.chunks import ChunkedGather, ChunkLayout, scatter_chunk
from hybridfc.parallel.collectives import Pending, all_reduce
from hybridfc.parallel.groups import ProcessGroup

LOGITS_MODES = ("store", "recompute")
LOG2E, LN2 = 1 / math.log(2), math.log(2)
_NORM_FLOOR = 1e-12


class LogitsWorkspace:
    """The loss's two large buffers, kept from one step to the next: the ``(B, C_r)`` logits that
    ``store`` lends to a forward pass and gets back from its backward pass, and a ``(C_r, d)``
    weight gradient handed back by the head optimizer's ``zero_grad``.

    Reusing them saves the page faults of fresh allocations of that size every step (about a
    fifth of the step on CPU at a million classes). A pass that finds a buffer lent out, or of
    another shape, allocates a new one, so overlapping forward passes stay correct; a graph that
    is never backpropagated just keeps its buffer until freed.
    """

    def __init__(self) -> None:
        self._buffer: Optional[torch.Tensor] = None
        self._gradient: Optional[torch.Tensor] = None

    def take(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A ``(rows, cols)`` buffer of ``like``'s dtype and device."""
        buffer, self._buffer = self._buffer, None
        return _reuse_or_allocate(buffer, (rows, cols), like)

    def give_back(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def take_gradient(self, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped as ``like`` to write a weight gradient into; no other reference to it is kept."""
        gradient, self._gradient = self._gradient, None
        return _reuse_or_allocate(gradient, tuple(like.shape), like)

    def recycle_gradient(self, gradient: torch.Tensor) -> None:
        """Take back a weight gradient that nothing will read again (the head optimizer's ``zero_grad``)."""
        self._gradient = gradient


def _reuse_or_allocate(buffer: Optional[torch.Tensor], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != like.dtype or buffer.device != like.device:
        return like.new_empty(shape)
    return buffer


class _Columns:
    """What the logits' columns need beside the GEMM, each ``(C_r,)``: the scale to base-2 logits
    (``log2(e)·s/‖w_c‖`` for angular margins, ``log2(e)`` for softmax), the offset in base 2 (or
    None) and the inverse row norms (angular margins; else None)."""

    def __init__(self, weight: torch.Tensor, margin: Margin, logit_offset: Optional[torch.Tensor]) -> None:
        self.inv_norm = _inverse_row_norms(weight) if margin.normalize else None
        if self.inv_norm is None:
            self.scale = weight.new_full((weight.shape[0],), LOG2E)
        else:
            self.scale = self.inv_norm * (margin.scale * LOG2E)
        self.offset = None if logit_offset is None else logit_offset.to(weight.dtype) * LOG2E


class _MarginCrossEntropy(torch.autograd.Function):
    """Feature all-gather, class-parallel margin softmax cross-entropy and the feature gradients'
    reduce-scatter, over the chunks of the local batch and the tiles of the logits (module
    docstring)."""

    @staticmethod
    def forward(ctx, embeddings, weight, local_target, margin: Margin, gathered: ChunkedGather, rank: int,
                group: ProcessGroup, workspace: LogitsWorkspace, store: bool, shape: TileShape,
                logit_offset: Optional[torch.Tensor]):
        layout = gathered.layout
        batch, num_cols = sum(layout.sizes), weight.shape[0]
        grid = TileGrid(layout, num_cols, shape, local_target)
        columns = _Columns(weight, margin, logit_offset)
        features = embeddings.new_empty(batch, embeddings.shape[1])
        inv_feature_norm = embeddings.new_empty(batch) if margin.normalize else None
        target_logit, dpsi = embeddings.new_zeros(batch), embeddings.new_zeros(batch)
        buffer = workspace.take(batch, num_cols, features) if store else None
        scratch = features.new_empty(shape.elements(layout, num_cols)) if buffer is None else None
        tile_max = features.new_full((batch, len(grid.col_tiles)), -torch.inf)
        tile_sum = features.new_zeros(batch, len(grid.col_tiles))
        weight_t = weight.t()
        for chunk in range(layout.chunks):
            row_tiles = grid.row_tiles(chunk)
            _prepare_chunk_(features, inv_feature_norm, gathered.wait(chunk), layout, chunk, row_tiles)
            for rows in row_tiles:
                _target_logits_(target_logit[rows], dpsi[rows], features[rows], weight, local_target[rows],
                                columns, margin)
            for j, cols in enumerate(grid.col_tiles):
                for rows in row_tiles:
                    tile = buffer[rows, cols] if buffer is not None else _tile_view(scratch, rows, cols)
                    _tile_logits_(tile, features[rows], weight_t[:, cols], columns, cols, target_logit,
                                  grid.cells(rows, j))
                    torch.amax(tile, dim=1, out=tile_max[rows, j])
                    tile.sub_(tile_max[rows, j].unsqueeze(1)).exp2_()
                    torch.sum(tile, dim=1, out=tile_sum[rows, j])

        row_max = tile_max.amax(dim=1) if grid.col_tiles else tile_max.new_full((batch,), -torch.inf)
        row_max = all_reduce(row_max, "max", group)
        stats = features.new_empty(2, batch)
        torch.sum(tile_sum * torch.exp2(tile_max - row_max.unsqueeze(1)), dim=1, out=stats[0])
        stats[1] = ((target_logit - row_max) * LN2).masked_fill_(~grid.has_target, 0.0)
        sum_exp, target = all_reduce(stats, "sum", group)
        log_sum_exp = row_max + sum_exp.log2()

        ctx.save_for_backward(features, inv_feature_norm, weight, buffer, tile_max, log_sum_exp, target_logit, dpsi)
        ctx.columns, ctx.grid, ctx.workspace, ctx.shape = columns, grid, workspace, shape
        ctx.scale, ctx.rank, ctx.group = margin.scale, rank, group
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad_loss):
        features, inv_feature_norm, weight, buffer, tile_max, log_sum_exp, target_logit, dpsi = ctx.saved_tensors
        grid, columns = ctx.grid, ctx.columns
        grad_scale = ctx.scale * grad_loss
        target_prob = torch.exp2(target_logit - log_sum_exp)
        target_grad = (ctx.scale * dpsi * (target_prob - 1) * grad_loss).masked_fill_(~grid.has_target, 0.0)
        grad_features = features.new_zeros(features.shape)
        grad_weight = ctx.workspace.take_gradient(weight)

        def fixed(tile: torch.Tensor, rows: slice, j: int, cols: slice) -> torch.Tensor:
            _logits_gradient_fixups_(tile, cols, columns, target_grad, grid.cells(rows, j))
            return tile

        if buffer is not None:
            row_factor = torch.exp2(tile_max - log_sum_exp.unsqueeze(1)) * grad_scale.unsqueeze(1)

            def gradient(rows: slice, j: int, cols: slice) -> torch.Tensor:
                return fixed(buffer[rows, cols].mul_(row_factor[rows, j].unsqueeze(1)), rows, j, cols)

            scattered = _store_sweeps(ctx, gradient, buffer, features, inv_feature_norm, weight, grad_features,
                                      grad_weight)
            ctx.workspace.give_back(buffer)
        else:
            scratch, weight_t = features.new_empty(ctx.shape.elements(grid.layout, grid.num_cols)), weight.t()

            def gradient(rows: slice, j: int, cols: slice) -> torch.Tensor:
                tile = _tile_view(scratch, rows, cols)
                _tile_logits_(tile, features[rows], weight_t[:, cols], columns, cols, target_logit, grid.cells(rows, j))
                tile.sub_(log_sum_exp[rows].unsqueeze(1)).exp2_().mul_(grad_scale[rows].unsqueeze(1))
                return fixed(tile, rows, j, cols)

            _sweep(grid, gradient, grid.all_row_tiles(), features, weight, grad_features, grad_weight)
            scattered = [_send_chunk(grad_features, features, inv_feature_norm, grid, chunk, ctx.group)
                         for chunk in range(grid.layout.chunks)]
        if columns.inv_norm is not None:
            _project_out_row_direction_(grad_weight, weight, columns.inv_norm)
        layout = grid.layout
        grad_embeddings = features.new_empty(layout.sizes[ctx.rank], features.shape[1])
        for chunk, pending in enumerate(scattered):
            grad_embeddings[layout.local_rows(ctx.rank, chunk)] = pending.wait()
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None, None, None


TileGradient = Callable[[slice, int, slice], torch.Tensor]
"""``(rows, column tile index, cols)`` -> that tile of ∂L/∂(raw logits)."""


def _store_sweeps(ctx, gradient: TileGradient, buffer, features, inv_feature_norm, weight, grad_features,
                  grad_weight) -> list[Pending]:
    """The gradients from the stored ``exp(x − m_t)``. One chunk: one sweep that adds each tile to
    both gradients while it is in cache. K chunks: a sweep per chunk for its feature gradient, sent
    at once, then one sweep for the weight gradient; every sum runs in the one-chunk sweep's order."""
    grid = ctx.grid
    if grid.layout.chunks == 1:
        _sweep(grid, gradient, grid.all_row_tiles(), features, weight, grad_features, grad_weight)
        return [_send_chunk(grad_features, features, inv_feature_norm, grid, 0, ctx.group)]
    scattered = []
    for chunk in range(grid.layout.chunks):
        _sweep(grid, gradient, grid.row_tiles(chunk), features, weight, grad_features, None)
        scattered.append(_send_chunk(grad_features, features, inv_feature_norm, grid, chunk, ctx.group))
    _sweep(grid, lambda rows, j, cols: buffer[rows, cols], grid.all_row_tiles(), features, weight, None, grad_weight)
    return scattered


def _sweep(grid: TileGrid, gradient: TileGradient, row_tiles: list[slice], features: torch.Tensor,
           weight: torch.Tensor, grad_features: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor]) -> None:
    """Column tiles outside, ``row_tiles`` inside: each tile's gradient added to the rows of
    ``grad_features`` ``(B, d)`` and, when given, written or added to the rows of ``grad_weight``
    ``(C_r, d)`` (the first row tile writes them: ``row_tiles`` must then be every row tile)."""
    if grad_weight is not None and not row_tiles:
        grad_weight.zero_()
    for j, cols in enumerate(grid.col_tiles):
        for i, rows in enumerate(row_tiles):
            tile = gradient(rows, j, cols)
            if grad_features is not None:
                grad_features[rows].addmm_(tile, weight[cols])
            if grad_weight is not None and i == 0:
                torch.mm(tile.t(), features[rows], out=grad_weight[cols])
            elif grad_weight is not None:
                grad_weight[cols].addmm_(tile.t(), features[rows])


def _send_chunk(grad_features: torch.Tensor, features: torch.Tensor, inv_feature_norm: Optional[torch.Tensor],
                grid: TileGrid, chunk: int, group: ProcessGroup) -> Pending:
    """Start the reduce-scatter of ``chunk``'s rows of ∂L/∂(features) (rank order), taken through
    the features' normalisation first."""
    layout = grid.layout
    grad = grad_features.new_empty(sum(layout.chunk_sizes(chunk)), grad_features.shape[1])
    offset = 0
    for start, end in layout.blocks(chunk):
        for rows in grid.row_tiles(chunk):
            if start <= rows.start < end:
                place = grad[offset + rows.start - start: offset + rows.stop - start]
                place.copy_(grad_features[rows])
                if inv_feature_norm is not None:
                    _normalize_backward_(place, features[rows], inv_feature_norm[rows])
        offset += end - start
    return scatter_chunk(grad, layout, chunk, group)


def _prepare_chunk_(features: torch.Tensor, inv_feature_norm: Optional[torch.Tensor], arrived: torch.Tensor,
                    layout: ChunkLayout, chunk: int, row_tiles: list[slice]) -> None:
    """Copy the rows of ``chunk`` that ``arrived`` (``(Σ_r rows of chunk, d)``, rank order) to their
    places in ``features``, tile by tile, normalised when ``inv_feature_norm`` is given."""
    parts = arrived.split(layout.chunk_sizes(chunk))
    for (start, end), part in zip(layout.blocks(chunk), parts):
        for rows in row_tiles:
            if start <= rows.start < end:
                _prepare_features_(features[rows], part[rows.start - start: rows.stop - start],
                                   None if inv_feature_norm is None else inv_feature_norm[rows])


def _prepare_features_(out: torch.Tensor, rows: torch.Tensor, inv_norm: Optional[torch.Tensor]) -> None:
    """``out = rows``, L2-normalised with ``F.normalize``'s floor when ``inv_norm`` (filled here) is given."""
    if inv_norm is None:
        out.copy_(rows)
        return
    torch.linalg.vector_norm(rows, dim=1, out=inv_norm)
    inv_norm.clamp_min_(_NORM_FLOOR).reciprocal_()
    torch.mul(rows, inv_norm.unsqueeze(1), out=out)


def _target_logits_(target_logit: torch.Tensor, dpsi: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                    local_target: torch.Tensor, columns: _Columns, margin: Margin) -> None:
    """Fill the base-2 target logit ``log2(e)·s·ψ(c)`` and ``ψ'(c)`` of a row tile's local targets
    ``(n,)`` (rows whose target lives on another rank get values that are never read)."""
    if weight.shape[0] == 0:
        return
    col = local_target.clamp_min(0)
    similarity = (features * weight[col]).sum(dim=1)
    if columns.inv_norm is not None:
        similarity.mul_(columns.inv_norm[col])
    psi, slope = margin.target_logit(similarity)
    torch.mul(psi, margin.scale * LOG2E, out=target_logit)
    dpsi.copy_(slope)


def _tile_logits_(tile: torch.Tensor, features: torch.Tensor, weight_t: torch.Tensor, columns: _Columns,
                  cols: slice, target_logit: torch.Tensor, cells: Optional[Cells]) -> None:
    """One tile's base-2 logits ``(rows, cols)``: the GEMM, the column scale, the offset, the targets'
    ``log2(e)·s·ψ``."""
    torch.mm(features, weight_t, out=tile)
    tile.mul_(columns.scale[cols])
    if columns.offset is not None:
        tile.add_(columns.offset[cols])
    if cells is not None:
        row, col, sample = cells
        tile[row, col] = target_logit[sample]


def _logits_gradient_fixups_(tile: torch.Tensor, cols: slice, columns: _Columns, target_grad: torch.Tensor,
                             cells: Optional[Cells]) -> None:
    """``s·g·p`` -> ∂L/∂(raw logits) of one tile: the targets' own gradient, then the columns' ``1/‖w_c‖``."""
    if cells is not None:
        row, col, sample = cells
        tile[row, col] = target_grad[sample]
    if columns.inv_norm is not None:
        tile.mul_(columns.inv_norm[cols])


def _tile_view(scratch: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """A contiguous ``(rows, cols)`` tile at the start of ``scratch``."""
    return scratch[: (rows.stop - rows.start) * (cols.stop - cols.start)].view(rows.stop - rows.start,
                                                                               cols.stop - cols.start)


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
    logits: str = "store",
) -> torch.Tensor:
    """Per-sample loss ``(B,)`` of a softmax whose classes are split over ``group``.

    Args:
        embeddings: ``(b_r, d)`` this rank's embeddings, at least fp32; their gradient is
            ``∂L/∂e_r`` summed over the ranks' losses (the head scales it by N).
        gathered: the all-gather of ``embeddings`` over ``group``, chunk by chunk, in flight
            (:class:`~hybridfc.parallel.chunks.ChunkedGather`); the backward pass sends each
            chunk's feature gradient back.
        weight: ``(C_r, d)`` this rank's class rows, raw: an angular margin normalises them here,
            and the features too.
        local_target: ``(B,)`` int64, the target's row in ``weight``, or -1 where the target
            class lives on another rank; B is the gathered batch in rank-major order.
        margin: the target-logit transform and scale.
        rank, group: this rank, and the ranks that hold the other classes.
        workspace: where the logits buffer and the weight gradient are borrowed from (default: fresh ones).
        logit_offset: ``(C_r,)`` added to the (scaled) logits of each class before the softmax,
            never to a target logit; a constant, so the gradient keeps its form.
        logits: ``"store"`` (one ``(B, C_r)`` buffer between forward and backward) or
            ``"recompute"`` (no buffer; the backward computes the logits again).

    Returns the same ``(B,)`` losses on every rank. The backward pass may run once: with
    ``store`` it reuses the buffer for the gradient.
    """
    if logits not in LOGITS_MODES:
        raise ValueError(f"hybridfc: logits must be one of {', '.join(LOGITS_MODES)} (got {logits!r})")
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    backward_follows = torch.is_grad_enabled() and (embeddings.requires_grad or weight.requires_grad)
    shape = TileShape.for_device(weight.device, logits)
    return _MarginCrossEntropy.apply(embeddings.to(dtype), weight.to(dtype), local_target, margin, gathered, rank,
                                     group, workspace or LogitsWorkspace(), logits == "store" and backward_follows,
                                     shape, logit_offset)
