"""The tiles of a step's ``(B, C_r)`` logits: their shape per device, and where the targets fall.

The head never makes a pass over the whole ``(B, C_r)`` logits: it computes them one tile of
rows × columns at a time and does all the elementwise work of the softmax on that tile while it
is in cache (:mod:`hybridfc.head.cross_entropy`).

* Rows: on CPU, the 64-row tiles of :mod:`hybridfc.parallel.chunks`, so that every GEMM sees the
  same rows whatever the number of chunks and K chunks stay bitwise-identical. On CUDA a tile
  takes a rank's whole block of a chunk: a 64-row GEMM would leave most of the device idle.
* Columns: on CPU :data:`CPU_COLUMNS` (a ``64 × 2048`` fp32 tile is 512 KiB and the rows it reads
  1 MiB: both stay in a 2 MiB L2); on CUDA :data:`CUDA_COLUMNS`, so that a column tile's scaled
  rows and, with ``recompute``, the tile itself stay small beside the shard.
* Sweeps over the whole batch: ``recompute``'s backward pass has every chunk at hand, so its tiles
  need not respect the chunks. On CPU they take :data:`CPU_BATCH_ROWS` rows of the gathered batch:
  a quarter as many GEMMs, each summing the weight gradient over four times the rows, and still
  the same rows whatever K is. Such a tile (2 MiB) and its rows no longer fit L2 together; it
  was faster all the same (measured: RESULTS.md, the head step). On CUDA they are the chunk tiles.

>>> shape = TileShape.for_device(torch.device("cpu"))
>>> grid = TileGrid(layout, num_cols=500_000, shape=shape, local_target=target)
>>> grid.row_tiles(chunk=0), grid.col_tiles[:2]
>>> grid.cells(row_tile, j)     # the targets inside that tile: (row in tile, column in tile, sample)
>>> grid.batch_row_tiles()       # the row tiles of a sweep over the whole batch
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hybridfc.parallel.chunks import TILE_ROWS, ChunkLayout, tiles

CPU_COLUMNS = 2048
"""Columns of a CPU tile."""

CUDA_COLUMNS = 16384
"""Columns of a CUDA tile."""

CPU_BATCH_ROWS = 256
"""Rows of a CPU tile in a sweep over the whole batch (``256 × 2048`` fp32: 2 MiB, beyond L2 with
its rows, yet faster than four 64-row tiles)."""


@dataclass(frozen=True)
class TileShape:
    """Rows and columns of a tile; ``None``: a rank's whole block of a chunk, or every column.
    ``batch_rows``: rows of a tile in a sweep over the whole batch (``None``: the chunk tiles)."""

    rows: Optional[int]
    cols: Optional[int]
    batch_rows: Optional[int] = None

    @classmethod
    def for_device(cls, device: torch.device) -> "TileShape":
        """The tile for ``device``."""
        if device.type == "cpu":
            return cls(TILE_ROWS, CPU_COLUMNS, CPU_BATCH_ROWS)
        return cls(None, CUDA_COLUMNS)

    def elements(self, layout: ChunkLayout, num_cols: int, whole_batch: bool = False) -> int:
        """The most elements one tile holds, in a chunk's sweep or (``whole_batch``) the whole batch's."""
        rows = self.rows or max(max(layout.chunk_sizes(chunk)) for chunk in range(layout.chunks))
        if whole_batch and self.batch_rows is not None:
            rows = min(self.batch_rows, sum(layout.sizes))
        return rows * min(self.cols or num_cols, num_cols)


Cells = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(row in tile, column in tile, sample)``, three ``(n,)`` int64 tensors."""


