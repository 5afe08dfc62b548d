"""Class-parallel margin softmax cross-entropy: the head's math in one place.

Each rank holds the rows ``W_r`` of its shard and the gathered batch ``E`` ``(B, d)``. Rank r
computes the logits of its classes only, ``(B, C_r)``, one tile at a time
(:mod:`hybridfc.head.tiles`), and does the rest of the forward pass on each tile right after its
GEMM, while it is in cache: the logit offset, the targets' margin logit, and the tile's softmax
statistics, its row maxima ``m_t`` and ``Σ 2^(x − m_t)``. The logits are in base 2
(``x = log2(e)·logit``, the factor folded into the rows' column scale): ``exp2`` is 2.7× faster
than ``exp`` on CPU. The ranks then agree on the softmax with two all-reduces: the row maximum
``M``, then the sums rescaled to ``M`` and the target logit, fused in one ``(2, B)`` tensor.

What survives the forward pass is the mode's choice (``logits``):

* ``"store"``: one ``(B, C_r)`` buffer holding ``2^(x − m_t)`` (the targets' cells zeroed), kept
  from one step to the next by a :class:`LogitsWorkspace`. Three GEMMs.
* ``"recompute"``: the per-sample log-sum-exp ``(B,)`` only; the backward pass computes each
  tile's logits again (a fourth GEMM), so the loss needs a tile of memory, not ``B · C_r``.

The backward pass is factored so that every large tile is only read, by the two GEMMs that need
it: off the targets ``∂L/∂x = T · f · row_scale``, with ``T`` the tile, ``f`` a factor per row
and tile, and the factors applied on the ``(rows, d)`` side (:class:`_Gradients`); the targets'
own gradient is added on its own, never as a difference of large numbers.

For angular margins the class rows are normalised inside the kernel: each column tile's rows are
scaled by ``log2(e)·s/‖w_c‖`` into one reused ``(cols, d)`` buffer and the backward pass projects
the row gradient, so no normalised copy of the ``(C_r, d)`` shard, and none of its gradient, is
ever made. Logits, softmax and loss are at
least fp32, whatever the input dtype. No probability is clamped: a sample's loss is
``log Σ exp − target`` however large it is.

The feature exchange is part of the same autograd function, so that it can overlap the compute.
The local batch travels in K chunks (:mod:`hybridfc.parallel.chunks`), all their all-gathers
started before the function runs: chunk j's logits are computed as soon as chunk j has arrived,
while the later chunks are still on the wire. With ``store`` and K > 1 each chunk's feature
gradient is sent as soon as it is computed, then the weight gradient is summed in a sweep of its
own; with one chunk, and with ``recompute``, one sweep adds each tile to both gradients while it
is fresh in cache and the feature gradients travel after it (``recompute``'s over the whole batch's
row tiles, larger on CPU than a chunk's). The weight gradient's sum runs over the rows in one
order whatever K is, and on CPU every tile is the same whatever K is, so K changes when work
happens, never a bit of what is computed.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional

import torch

from hybridfc.head.margins import Margin
from hybridfc.head.tiles import Cells, TileGrid, TileShape
from hybridfc.parallel.chunks import ChunkedGather, scatter_chunk
from hybridfc.parallel.collectives import Pending, all_reduce
from hybridfc.parallel.groups import ProcessGroup

LOGITS_MODES = ("store", "recompute")
LOG2E, LN2 = 1 / math.log(2), math.log(2)
_NORM_FLOOR = 1e-12


class LogitsWorkspace:
    """The step's large buffers, kept from one step to the next: the ``(B, C_r)`` logits that
    ``store`` lends to a forward pass and gets back from its backward pass, the weight gradient
    handed back by the head optimizer's ``zero_grad`` (dense, or a selection's active rows'), and a
    selection's copy of its active rows.

    Reusing them saves the page faults of fresh allocations of that size every step (about a
    fifth of the step on CPU at a million classes). A pass that finds a buffer lent out, or of
    another shape, allocates a new one, so overlapping forward passes stay correct; a graph that
    is never backpropagated just keeps its buffer until freed.
    """

    def __init__(self) -> None:
        self._buffer: Optional[torch.Tensor] = None
        self._gradient: Optional[torch.Tensor] = None
        self._rows: Optional[torch.Tensor] = None

    def take(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A ``(rows, cols)`` buffer of ``like``'s dtype and device."""
        buffer, self._buffer = self._buffer, None
        return _reuse_or_allocate(buffer, (rows, cols), like)

    def give_back(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def take_rows(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A ``(rows, d)`` buffer of ``like``'s dtype and device for a selection's active rows."""
        buffer, self._rows = self._rows, None
        return _reuse_or_allocate(buffer, (rows, like.shape[1]), like)

    def give_back_rows(self, buffer: torch.Tensor) -> None:
        """Take back the active rows' buffer once their backward pass is done."""
        self._rows = buffer

    def take_gradient(self, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped as ``like`` to write a weight gradient into; no other reference to it is kept."""
        gradient, self._gradient = self._gradient, None
        return _reuse_or_allocate(gradient, tuple(like.shape), like)

    def recycle_gradient(self, gradient: torch.Tensor) -> None:
        """Take back a weight gradient that nothing will read again (the head optimizer's ``zero_grad``)."""
        self._gradient = gradient


def unshared(tensor: torch.Tensor) -> bool:
    """No Python reference to ``tensor`` but the one name its caller holds, and no view of its
    memory (CPython's count; where torch cannot tell, shared)."""
    storage_uses = getattr(torch._C, "_storage_Use_Count", None)
    if storage_uses is None:
        return False
    # the caller's name, this parameter and getrefcount's argument; the tensor and the storage() temporary
    return sys.getrefcount(tensor) <= 3 and storage_uses(tensor.untyped_storage()._cdata) <= 2


def _reuse_or_allocate(buffer: Optional[torch.Tensor], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != like.dtype or buffer.device != like.device:
        return like.new_empty(shape)
    return buffer


class _Columns:
    """What the logits' columns need beside the GEMM, each ``(C_r,)``: the scale to base-2 logits
    (``log2(e)·s/‖w_c‖`` for angular margins, ``log2(e)`` for softmax), the offset in base 2 (or
    None) and the inverse row norms (angular margins; else None)."""

    def __init__(self, weight: torch.Tensor, margin: Margin, logit_offset: Optional[torch.Tensor]) -> None:
        self.weight = weight
        self.inv_norm = _inverse_row_norms(weight) if margin.normalize else None
        if self.inv_norm is None:
            self.scale = weight.new_full((weight.shape[0],), LOG2E)
        else:
            self.scale = self.inv_norm * (margin.scale * LOG2E)
        self.offset = None if logit_offset is None else logit_offset.to(weight.dtype) * LOG2E
        self.base2_scale = margin.scale * LOG2E
        self._scaled: Optional[torch.Tensor] = None

    def scaled_rows(self, cols: slice) -> torch.Tensor:
        """The column tile's rows times their scale, ``(cols, d)``: their GEMM gives base-2 logits.
        Written over the previous tile's, in one kept buffer (a fresh megabyte per tile costs its
        page faults)."""
        rows = cols.stop - cols.start
        if self._scaled is None or self._scaled.shape[0] < rows:
            self._scaled = self.weight.new_empty(rows, self.weight.shape[1])
        return torch.mul(self.weight[cols], self.scale[cols].unsqueeze(1), out=self._scaled[:rows])

    def unit_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows ``rows`` (indices) over their norm (angular margins) or as they are, ``(n, d)``:
        what a logit's gradient multiplies to give the features' gradient."""
        if self.inv_norm is None:
            return self.weight[rows]
        return self.weight[rows] * self.inv_norm[rows].unsqueeze(1)


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
        grid = TileGrid(layout, num_cols, shape, local_target, whole_batch=not store)
        columns = _Columns(weight, margin, logit_offset)
        features = embeddings.new_empty(batch, embeddings.shape[1])
        inv_feature_norm = embeddings.new_empty(batch) if margin.normalize else None
        target_logit, dpsi = embeddings.new_zeros(batch), embeddings.new_zeros(batch)
        buffer = workspace.take(batch, num_cols, features) if store else None
        scratch = features.new_empty(shape.elements(layout, num_cols)) if buffer is None else None
        tile_max = features.new_full((batch, len(grid.col_tiles)), -torch.inf)
        tile_sum = features.new_zeros(batch, len(grid.col_tiles))
        for chunk in range(layout.chunks):
            row_tiles = grid.row_tiles(chunk)
            _prepare_chunk_(features, inv_feature_norm, gathered.wait(chunk), grid.places(chunk))
            for rows in row_tiles:
                _target_logits_(target_logit[rows], dpsi[rows], features[rows], local_target[rows], columns, margin)
            for j, cols in enumerate(grid.col_tiles):
                scaled_t = columns.scaled_rows(cols).t()
                for rows in row_tiles:
                    tile = buffer[rows, cols] if buffer is not None else _tile_view(scratch, rows, cols)
                    cells = grid.cells(rows, j)
                    _tile_logits_(tile, features[rows], scaled_t, columns, cols, target_logit, cells)
                    torch.amax(tile, dim=1, out=tile_max[rows, j])
                    tile.sub_(tile_max[rows, j].unsqueeze(1)).exp2_()
                    torch.sum(tile, dim=1, out=tile_sum[rows, j])
                    if cells is not None:   # the backward pass adds the targets' gradient on its own
                        tile[cells[0], cells[1]] = 0

        row_max = tile_max.amax(dim=1) if grid.col_tiles else tile_max.new_full((batch,), -torch.inf)
        row_max = all_reduce(row_max, "max", group)
        stats = features.new_empty(2, batch)
        torch.sum(tile_sum * torch.exp2(tile_max - row_max.unsqueeze(1)), dim=1, out=stats[0])
        stats[1] = ((target_logit - row_max) * LN2).masked_fill_(~grid.has_target, 0.0)
        sum_exp, target = all_reduce(stats, "sum", group)
        log_sum_exp = row_max + sum_exp.log2()

        ctx.save_for_backward(features, inv_feature_norm, weight, buffer, tile_max if store else None, log_sum_exp,
                              target_logit, dpsi)
        ctx.columns, ctx.grid, ctx.workspace, ctx.shape = columns, grid, workspace, shape
        ctx.backpropagated = False
        ctx.scale, ctx.rank, ctx.group = margin.scale, rank, group
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backpropagated:
            raise RuntimeError("hybridfc: the head's loss can be backpropagated once (its logits buffer is lent "
                               "to the next forward pass); retain_graph is not supported through it")
        ctx.backpropagated = True
        features, inv_feature_norm, weight, buffer, tile_max, log_sum_exp, target_logit, dpsi = ctx.saved_tensors
        grid, columns = ctx.grid, ctx.columns
        row_scale = ctx.scale * grad_loss
        target_grad = row_scale * dpsi * (torch.exp2(target_logit - log_sum_exp) - 1)
        gradients = _Gradients(grid, columns, features, inv_feature_norm, row_scale, target_grad,
                               ctx.workspace.take_gradient(weight))
        if buffer is not None:
            tile_factor = torch.exp2(tile_max - log_sum_exp.unsqueeze(1))
            scattered = _store_sweeps(ctx, gradients,
                                      lambda rows, j, cols, _: (buffer[rows, cols], tile_factor[rows, j]))
            ctx.workspace.give_back(buffer)
        else:
            scratch = features.new_empty(ctx.shape.elements(grid.layout, grid.num_cols, whole_batch=True))

            def recomputed(rows: slice, j: int, cols: slice, scaled_t: torch.Tensor):
                tile = _tile_view(scratch, rows, cols)
                _tile_logits_(tile, features[rows], scaled_t, columns, cols, target_logit, None)
                tile.sub_(log_sum_exp[rows].unsqueeze(1)).exp2_()
                cells = grid.cells(rows, j)
                if cells is not None:
                    tile[cells[0], cells[1]] = 0
                return tile, None

            gradients.sweep(recomputed, grid.batch_row_tiles(), features_too=True, weight_too=True)
            scattered = [gradients.send_chunk(chunk, ctx.group) for chunk in range(grid.layout.chunks)]
        grad_weight = gradients.finish_weight()
        layout = grid.layout
        grad_embeddings = features.new_empty(layout.sizes[ctx.rank], features.shape[1])
        for chunk, pending in enumerate(scattered):
            grad_embeddings[layout.local_rows(ctx.rank, chunk)] = pending.wait()
        return grad_embeddings, grad_weight, None, None, None, None, None, None, None, None, None


TileGradient = Callable[[slice, int, slice, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]
"""``(rows, column tile index, cols, the tile's scaled rows ᵀ (d, cols))`` -> ``(T, f)``: that tile's
∂L/∂(logits) is ``T · f · row_scale`` (``f`` ``(rows,)`` or None for 1) off the targets, whose cells
``T`` holds as 0."""


class _Gradients:
    """Both gradients of the loss, summed tile by tile in a factored form that leaves every large
    tile as it is: ``∂L/∂x = T · f · row_scale`` off the targets, so the features' gradient sums
    ``f · (T @ Ŵ)`` (``Ŵ``: the scaled rows, the logits' own) and takes ``row_scale`` once per row
    at the end, and the weight gradient sums ``Tᵀ @ (f · row_scale · E)``. The targets' own
    gradient is added on its own (no difference of large numbers), then the rows' normalisation
    is undone."""

    def __init__(self, grid: TileGrid, columns: _Columns, features: torch.Tensor,
                 inv_feature_norm: Optional[torch.Tensor], row_scale: torch.Tensor, target_grad: torch.Tensor,
                 grad_weight: torch.Tensor) -> None:
        self.grid, self.columns, self.features, self.inv_feature_norm = grid, columns, features, inv_feature_norm
        self.row_scale, self.target_grad = row_scale, target_grad
        self.scaled_features = features * row_scale.unsqueeze(1)
        self.features_grad = features.new_zeros(features.shape)
        self.weight_grad = grad_weight

    def sweep(self, gradient: TileGradient, row_tiles: list[slice], features_too: bool, weight_too: bool) -> None:
        """Column tiles outside, ``row_tiles`` inside: each tile added to the features' gradient of its
        rows (then finished for ``row_tiles``) and to the weight gradient of its columns (the first
        row tile writes them: ``row_tiles`` must then be every row tile, in order)."""
        if weight_too and not row_tiles:
            self.weight_grad.zero_()
        for j, cols in enumerate(self.grid.col_tiles):
            scaled_rows = self.columns.scaled_rows(cols)
            for i, rows in enumerate(row_tiles):
                tile, factor = gradient(rows, j, cols, scaled_rows.t())
                if features_too:
                    self._add_features(rows, tile, factor, scaled_rows)
                if weight_too:
                    self._add_weight(rows, cols, tile, factor, first=i == 0)
        if features_too:
            for rows in row_tiles:
                self._finish_feature_rows(rows)

    def _add_features(self, rows: slice, tile: torch.Tensor, factor: Optional[torch.Tensor],
                      scaled_rows: torch.Tensor) -> None:
        if factor is None:
            self.features_grad[rows].addmm_(tile, scaled_rows)
        else:
            self.features_grad[rows].addcmul_(tile @ scaled_rows, factor.unsqueeze(1))

    def _add_weight(self, rows: slice, cols: slice, tile: torch.Tensor, factor: Optional[torch.Tensor],
                    first: bool) -> None:
        right = self.scaled_features[rows]
        if factor is not None:
            right = right * factor.unsqueeze(1)
        if first:
            torch.mm(tile.t(), right, out=self.weight_grad[cols])
        else:
            self.weight_grad[cols].addmm_(tile.t(), right)

    def _finish_feature_rows(self, rows: slice) -> None:
        """``row_scale`` on the rows' sums (of products with the scaled rows: ``Ŵ·log2(e)·s``), then
        their targets' gradient."""
        self.features_grad[rows].mul_(self.row_scale[rows].unsqueeze(1) / self.columns.base2_scale)
        targets = self.grid.targets_in(rows)
        if targets is not None:
            samples, cols = targets
            self.features_grad.index_add_(0, samples, self.target_grad[samples].unsqueeze(1) *
                                          self.columns.unit_rows(cols))

    def send_chunk(self, chunk: int, group: ProcessGroup) -> Pending:
        """Start the reduce-scatter of ``chunk``'s rows of ∂L/∂(gathered features) (rank order), taken
        through the features' normalisation."""
        layout = self.grid.layout
        grad = self.features_grad.new_empty(sum(layout.chunk_sizes(chunk)), self.features_grad.shape[1])
        for rows, place in self.grid.places(chunk):
            grad[place] = self.features_grad[rows]
            if self.inv_feature_norm is not None:
                _normalize_backward_(grad[place], self.features[rows], self.inv_feature_norm[rows])
        return scatter_chunk(grad, layout, chunk, group)

    def finish_weight(self) -> torch.Tensor:
        """The weight gradient: the targets' own part added (a class twice in the batch: in two
        levels, deterministic on every device), the rows' normalisation undone."""
        for samples, cols in self.grid.target_levels():
            self.weight_grad.index_add_(0, cols, self.target_grad[samples].unsqueeze(1) * self.features[samples])
        inv_norm = self.columns.inv_norm
        if inv_norm is not None:
            self.weight_grad.mul_(inv_norm.unsqueeze(1))
            _project_out_row_direction_(self.weight_grad, self.columns.weight, inv_norm)
        return self.weight_grad


def _store_sweeps(ctx, gradients: _Gradients, stored: TileGradient) -> list[Pending]:
    """The gradients from the stored ``exp2(x − m_t)`` (``f = exp2(m_t − lse)``). One chunk: one
    sweep that adds each tile to both gradients while it is in cache. K chunks: a sweep per chunk for
    its features' gradient, sent at once, then one for the weight gradient; every sum runs in the
    one-chunk sweep's order."""
    grid = ctx.grid
    if grid.layout.chunks == 1:
        gradients.sweep(stored, grid.all_row_tiles(), features_too=True, weight_too=True)
        return [gradients.send_chunk(0, ctx.group)]
    scattered = []
    for chunk in range(grid.layout.chunks):
        gradients.sweep(stored, grid.row_tiles(chunk), features_too=True, weight_too=False)
        scattered.append(gradients.send_chunk(chunk, ctx.group))
    gradients.sweep(stored, grid.all_row_tiles(), features_too=False, weight_too=True)
    return scattered


def _prepare_chunk_(features: torch.Tensor, inv_feature_norm: Optional[torch.Tensor], arrived: torch.Tensor,
                    places: list[tuple[slice, slice]]) -> None:
    """Copy the rows of a chunk that ``arrived`` (``(Σ_r rows of chunk, d)``, rank order) to their
    ``places`` in ``features``, tile by tile, normalised when ``inv_feature_norm`` is given."""
    for rows, place in places:
        _prepare_features_(features[rows], arrived[place], None if inv_feature_norm is None else inv_feature_norm[rows])


def _prepare_features_(out: torch.Tensor, rows: torch.Tensor, inv_norm: Optional[torch.Tensor]) -> None:
    """``out = rows``, L2-normalised with ``F.normalize``'s floor when ``inv_norm`` (filled here) is given."""
    if inv_norm is None:
        out.copy_(rows)
        return
    torch.linalg.vector_norm(rows, dim=1, out=inv_norm)
    inv_norm.clamp_min_(_NORM_FLOOR).reciprocal_()
    torch.mul(rows, inv_norm.unsqueeze(1), out=out)


def _target_logits_(target_logit: torch.Tensor, dpsi: torch.Tensor, features: torch.Tensor,
                    local_target: torch.Tensor, columns: _Columns, margin: Margin) -> None:
    """Fill the base-2 target logit ``log2(e)·s·ψ(c)`` and ``ψ'(c)`` of a row tile's local targets
    ``(n,)`` (rows whose target lives on another rank get values that are never read)."""
    if columns.weight.shape[0] == 0:
        return
    similarity = (features * columns.unit_rows(local_target.clamp_min(0))).sum(dim=1)
    psi, slope = margin.target_logit(similarity)
    torch.mul(psi, margin.scale * LOG2E, out=target_logit)
    dpsi.copy_(slope)


def _tile_logits_(tile: torch.Tensor, features: torch.Tensor, scaled_t: torch.Tensor, columns: _Columns,
                  cols: slice, target_logit: torch.Tensor, cells: Optional[Cells]) -> None:
    """One tile's base-2 logits ``(rows, cols)``: the GEMM with the scaled rows ``(d, cols)``, the
    offset, the targets' ``log2(e)·s·ψ``."""
    torch.mm(features, scaled_t, out=tile)
    if columns.offset is not None:
        tile.add_(columns.offset[cols])
    if cells is not None:
        row, col, sample = cells
        tile[row, col] = target_logit[sample]


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

    Returns the same ``(B,)`` losses on every rank. The backward pass may run once (a second one
    raises): ``store`` lends its buffer to the next forward pass.
    """
    if logits not in LOGITS_MODES:
        raise ValueError(f"hybridfc: logits must be one of {', '.join(LOGITS_MODES)} (got {logits!r})")
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    backward_follows = torch.is_grad_enabled() and (embeddings.requires_grad or weight.requires_grad)
    shape = TileShape.for_device(weight.device)
    return _MarginCrossEntropy.apply(embeddings.to(dtype), weight.to(dtype), local_target, margin, gathered, rank,
                                     group, workspace or LogitsWorkspace(), logits == "store" and backward_follows,
                                     shape, logit_offset)
