"""Distributed top-k over a class-sharded head equals a single-process top-k over the whole W."""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from hybridfc import ClassParallelFC
from hybridfc.eval import distributed_topk, topk_accuracy

CLASSES, WIDTH, SIZES = 23, 6, {1: [9], 2: [5, 0], 3: [4, 7, 1]}


def _inputs(world_size: int):
    generator = torch.Generator().manual_seed(100 + world_size)
    total = sum(SIZES[world_size])
    embeddings = torch.randn(total, WIDTH, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (total,), generator=generator)
    return embeddings, labels


def _worker(rank: int, world_size: int):
    embeddings, labels = _inputs(world_size)
    head = ClassParallelFC(CLASSES, WIDTH, margin={"type": "cosface", "scale": 30.0, "margin": 0.3}, seed=5).double()
    start = sum(SIZES[world_size][:rank])
    mine = slice(start, start + SIZES[world_size][rank])
    top5 = distributed_topk(head, embeddings[mine], k=5)
    accuracy = topk_accuracy(head, embeddings[mine], labels[mine], ks=(1, 5))
    return top5, accuracy, head.weight.detach()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_distributed_topk_matches_single_process(world_size):
    results = run_distributed(_worker, world_size)
    embeddings, labels = _inputs(world_size)
    weight = torch.cat([w for _, _, w in results])
    scores = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
    expected = scores.topk(5, dim=1).indices
    assert torch.equal(torch.cat([top5 for top5, _, _ in results]), expected)
    for k in (1, 5):
        single = (expected[:, :k] == labels[:, None]).any(1).double().mean().item()
        assert all(acc[k] == pytest.approx(single) for _, acc, _ in results)


def test_topk_larger_than_class_count_is_an_error():
    head = ClassParallelFC(4, 3)
    with pytest.raises(ValueError, match="top-5 asked of a head with 4 classes"):
        distributed_topk(head, torch.randn(2, 3), k=5)