class TileGrid:
    """The tiles of one step's logits and the cells of its local targets.

    Args:
        layout: the chunks of the gathered batch (B rows).
        num_cols: C_r, the shard's rows that enter the softmax.
        shape: the tile shape.
        local_target: ``(B,)`` the target's column, -1 where the target lives on another rank.
        whole_batch: a sweep over the whole batch will follow (``recompute``): its row tiles are
            :attr:`TileShape.batch_rows` tall; otherwise they are the chunks' tiles.

    Building the grid reads the targets on the host: the one host synchronisation of the loss,
    made before its loops.
    """

    def __init__(self, layout: ChunkLayout, num_cols: int, shape: TileShape, local_target: torch.Tensor,
                 whole_batch: bool = False) -> None:
        self.layout = layout
        self.num_cols = num_cols
        width = shape.cols or max(num_cols, 1)
        self.col_tiles = [slice(first, min(first + width, num_cols)) for first in range(0, num_cols, width)]
        self._places = [_chunk_places(layout, chunk, shape.rows) for chunk in range(layout.chunks)]
        self._all_rows = sorted((rows for places in self._places for rows, _ in places), key=lambda rows: rows.start)
        self._batch_rows = (tiles(0, sum(layout.sizes), shape.batch_rows) if whole_batch and shape.batch_rows
                            else self._all_rows)
        self.has_target = local_target >= 0
        tilings = [self._all_rows] if self._batch_rows == self._all_rows else [self._all_rows, self._batch_rows]
        self._levels, self._cells, self._row_targets = _place_targets(local_target, tilings, width,
                                                                      len(self.col_tiles))

    def row_tiles(self, chunk: int) -> list[slice]:
        """The row tiles of ``chunk``, in the gathered batch's order."""
        return [rows for rows, _ in self._places[chunk]]

    def places(self, chunk: int) -> list[tuple[slice, slice]]:
        """Each row tile of ``chunk``: its rows in the gathered batch, and its place among the rows
        of the chunk as they travel (``(Σ_r rows of chunk, ...)``, rank order)."""
        return self._places[chunk]

    def all_row_tiles(self) -> list[slice]:
        """Every row tile, in the gathered batch's order (whatever the chunks)."""
        return self._all_rows

    def batch_row_tiles(self) -> list[slice]:
        """The row tiles of a sweep over the whole batch, in its order (whatever the chunks)."""
        return self._batch_rows

    def cells(self, rows: slice, col_tile: int) -> Optional[Cells]:
        """The local targets in the tile of ``rows`` (a row tile of either sweep) and column tile
        ``col_tile``, or None."""
        return self._cells.get((rows.start, rows.stop, col_tile))

    def targets_in(self, rows: slice) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(sample, column)`` of the local targets in the row tile ``rows``, or None."""
        return self._row_targets.get((rows.start, rows.stop))

    def target_levels(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(sample, column)`` of every local target, in levels that name each column at most once
        (the first sample of each class, then the second…), each in column order: adding per level
        is deterministic on every device, as no two additions of a level meet."""
        return self._levels


def _chunk_places(layout: ChunkLayout, chunk: int, tile_rows: Optional[int]) -> list[tuple[slice, slice]]:
    """``(rows in the batch, place in the chunk)`` of each row tile of ``chunk`` (``tile_rows`` None:
    a rank's whole block)."""
    places, offset = [], 0
    for start, end in layout.blocks(chunk):
        spans = tiles(start, end, tile_rows) if tile_rows else ([slice(start, end)] if end > start else [])
        places += [(rows, slice(offset + rows.start - start, offset + rows.stop - start)) for rows in spans]
        offset += end - start
    return places


def _place_targets(local_target: torch.Tensor, tilings: list[list[slice]], width: int, num_col_tiles: int):
    """The local targets moved to the device in one copy: ``(sample, column)`` by level (see
    :meth:`TileGrid.target_levels`), and for each tiling of the rows the cells by tile
    ``(start, stop, column tile)`` and ``(sample, column)`` by row tile ``(start, stop)``."""
    target = local_target.cpu().numpy()
    samples = np.nonzero(target >= 0)[0]
    if samples.size == 0:
        return [], {}, {}
    cols = target[samples]
    by_column = np.lexsort((samples, cols))
    level = np.empty(samples.size, dtype=np.int64)
    level[by_column] = _rank_within_runs(cols[by_column])
    by_level = np.lexsort((cols, level))
    parts = [np.stack([samples[by_level], cols[by_level], level[by_level], level[by_level]])]
    keys = []
    for row_tiles in tilings:
        starts = np.array([tile.start for tile in row_tiles])
        row_tile = np.searchsorted(starts, samples, side="right") - 1
        col_tile = cols // width
        order = np.argsort(row_tile * num_col_tiles + col_tile, kind="stable")
        sample, col, r, j = (a[order] for a in (samples, cols, row_tile, col_tile))
        parts.append(np.stack([sample - starts[r], col - j * width, sample, col]))
        keys.append((row_tiles, r, j))
    table = torch.from_numpy(np.concatenate(parts, axis=1)).to(local_target.device)
    levels = table[:2, :samples.size]
    cells, row_targets = {}, {}
    for i, (row_tiles, r, j) in enumerate(keys):
        part = table[:, (i + 1) * samples.size:(i + 2) * samples.size]
        span = [(row_tiles[t].start, row_tiles[t].stop) for t in range(len(row_tiles))]
        cells.update(_slices(part[:3], r * num_col_tiles + j, lambda k: (*span[k // num_col_tiles], k % num_col_tiles)))
        row_targets.update(_slices(part[2:], r, lambda k: span[k]))
    return list(_slices(levels, level[by_level], lambda k: k).values()), cells, row_targets


def _rank_within_runs(values: np.ndarray) -> np.ndarray:
    """For sorted ``values``, each entry's place among the equal entries before it (0, 1, …)."""
    first = np.r_[0, np.nonzero(values[1:] != values[:-1])[0] + 1]
    starts = np.repeat(first, np.diff(np.r_[first, values.size]))
    return np.arange(values.size) - starts


def _slices(table: torch.Tensor, key: np.ndarray, name) -> dict:
    """``{name(k): the columns of table whose key is k}`` for a sorted ``key``, as tuples of rows."""
    keys, first = np.unique(key, return_index=True)
    last = np.append(first[1:], key.size)
    return {name(int(k)): tuple(table[:, lo:hi]) for k, lo, hi in zip(keys, first, last)}
