"""The tiles of the logits: their shape per device, the targets' cells, and the head computed with
CUDA's tile shape (a rank's whole block of a chunk × a few columns) on CPU against the float64
reference, so that the GPU's tiling arithmetic is checked where CI runs."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc import ClassParallelFC
from hybridfc.head import tiles
from hybridfc.head.tiles import TileGrid, TileShape
from hybridfc.parallel import ChunkLayout
from hybridfc.parallel.groups import shard_range
from reference import random_batch, random_weight, rank_rows, reference_grads

WIDTH = 5
MARGIN = {"type": "arcface", "scale": 8.0, "margin": 0.3}


def test_tile_shape_per_device():
    assert TileShape.for_device(torch.device("cpu")) == TileShape(64, tiles.CPU_COLUMNS, tiles.CPU_BATCH_ROWS)
    assert TileShape.for_device(torch.device("cuda", 0)) == TileShape(None, tiles.CUDA_COLUMNS)


@pytest.mark.parametrize("shape", [TileShape(64, 7, 100), TileShape(64, 7), TileShape(None, 7), TileShape(None, None)],
                         ids=str)
@pytest.mark.parametrize("chunks", [1, 3])
def test_every_local_target_has_one_cell_in_the_tile_that_holds_it(shape, chunks):
    layout = ChunkLayout.of([200, 0, 70], chunks)
    batch, cols = sum(layout.sizes), 40
    target = torch.randint(-1, cols, (batch,), generator=torch.Generator().manual_seed(chunks))
    grid = TileGrid(layout, cols, shape, target, whole_batch=True)
    chunk_tiles = [rows for chunk in range(layout.chunks) for rows in grid.row_tiles(chunk)]
    for row_tiles in (chunk_tiles, grid.batch_row_tiles()):
        found, found_in_rows = torch.full((batch,), -1), torch.full((batch,), -1)
        for rows in row_tiles:
            for j, span in enumerate(grid.col_tiles):
                cells = grid.cells(rows, j)
                if cells is not None:
                    row, col, sample = cells
                    assert torch.equal(sample, row + rows.start) and (found[sample] == -1).all()
                    found[sample] = col + span.start
            if grid.targets_in(rows) is not None:
                samples, columns = grid.targets_in(rows)
                assert ((samples >= rows.start) & (samples < rows.stop)).all()
                found_in_rows[samples] = columns
        assert torch.equal(found, target) and torch.equal(found_in_rows, target)
    covered = sorted(i for rows in grid.batch_row_tiles() for i in range(rows.start, rows.stop))
    assert covered == list(range(batch))
    if shape.batch_rows is not None:
        assert all(rows.stop - rows.start <= shape.batch_rows for rows in grid.batch_row_tiles())
    levels = grid.target_levels()
    for samples, columns in levels:
        assert torch.equal(target[samples], columns) and columns.unique().numel() == columns.numel()
        assert torch.equal(columns, columns.sort().values)
    everyone = torch.cat([samples for samples, _ in levels]) if levels else torch.empty(0, dtype=torch.int64)
    assert torch.equal(everyone.sort().values, torch.nonzero(target >= 0)[:, 0])
    most = int(torch.bincount(target[target >= 0]).max()) if (target >= 0).any() else 0
    assert len(levels) == most, "one level per repetition of the most repeated class"
    covered = sorted(i for rows in grid.all_row_tiles() for i in range(rows.start, rows.stop))
    assert covered == list(range(batch))


def _block_tiles_worker(rank: int, world_size: int) -> dict:
    """One float64 step per logits mode and K with CUDA's tile shape, 7 columns wide."""
    tiles.TileShape.for_device = classmethod(lambda cls, device: cls(None, 7))
    classes, sizes = 9 * world_size - 1, (130, 70)
    weight = random_weight(classes, WIDTH, 3)
    embeddings, labels = random_batch(classes, WIDTH, sum(sizes), 3, weight=weight)
    out = {}
    for logits in ("store", "recompute"):
        for chunks in (1, 3):
            head = ClassParallelFC(classes, WIDTH, margin=MARGIN, logits=logits,
                                   communication={"chunks": chunks}).double()
            with torch.no_grad():
                head.weight.copy_(weight[head.class_start: head.class_start + head.num_local])
            local = embeddings[rank_rows(sizes, rank)].clone().requires_grad_()
            loss = head(local, labels[rank_rows(sizes, rank)])
            loss.backward()
            out[logits, chunks] = (loss.detach(), local.grad, head.weight.grad)
    return out


def test_block_tiles_equal_the_float64_reference_on_two_ranks():
    results = run_distributed(_block_tiles_worker, 2, timeout=120.0)
    classes, sizes = 17, (130, 70)
    weight = random_weight(classes, WIDTH, 3)
    embeddings, labels = random_batch(classes, WIDTH, sum(sizes), 3, weight=weight)
    loss, grad_embeddings, grad_weight = reference_grads(embeddings, labels, weight, MARGIN)
    for rank, result in enumerate(results):
        start, count = shard_range(classes, 2, rank)
        for (logits, chunks), (got_loss, got_embeddings, got_weight) in result.items():
            where = f"rank {rank}, {logits}, {chunks} chunks"
            assert_close(got_loss, loss, rtol=1e-12, atol=1e-12, msg=where)
            assert_close(got_embeddings, 2 * grad_embeddings[rank_rows(sizes, rank)], rtol=1e-10, atol=1e-12, msg=where)
            assert_close(got_weight, grad_weight[start: start + count], rtol=1e-10, atol=1e-12, msg=where)
