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
from typing import Optional

import torch

from hybridfc.head.margins import Margin
from hybridfc.head.tiles import Cells, TileGrid, TileShape
from hybridfc.parallel.chunks import ChunkedGather, ChunkLayout, scatter_chunk
from hybridfc.parallel.collectives import all_reduce
from hybridfc.parallel.groups import ProcessGroup

LOGITS_MODES = ("store", "recompute")
LOG2E, LN2 = 1 / math.log(2), math.log(2)
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
                group: ProcessGroup, store: Optional[LogitsWorkspace], shape: TileShape,
                logit_offset: Optional[torch.Tensor]):
        layout = gathered.layout
        batch, num_cols = sum(layout.sizes), weight.shape[0]
        grid = TileGrid(layout, num_cols, shape, local_target)
        columns = _Columns(weight, margin, logit_offset)
        features = embeddings.new_empty(batch, embeddings.shape[1])
        inv_feature_norm = embeddings.new_empty(batch) if margin.normalize else None
        target_logit, dpsi = embeddings.new_zeros(batch), embeddings.new_zeros(batch)
        buffer = None if store is None else store.take(batch, num_cols, features)
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
        ctx.columns, ctx.grid, ctx.store, ctx.shape = columns, grid, store, shape
        ctx.scale, ctx.rank, ctx.group = margin.scale, rank, group
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad_loss):
        features, inv_feature_norm, weight, buffer, tile_max, log_sum_exp, target_logit, dpsi = ctx.saved_tensors
        grid, columns = ctx.grid, ctx.columns
        grad_scale = ctx.scale * grad_loss
        target_prob = torch.exp2(target_logit - log_sum_exp)
        target_grad = (ctx.scale * dpsi * (target_prob - 1) * grad_loss).masked_fill_(~grid.has_target, 0.0)
        if buffer is not None:
            row_factor = torch.exp2(tile_max - log_sum_exp.unsqueeze(1)) * grad_scale.unsqueeze(1)
            grad_weight, scattered = _backward_from_store(ctx, buffer, row_factor, target_grad, features,
                                                          inv_feature_norm, weight)
            ctx.store.give_back(buffer)
        else:
            grad_weight, scattered = _backward_by_recompute(ctx, log_sum_exp, grad_scale, target_logit, target_grad,
                                                            features, inv_feature_norm, weight)
        if columns.inv_norm is not None:
            _project_out_row_direction_(grad_weight, weight, columns.inv_norm)
        layout = grid.layout
        grad_embeddings = features.new_empty(layout.sizes[ctx.rank], features.shape[1])
        for chunk, pending in enumerate(scattered):
            grad_embeddings[layout.local_rows(ctx.rank, chunk)] = pending.wait()
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None, None


def _backward_from_store(ctx, buffer, row_factor, target_grad, features, inv_feature_norm, weight):
    """The gradients from the stored ``exp(x − m_t)``: each chunk's feature gradient sent as soon
    as it is computed, then ``dW = Gᵀ E`` over the whole buffer."""
    grid, columns = ctx.grid, ctx.columns
    scattered = []
    for chunk in range(grid.layout.chunks):
        grad_chunk, places = _chunk_gradient_rows(features, grid, chunk)
        for j, cols in enumerate(grid.col_tiles):
            for rows, place in places:
                tile = buffer[rows, cols]
                tile.mul_(row_factor[rows, j].unsqueeze(1))
                _logits_gradient_fixups_(tile, cols, columns, target_grad, grid.cells(rows, j))
                grad_chunk[place].addmm_(tile, weight[cols])
        _normalize_backward_rows_(grad_chunk, places, features, inv_feature_norm)
        scattered.append(scatter_chunk(grad_chunk, grid.layout, chunk, ctx.group))
    return buffer.t() @ features, scattered


def _backward_by_recompute(ctx, log_sum_exp, grad_scale, target_logit, target_grad, features, inv_feature_norm,
                           weight):
    """The gradients with each tile's logits computed again: one sweep over the column tiles, each
    row tile's share of ``dE`` and ``dW`` added while the tile is in cache."""
    grid, columns = ctx.grid, ctx.columns
    grad_features = features.new_zeros(features.shape)
    grad_weight = weight.new_zeros(weight.shape)
    scratch = features.new_empty(ctx.shape.elements(grid.layout, grid.num_cols))
    weight_t = weight.t()
    row_tiles = grid.all_row_tiles()
    for j, cols in enumerate(grid.col_tiles):
        for rows in row_tiles:
            tile = _tile_view(scratch, rows, cols)
            _tile_logits_(tile, features[rows], weight_t[:, cols], columns, cols, target_logit, grid.cells(rows, j))
            tile.sub_(log_sum_exp[rows].unsqueeze(1)).exp2_().mul_(grad_scale[rows].unsqueeze(1))
            _logits_gradient_fixups_(tile, cols, columns, target_grad, grid.cells(rows, j))
            grad_features[rows].addmm_(tile, weight[cols])
            grad_weight[cols].addmm_(tile.t(), features[rows])
    scattered = []
    for chunk in range(grid.layout.chunks):
        grad_chunk, places = _chunk_gradient_rows(features, grid, chunk)
        for rows, place in places:
            grad_chunk[place] = grad_features[rows]
        _normalize_backward_rows_(grad_chunk, places, features, inv_feature_norm)
        scattered.append(scatter_chunk(grad_chunk, grid.layout, chunk, ctx.group))
    return grad_weight, scattered


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


def _chunk_gradient_rows(features: torch.Tensor, grid: TileGrid,
                         chunk: int) -> tuple[torch.Tensor, list[tuple[slice, slice]]]:
    """A zeroed ``(Σ_r rows of chunk, d)`` feature gradient in rank order, and for each row tile of
    the chunk its rows in the batch and its place in that gradient."""
    layout = grid.layout
    grad = features.new_zeros(sum(layout.chunk_sizes(chunk)), features.shape[1])
    places, offset = [], 0
    for start, end in layout.blocks(chunk):
        for rows in grid.row_tiles(chunk):
            if start <= rows.start < end:
                places.append((rows, slice(offset + rows.start - start, offset + rows.stop - start)))
        offset += end - start
    return grad, places


def _normalize_backward_rows_(grad: torch.Tensor, places: list[tuple[slice, slice]], features: torch.Tensor,
                              inv_feature_norm: Optional[torch.Tensor]) -> None:
    if inv_feature_norm is None:
        return
    for rows, place in places:
        _normalize_backward_(grad[place], features[rows], inv_feature_norm[rows])


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
        workspace: where ``store`` borrows its logits buffer from (default: a fresh one).
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
    store = (workspace or LogitsWorkspace()) if logits == "store" and backward_follows else None
    shape = TileShape.for_device(weight.device, logits)
    return _MarginCrossEntropy.apply(embeddings.to(dtype), weight.to(dtype), local_target, margin, gathered, rank,
                                     group, store, shape, logit_offset)
