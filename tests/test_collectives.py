"""The autograd collectives of ``hybridfc.parallel``: uneven all-gather, its backward, and helpers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc.parallel import all_gather_vector, gather_padded, reduce_scatter_padded, scale_gradient
from reference import rank_rows

WIDTH = 5
TIMEOUT = 120.0


def layouts(world_size: int) -> dict[str, list[int]]:
    """Row counts per rank: even, and uneven with empty ranks (first, middle or last)."""
    return {"even": [2] * world_size, "first_empty": [0, 3, 0, 4][:world_size],
            "last_empty": [3, 1, 4][: world_size - 1] + [0]}


def rows_of(rank: int, sizes, seed: int) -> torch.Tensor:
    """Rank ``rank``'s fresh random rows ``(sizes[rank], d)``, known to every process."""
    generator = torch.Generator().manual_seed(100 * seed + rank)
    return torch.randn(sizes[rank], WIDTH, generator=generator, dtype=torch.float64)


def upstream(rank: int, total: int, seed: int) -> torch.Tensor:
    """The gradient ``(B, d)`` that rank ``rank`` sends back into the gathered rows."""
    generator = torch.Generator().manual_seed(100 * seed + 50 + rank)
    return torch.randn(total, WIDTH, generator=generator, dtype=torch.float64)


def _collectives_worker(rank: int, world_size: int) -> dict:
    out = {"vector": all_gather_vector(torch.tensor([rank, 10 * rank + 1, -rank]))}
    for seed, (layout, sizes) in enumerate(layouts(world_size).items()):
        for same_loss in (True, False):
            gathered = gather_padded(rows_of(rank, sizes, seed), sizes)
            grad = reduce_scatter_padded(upstream(0 if same_loss else rank, sum(sizes), seed), sizes)
            out[layout, same_loss] = {"gathered": gathered, "grad": grad}
        labels = torch.arange(sizes[rank]) + 1000 * rank
        out[layout, "labels"] = gather_padded(labels, sizes)
    return out


@pytest.fixture(scope="module", params=(2, 3, 4), ids=lambda n: f"world{n}")
def run(request):
    """``(world_size, [what each rank returned])``, one spawn per world size."""
    return request.param, run_distributed(_collectives_worker, request.param, timeout=TIMEOUT)


def test_all_gather_vector_stacks_one_row_per_rank(run):
    world_size, results = run
    expected = torch.tensor([[r, 10 * r + 1, -r] for r in range(world_size)])
    for result in results:
        assert torch.equal(result["vector"], expected)


@pytest.mark.parametrize("layout", ["even", "first_empty", "last_empty"])
def test_gather_padded_is_the_concatenation_in_rank_order(run, layout):
    """Uneven counts, empty ranks included: every rank gets all rows, unpadded, in rank order."""
    world_size, results = run
    sizes = layouts(world_size)[layout]
    seed = list(layouts(world_size)).index(layout)
    expected = torch.cat([rows_of(r, sizes, seed) for r in range(world_size)])
    expected_labels = torch.cat([torch.arange(n) + 1000 * r for r, n in enumerate(sizes)])
    for result in results:
        assert torch.equal(result[layout, True]["gathered"], expected)
        assert torch.equal(result[layout, "labels"], expected_labels)


@pytest.mark.parametrize("layout", ["even", "first_empty", "last_empty"])
def test_reduce_scatter_padded_sums_every_ranks_gradient_of_my_rows(run, layout):
    """With upstream gradient G_q on rank q, rank r's rows get Σ_q G_q[rows of r]; when every
    rank runs the same loss (G_q = G) that is world_size · G[rows of r]."""
    world_size, results = run
    sizes = layouts(world_size)[layout]
    seed = list(layouts(world_size)).index(layout)
    for rank, result in enumerate(results):
        rows = rank_rows(sizes, rank)
        same = upstream(0, sum(sizes), seed)[rows]
        summed = sum(upstream(q, sum(sizes), seed)[rows] for q in range(world_size))
        assert_close(result[layout, True]["grad"], world_size * same, rtol=1e-14, atol=1e-14)
        assert_close(result[layout, False]["grad"], summed, rtol=1e-14, atol=1e-14)
        if rows.stop > rows.start:
            assert not torch.allclose(summed, upstream(rank, sum(sizes), seed)[rows])


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for factor in (2.5, 1.0, -0.5):
        x.grad = None
        y = scale_gradient(x, factor)
        assert torch.equal(y, x)
        (y * g).sum().backward()
        assert_close(x.grad, factor * g, rtol=0, atol=0)


def test_single_process_collectives_without_torch_distributed():
    """Without a process group: gather is the identity, the vector gets a leading 1 (a copy)."""
    assert not dist.is_initialized()
    x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gather_padded(x, [3]), x)
    values = torch.tensor([4, 5])
    stacked = all_gather_vector(values)
    values[0] = 9
    assert torch.equal(stacked, torch.tensor([[4, 5]]))
