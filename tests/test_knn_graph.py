"""The shard index and the class-to-class KNN graph: exact results against a float64 brute force,
approximate (IVF, faiss HNSW) recall and determinism, on one process and over the ring."""

from __future__ import annotations

import logging
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from hybridfc.parallel.groups import shard_range
from hybridfc.selection import build_selection
from hybridfc.selection import exact as exact_module
from hybridfc.selection import ivf as ivf_module
from hybridfc.selection.base import Shard
from hybridfc.selection.graph import build_knn_graph, exact_neighbours
from hybridfc.selection.rebuild import build_now
from hybridfc.selection.index import (EXACT_MAX_ROWS, GRAPH_EXACT_MAX_ROWS, ShardIndex, choose_index_kind,
                                      recall_at_k)
from hybridfc.selection.ivf import InvertedFileIndex, nearest_centroid

EXACT_CASES = [(103, 5), (103, 102), (257, 5), (257, 256), (3, 2)]  # (num_classes, k)
ROWS, LATENT_DIM, DIM, K = 20_000, 8, 64, 32


def normalised(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def structured(seed: int) -> torch.Tensor:
    """``ROWS`` normalised centres of low intrinsic dimension, like trained class centres: a
    linear map of ``LATENT_DIM``-d Gaussian codes into ``DIM`` dimensions, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(ROWS, LATENT_DIM, generator=generator)
    mixing = torch.randn(LATENT_DIM, DIM, generator=generator)
    noise = 0.5 * torch.randn(ROWS, DIM, generator=generator)
    return F.normalize(codes @ mixing + noise, dim=1)


def brute_force(centres: torch.Tensor, k: int) -> torch.Tensor:
    """Float64 ``(C, k)`` nearest other rows of every row."""
    scores = centres.double() @ centres.double().t()
    scores.fill_diagonal_(-torch.inf)
    return scores.topk(k, dim=1).indices


def my_rows(centres: torch.Tensor, world_size: int, rank: int) -> tuple[int, torch.Tensor]:
    start, count = shard_range(centres.shape[0], world_size, rank)
    return start, centres[start: start + count]


def test_choose_index_kind():
    assert choose_index_kind(EXACT_MAX_ROWS) == "exact"
    assert choose_index_kind(EXACT_MAX_ROWS + 1) == "ivf"
    assert choose_index_kind(GRAPH_EXACT_MAX_ROWS, "auto", GRAPH_EXACT_MAX_ROWS) == "exact"
    assert choose_index_kind(10, "hnsw") == "hnsw"
    with pytest.raises(ValueError, match="'flat'"):
        choose_index_kind(10, "flat")


def test_exact_search_matches_float64_brute_force(monkeypatch):
    monkeypatch.setattr(exact_module, "_BLOCK_BYTES", 4096)  # many query blocks
    centres, queries = normalised(300, 16, seed=1), normalised(50, 16, seed=2)
    scores, rows = ShardIndex(centres).search(queries, 10)
    expected = (queries.double() @ centres.double().t()).topk(10, dim=1)
    assert rows.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.equal(rows, expected.indices)
    torch.testing.assert_close(scores.double(), expected.values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("probes", [1, 3, 25])
def test_ivf_finds_the_best_rows_of_the_lists_it_probes(monkeypatch, probes):
    """The IVF search returns exactly the float64 top-k over the rows of each query's ``probes``
    nearest lists (all 25: the exact top-k), in query blocks, and keeps its rows."""
    monkeypatch.setattr(ivf_module, "_QUERY_BLOCK", 64)
    centres, queries = normalised(3000, 16, seed=7), normalised(300, 16, seed=8)
    index = InvertedFileIndex(centres, num_lists=25, seed=0)
    scores, rows = index.search(queries, 10, num_probes=probes)
    probed = (queries @ index.centroids.t()).topk(probes, dim=1).indices
    in_probed = (nearest_centroid(centres, index.centroids).unsqueeze(0).unsqueeze(2) == probed.unsqueeze(1)).any(2)
    exact = (queries.double() @ centres.double().t()).masked_fill(~in_probed, -torch.inf).topk(10, dim=1)
    assert torch.equal(rows, exact.indices)
    torch.testing.assert_close(scores.double(), exact.values, atol=1e-6, rtol=0)
    assert torch.equal(index.rows(), centres)


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_search_pads_when_k_exceeds_rows(kind):
    centres = normalised(50, 8, seed=3)
    scores, rows = ShardIndex(centres, kind).search(centres[:4], 60)
    assert rows.shape == scores.shape == (4, 60)
    assert torch.equal(rows[:, 0], torch.arange(4))
    assert torch.equal(rows[:, :50].sort(dim=1).values, torch.arange(50).expand(4, 50))
    assert (rows[:, 50:] == -1).all() and (scores[:, 50:] == -torch.inf).all()


def test_empty_shard_finds_nothing():
    scores, rows = ShardIndex(torch.empty(0, 8), "ivf").search(normalised(3, 8, seed=4), 2)
    assert (rows == -1).all() and (scores == -torch.inf).all()


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        ShardIndex(normalised(100, 8, seed=5), "hnsw")
    assert len(ShardIndex(normalised(100, 8, seed=5), "exact")) == 100


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_index_built_and_searched_in_a_thread(kind):
    centres = normalised(2000, 16, seed=6)
    results = {}
    thread = threading.Thread(target=lambda: results.update(out=ShardIndex(centres, kind).search(centres, 8)))
    thread.start()
    thread.join()
    assert torch.equal(results["out"][1], ShardIndex(centres, kind).search(centres, 8)[1])


def test_graph_rejects_k_beyond_the_other_classes():
    with pytest.raises(ValueError, match=r"k=10.*9"):
        build_knn_graph(normalised(10, 4, seed=7), 0, 10, 10)
    with pytest.raises(ValueError, match="centres"):
        build_knn_graph(normalised(9, 4, seed=7), 0, 10, 3)


def exact_cases(rank: int, world_size: int) -> list[torch.Tensor]:
    graphs = []
    for seed, (num_classes, k) in enumerate(EXACT_CASES):
        start, rows = my_rows(normalised(num_classes, 16, seed=10 + seed), world_size, rank)
        graphs.append(build_knn_graph(rows, start, num_classes, k))
    return graphs


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_exact_graph_matches_float64_brute_force(world_size):
    if world_size == 1:
        per_rank = [exact_cases(0, 1)]  # torch.distributed not initialised
    else:
        per_rank = run_distributed(exact_cases, world_size)
    for seed, (num_classes, k) in enumerate(EXACT_CASES):
        graph = torch.cat([graphs[seed] for graphs in per_rank])
        assert graph.dtype == torch.int64
        assert torch.equal(graph, brute_force(normalised(num_classes, 16, seed=10 + seed), k))


def test_exact_neighbours_and_recall_at_k():
    angles = torch.tensor([0.0, 10.0, 25.0, 45.0, 90.0]).deg2rad()
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert exact_neighbours(points, torch.arange(5), points, 2).tolist() == [[1, 2], [0, 2], [1, 3], [2, 1], [3, 2]]
    assert exact_neighbours(points[:1], torch.tensor([3]), points, 5).tolist() == [[0, 1, 2, 4, -1]]
    exact = torch.tensor([[1, 2], [3, 4]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(torch.tensor([[2, 5], [-1, 0]]), exact) == 0.25


def approximate_graphs(rank: int, world_size: int, data_seed: int) -> dict[str, list[torch.Tensor]]:
    start, rows = my_rows(structured(data_seed), world_size, rank)
    num_classes = ROWS
    return {kind: [build_knn_graph(rows, start, num_classes, K, kind=kind, seed=3) for _ in range(2)]
            for kind in ("ivf", "hnsw")}


@pytest.mark.parametrize("world_size", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_approximate_graph_recall_and_determinism(world_size):
    data_seed = 20 + world_size
    if world_size == 1:
        per_rank = [approximate_graphs(0, 1, data_seed)]
    else:
        per_rank = run_distributed(approximate_graphs, world_size, args=(data_seed,))
    centres = structured(data_seed)
    exact = exact_neighbours(centres, torch.arange(centres.shape[0]), centres, K)
    for kind in ("ivf", "hnsw"):
        first, second = (torch.cat([graphs[kind][build] for graphs in per_rank]) for build in range(2))
        assert torch.equal(first, second), kind
        assert recall_at_k(first, exact) >= 0.9, kind
        assert (first != torch.arange(first.shape[0]).unsqueeze(1)).all()


def float64_recall(index: ShardIndex, centres: torch.Tensor, sample: torch.Tensor, k: int) -> float:
    """Recall@k of the index's search for the sampled rows (each left out of its own list)
    against a float64 brute force."""
    scores = centres[sample].double() @ centres.double().t()
    scores[torch.arange(sample.numel()), sample] = -torch.inf
    found = index.search(centres[sample], k + 1)[1]
    keep = found != sample.unsqueeze(1)
    keep[keep.all(dim=1), -1] = False
    return recall_at_k(found[keep].view(-1, k), scores.topk(k, dim=1).indices)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_widening_reaches_min_recall_on_isotropic_rows(kind):
    """Isotropic rows defeat an approximate index at its default breadth; widening brings the
    measured recall (equal to a float64 brute force's) to the target."""
    centres, sample, target = normalised(12_000, 128, seed=11), torch.arange(0, 12_000, 47), 0.97
    index = ShardIndex(centres, kind, seed=0)
    before = index.widen_to_recall(centres[sample], sample, K)
    assert before == pytest.approx(float64_recall(index, centres, sample, K), abs=1e-6)
    assert before < target
    breadth = index.describe(K)
    after = index.widen_to_recall(centres[sample], sample, K, min_recall=target)
    assert index.describe(K) != breadth
    assert after >= target
    assert after == pytest.approx(float64_recall(index, centres, sample, K), abs=1e-6)


def test_widening_stops_at_an_exhaustive_search():
    centres, sample = normalised(3000, 16, seed=12), torch.arange(0, 3000, 10)
    index = ShardIndex(centres, "ivf", seed=0)
    assert index.widen_to_recall(centres[sample], sample, 8, min_recall=1.0) == 1.0
    assert index.num_probes == index.num_lists
    assert ShardIndex(centres, "exact").widen_to_recall(centres[sample], sample, 8, min_recall=1.0) == 1.0


def widened_graphs(rank: int, world_size: int, num_classes: int) -> list[torch.Tensor]:
    start, rows = my_rows(normalised(num_classes, 128, seed=13), world_size, rank)
    return [build_knn_graph(rows, start, num_classes, K, kind="ivf", seed=1, min_recall=min_recall)
            for min_recall in (None, 0.95, 0.95)]


@pytest.mark.parametrize("world_size", [1, 3])
def test_graph_with_min_recall_reaches_it_on_isotropic_centres(world_size):
    """Every shard widens its search on the same sample of classes from all shards: the whole
    graph's recall goes from far below to at least the target, and builds repeat exactly."""
    num_classes = 10_001
    if world_size == 1:
        per_rank = [widened_graphs(0, 1, num_classes)]
    else:
        per_rank = run_distributed(widened_graphs, world_size, args=(num_classes,))
    default, first, second = (torch.cat([graphs[i] for graphs in per_rank]) for i in range(3))
    centres = normalised(num_classes, 128, seed=13)
    exact = exact_neighbours(centres, torch.arange(num_classes), centres, K)
    assert recall_at_k(default, exact) < 0.9
    assert recall_at_k(first, exact) >= 0.93
    assert torch.equal(first, second)


@pytest.mark.parametrize("type_", ["knn", "hf"])
def test_selection_passes_min_recall_and_logs_the_measured_recall(caplog, type_):
    """A knn or hf selection with an approximate index logs its recall@k at the build, widened
    to its ``min_recall``; without one it logs the default breadth's and how to widen it."""
    rows, k = normalised(6000, 128, seed=14), 16
    lines = {}
    for min_recall in (None, 0.98):
        spec = {"type": type_, "k": k, "index": "ivf", "rebuild_interval": 0, "min_recall": min_recall}
        selection = build_selection(spec, Shard(num_classes=6000, class_start=0, num_local=6000, rank=0, world_size=1))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hybridfc"):
            build_now(selection._build, rows)
        lines[min_recall] = [r.getMessage() for r in caplog.records if "recall@" in r.getMessage()]
    name = "knn graph" if type_ == "knn" else "hf index"
    assert len(lines[None]) == len(lines[0.98]) == 1
    assert f"{name}: ivf, nprobe 32 of 77 lists, recall@{k} " in lines[None][0]
    assert "selection.min_recall widens the search" in lines[None][0]
    recall = float(lines[0.98][0].split(f"recall@{k} ")[1].split()[0])
    assert recall >= 0.98 and "(min_recall 0.98)" in lines[0.98][0]
    assert "nprobe 32 of" not in lines[0.98][0]
