"""The pipelined head step: K chunks change when the exchanges happen, never what is computed.

For every selection and margin, both logits modes (``store``, ``recompute``), on 1–4 ranks with
uneven local batches (an empty rank, ranks with fewer rows than K), the loss, the embedding
gradient and the weight gradient of K = 2, 3, 4 equal those of K = 1: within 1e-12 in float64,
and bit for bit in fp32 on 2 ranks. K = 4 equals the float64 single-process reference under
``full``, and the two modes agree (1e-12 in float64, fp32 rounding in fp32). The ranks use logits
tiles a few columns wide, so that every shard spans several.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc import ClassParallelFC, ConfigError
from hybridfc.config import parse_hybridfc_section
from hybridfc.runtime.initialize import check_chunks
from hybridfc.parallel import ChunkLayout
from hybridfc.parallel.groups import shard_range
from reference import random_batch, random_weight, rank_rows, reference_grads, use_small_tiles

TIMEOUT = 240.0
WIDTH = 6
CHUNKS = (1, 2, 3, 4)
LOGITS = ("store", "recompute")
MARGINS = {"softmax": {"type": "softmax"},
           "cosface": {"type": "cosface", "scale": 8.0, "margin": 0.2},
           "arcface": {"type": "arcface", "scale": 8.0, "margin": 0.3},
           "combined": {"type": "combined", "scale": 8.0, "m1": 1.0, "m2": 0.3, "m3": 0.1}}
SELECTIONS = {"full": {"type": "full"},
              "partial": {"type": "partial", "budget": 0.6},
              "knn": {"type": "knn", "budget": 0.6, "k": 3, "rebuild_interval": 0, "index": "exact"},
              "hf": {"type": "hf", "budget": 0.6, "k": 3, "rebuild_interval": 0, "index": "exact"}}


def sizes_of(world_size: int) -> tuple[int, ...]:
    """Uneven local batches of several tiles (64 rows) and a short one: an empty rank, and ranks
    with fewer tiles than K, when there are several ranks."""
    return (300, 0, 70, 130)[:world_size] if world_size > 1 else (300,)


def step(rank: int, world_size: int, selection: str, margin: str, chunks: int, dtype: torch.dtype,
         logits: str) -> dict:
    """One forward and backward of a fresh head on fresh inputs (the same for every K)."""
    classes, sizes = 9 * world_size - 1, sizes_of(world_size)
    seed = 31 * list(SELECTIONS).index(selection) + list(MARGINS).index(margin)
    weight = random_weight(classes, WIDTH, seed)
    embeddings, labels = random_batch(classes, WIDTH, sum(sizes), seed, weight=weight)
    head = ClassParallelFC(classes, WIDTH, margin=MARGINS[margin], seed=1, selection=SELECTIONS[selection],
                           communication={"chunks": chunks}, logits=logits).to(dtype)
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start: head.class_start + head.num_local])
    local = embeddings[rank_rows(sizes, rank)].to(dtype).requires_grad_()
    loss = head(local, labels[rank_rows(sizes, rank)])
    loss.backward()
    rows, grad = head.gradient()
    return {"loss": loss.detach(), "embedding_grad": local.grad, "rows": rows, "weight_grad": grad}


def _chunks_worker(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    use_small_tiles()
    return {(selection, margin, chunks, logits): step(rank, world_size, selection, margin, chunks, dtype, logits)
            for selection in SELECTIONS for margin in MARGINS for chunks in CHUNKS for logits in LOGITS}


@pytest.fixture(scope="module", params=(1, 2, 3, 4), ids=lambda n: f"world{n}")
def float64_run(request):
    return request.param, run_distributed(_chunks_worker, request.param, args=(torch.float64,), timeout=TIMEOUT)


def _assert_same(a: dict, b: dict, what: str, exact: bool, tolerance: "dict | None" = None) -> None:
    tolerance = tolerance or (dict(rtol=0, atol=0) if exact else dict(rtol=1e-12, atol=1e-12))
    assert (a["rows"] is None) == (b["rows"] is None) and (a["rows"] is None or torch.equal(a["rows"], b["rows"]))
    for key in ("loss", "embedding_grad", "weight_grad"):
        assert_close(a[key], b[key], **tolerance, msg=lambda m: f"{what}, {key}: {m}")


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_every_chunk_count_computes_the_same_in_float64(float64_run, selection):
    world_size, results = float64_run
    for rank, result in enumerate(results):
        for margin in MARGINS:
            for logits in LOGITS:
                for chunks in CHUNKS[1:]:
                    _assert_same(result[selection, margin, chunks, logits], result[selection, margin, 1, logits],
                                 f"rank {rank}, {selection}, {margin}, {logits}, {chunks} chunks", exact=False)


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_store_and_recompute_compute_the_same_in_float64(float64_run, selection):
    world_size, results = float64_run
    for rank, result in enumerate(results):
        for margin in MARGINS:
            for chunks in CHUNKS:
                _assert_same(result[selection, margin, chunks, "recompute"], result[selection, margin, chunks, "store"],
                             f"rank {rank}, {selection}, {margin}, {chunks} chunks", exact=False)


def test_four_chunks_equal_the_single_process_reference(float64_run):
    world_size, results = float64_run
    classes, sizes = 9 * world_size - 1, sizes_of(world_size)
    for margin_name, margin in MARGINS.items():
        seed = list(MARGINS).index(margin_name)
        weight = random_weight(classes, WIDTH, seed)
        embeddings, labels = random_batch(classes, WIDTH, sum(sizes), seed, weight=weight)
        loss, grad_embeddings, grad_weight = reference_grads(embeddings, labels, weight, margin)
        for rank, result in enumerate(results):
            start, count = shard_range(classes, world_size, rank)
            for logits in LOGITS:
                mine, where = result["full", margin_name, 4, logits], f"{margin_name}, {logits}, rank {rank}"
                assert_close(mine["loss"], loss, rtol=1e-12, atol=1e-12, msg=where)
                assert_close(mine["weight_grad"], grad_weight[start: start + count], rtol=1e-10, atol=1e-12, msg=where)
                assert_close(mine["embedding_grad"], world_size * grad_embeddings[rank_rows(sizes, rank)],
                             rtol=1e-10, atol=1e-12, msg=where)


@pytest.fixture(scope="module")
def fp32_run():
    return run_distributed(_chunks_worker, 2, args=(torch.float32,), timeout=TIMEOUT)


def test_every_chunk_count_is_bitwise_equal_in_fp32_on_two_ranks(fp32_run):
    for rank, result in enumerate(fp32_run):
        for selection in SELECTIONS:
            for margin in MARGINS:
                for logits in LOGITS:
                    for chunks in CHUNKS[1:]:
                        _assert_same(result[selection, margin, chunks, logits], result[selection, margin, 1, logits],
                                     f"rank {rank}, {selection}, {margin}, {logits}, {chunks} chunks", exact=True)


def test_store_and_recompute_agree_to_fp32_rounding(fp32_run):
    for rank, result in enumerate(fp32_run):
        for selection in SELECTIONS:
            for margin in MARGINS:
                _assert_same(result[selection, margin, 1, "recompute"], result[selection, margin, 1, "store"],
                             f"rank {rank}, {selection}, {margin}", exact=False, tolerance=dict(rtol=2e-5, atol=2e-6))


def test_chunks_take_whole_tiles_and_cover_every_row_once():
    layout = ChunkLayout.of([300, 0, 70, 130], chunks=4)
    covered = sorted(row for chunk in range(4) for start, end in layout.blocks(chunk) for row in range(start, end))
    assert covered == list(range(500))
    assert [layout.chunk_sizes(j) for j in range(4)] == [[64, 0, 0, 0], [64, 0, 64, 64], [64, 0, 0, 64],
                                                          [108, 0, 6, 2]]
    assert ChunkLayout.of([100, 20], chunks=4).chunks == 2, "no more chunks than the most tiles of a rank"
    assert ChunkLayout.of([3], chunks=8).chunks == 1, "a local batch smaller than K: one chunk"


@pytest.mark.parametrize("chunks", [0, -2])
def test_chunks_below_one_is_an_error_naming_the_key(chunks):
    with pytest.raises(ConfigError, match=r"hybridfc\.communication\.chunks: must be >= 1"):
        parse_hybridfc_section({"num_classes": 10, "embedding_size": 4, "communication": {"chunks": chunks}})
    with pytest.raises(ConfigError, match=r"communication\.chunks: must be >= 1"):
        ClassParallelFC(10, 4, communication={"chunks": chunks})


def test_chunks_above_the_micro_batch_is_an_error_naming_the_key():
    cfg = parse_hybridfc_section({"num_classes": 10, "embedding_size": 4, "communication": {"chunks": 9}})
    with pytest.raises(ConfigError, match=r"hybridfc\.communication\.chunks: 9 chunks .* 8 samples .*"
                                          r"train_micro_batch_size_per_gpu"):
        check_chunks(cfg.communication.chunks, micro_batch=8)
    check_chunks(cfg.communication.chunks, micro_batch=9)
