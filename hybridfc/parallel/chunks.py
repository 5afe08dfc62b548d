"""The gathered batch in chunks: which rows each chunk holds, and its exchanges in flight.

Rank r's local batch of ``b_r`` rows is cut into tiles of :data:`TILE_ROWS` rows (the last one
shorter), and K chunks take consecutive tiles: chunk j holds tiles ``[⌊j·t_r/K⌋, ⌊(j+1)·t_r/K⌋)``
of the ``t_r`` tiles. Chunk j of the gathered batch is every rank's chunk j, in rank order; its
rows keep the places they have in the whole gathered batch, which is rank-major (rank 0's ``b_0``
rows, then rank 1's…) whatever K is. The head computes tile by tile, so every GEMM sees the same
rows whatever K is, and K changes when work happens, never a bit of what is computed (a BLAS
sums a row's products in an order that depends on how many rows it is given).

>>> layout = ChunkLayout.of(sizes=[300, 70], chunks=2)
>>> layout.chunk_sizes(0), layout.blocks(0)          # rows per rank, their place in the batch
([128, 64], [(0, 128), (300, 364)])
>>> gathered = ChunkedGather(x, layout, rank, group)  # every chunk's all-gather in flight
>>> gathered.wait(0)                                 # (192, d): chunk 0 of both ranks

K shrinks to the most tiles a rank has when that is fewer (a short last batch), so every chunk
holds rows somewhere; a rank with fewer tiles than K sends empty chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridfc.parallel.collectives import Pending, gather_padded, reduce_scatter_padded
from hybridfc.parallel.groups import ProcessGroup

TILE_ROWS = 64
"""Rows of one tile: the unit of the head's GEMMs and of a chunk."""


def tiles(start: int, end: int, rows: int = TILE_ROWS) -> list[slice]:
    """The tiles of the rows ``[start, end)``, which begin at a tile boundary of their rank."""
    return [slice(first, min(first + rows, end)) for first in range(start, end, rows)]


@dataclass(frozen=True)
class ChunkLayout:
    """Where the chunks of every rank's local batch sit; ``sizes[r]`` is rank r's ``b_r``."""

    sizes: tuple[int, ...]
    chunks: int

    @classmethod
    def of(cls, sizes: "list[int] | tuple[int, ...]", chunks: int) -> "ChunkLayout":
        """``chunks`` asked for, at most the most tiles a rank has (at least 1)."""
        most_tiles = -(-max(sizes) // TILE_ROWS)
        return cls(tuple(sizes), max(1, min(chunks, most_tiles)))

    @property
    def tile_rows(self) -> int:
        """Rows per tile: a chunk takes whole tiles."""
        return TILE_ROWS

    def local_rows(self, rank: int, chunk: int) -> slice:
        """Rank ``rank``'s local rows in ``chunk``."""
        rows = self.sizes[rank]
        count = -(-rows // TILE_ROWS)
        first, last = chunk * count // self.chunks, (chunk + 1) * count // self.chunks
        return slice(min(first * TILE_ROWS, rows), min(last * TILE_ROWS, rows))

    def chunk_sizes(self, chunk: int) -> list[int]:
        """Rows of ``chunk`` on each rank."""
        return [self.local_rows(r, chunk).stop - self.local_rows(r, chunk).start for r in range(len(self.sizes))]

    def blocks(self, chunk: int) -> list[tuple[int, int]]:
        """``[start, end)`` in the gathered batch of each rank's rows of ``chunk``, in rank order."""
        blocks, offset = [], 0
        for rank, rows in enumerate(self.sizes):
            part = self.local_rows(rank, chunk)
            blocks.append((offset + part.start, offset + part.stop))
            offset += rows
        return blocks


class ChunkedGather:
    """The all-gather of every chunk of this rank's ``(b_r, ...)`` rows, all started at once.

    :meth:`wait` gives chunk j, ``(Σ_r rows of chunk j, ...)`` in rank order; :meth:`wait_all`
    the whole gathered batch ``(Σ_r b_r, ...)`` in rank-major order.
    """

    def __init__(self, x: torch.Tensor, layout: ChunkLayout, rank: int, group: ProcessGroup = None) -> None:
        self.layout = layout
        self._pending = [gather_padded(x[layout.local_rows(rank, j)], layout.chunk_sizes(j), group, async_op=True)
                         for j in range(layout.chunks)]

    def wait(self, chunk: int) -> torch.Tensor:
        return self._pending[chunk].wait()

    def wait_all(self) -> torch.Tensor:
        if self.layout.chunks == 1:
            return self.wait(0)
        first = self.wait(0)
        out = first.new_empty((sum(self.layout.sizes), *first.shape[1:]))
        for chunk in range(self.layout.chunks):
            rows = self.wait(chunk)
            offset = 0
            for start, end in self.layout.blocks(chunk):
                out[start:end] = rows[offset: offset + end - start]
                offset += end - start
        return out


def scatter_chunk(grad: torch.Tensor, layout: ChunkLayout, chunk: int, group: ProcessGroup = None) -> Pending:
    """Start the reduce-scatter of ``chunk``'s gradient ``(Σ_r rows of chunk, ...)`` (rank order);
    ``wait()`` gives this rank's rows of the chunk, summed over the ranks."""
    return reduce_scatter_padded(grad, layout.chunk_sizes(chunk), group, async_op=True)
