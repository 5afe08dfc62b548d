"""Top-k classification over a class-sharded head, without gathering the weight.

Each rank scores the gathered features against its own rows, keeps its k best per sample,
and the ranks merge those candidates: one all-gather of ``(B, k)`` scores and ids instead of
the ``(C, d)`` weight.

>>> accuracy = topk_accuracy(head, embeddings, labels, ks=(1, 5))    # {1: 0.93, 5: 0.99}
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.log import log_dist
from hybridfc.parallel.collectives import all_gather_vector, all_reduce, gather_padded

_ROWS_PER_CHUNK = 1024


def _local_topk(head: ClassParallelFC, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's k best ``(scores, global class ids)`` for each row, ``(B, k)`` each."""
    k = min(k, head.num_local)
    scores, ids = [], []
    for chunk in features.split(_ROWS_PER_CHUNK):
        best = head.local_scores(chunk).topk(k, dim=1)
        scores.append(best.values)
        ids.append(best.indices + head.class_start)
    return torch.cat(scores), torch.cat(ids)


@torch.no_grad()
def distributed_topk(head: ClassParallelFC, embeddings: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Global class ids of the k highest scores for this rank's ``embeddings (b, d)``: ``(b, k)``.

    Scores are those of :meth:`ClassParallelFC.local_scores` (cosine for angular margins).
    Every rank of the head's group must call it (with any local batch size, 0 included).
    """
    group, world_size = head.group, head.world_size
    if k > head.num_classes:
        raise ValueError(f"hybridfc: top-{k} asked of a head with {head.num_classes} classes")
    sizes = all_gather_vector(torch.tensor([embeddings.shape[0]], device=head.weight.device), group)
    sizes = sizes.squeeze(1).tolist()
    features = gather_padded(embeddings.to(head.weight.device), sizes, group)
    scores, ids = _local_topk(head, features, k)
    k_local, batch = scores.shape[1], features.shape[0]
    candidates = torch.cat([scores.double(), ids.double()], dim=1)
    merged = gather_padded(candidates, [batch] * world_size, group).view(world_size, batch, 2 * k_local)
    all_scores = merged[..., :k_local].permute(1, 0, 2).reshape(batch, -1)
    all_ids = merged[..., k_local:].permute(1, 0, 2).reshape(batch, -1).long()
    best = all_scores.topk(k, dim=1).indices
    mine = sum(sizes[: head.rank])
    return all_ids.gather(1, best)[mine : mine + embeddings.shape[0]]


@torch.no_grad()
def topk_correct(head: ClassParallelFC, embeddings: torch.Tensor, labels: torch.Tensor,
                 ks: Sequence[int] = (1,)) -> torch.Tensor:
    """``[samples, correct@k for k in ks]`` summed over every rank, float64 ``(1 + len(ks),)``."""
    predictions = distributed_topk(head, embeddings, max(ks))
    labels = labels.to(predictions.device).view(-1, 1)
    hits = [float((predictions[:, :k] == labels).any(1).sum()) for k in ks]
    counts = torch.tensor([float(labels.shape[0])] + hits, dtype=torch.float64, device=head.weight.device)
    return all_reduce(counts, "sum", head.group)


def accuracies(counts: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """``{k: fraction correct}`` from :func:`topk_correct`'s counts (possibly summed over batches)."""
    total = max(float(counts[0]), 1.0)
    return {k: float(counts[i + 1]) / total for i, k in enumerate(ks)}


@torch.no_grad()
def topk_accuracy(head: ClassParallelFC, embeddings: torch.Tensor, labels: torch.Tensor,
                  ks: Sequence[int] = (1,)) -> dict[int, float]:
    """Top-k accuracy over the samples of every rank: ``{k: fraction correct}``."""
    return accuracies(topk_correct(head, embeddings, labels, ks), ks)


@torch.no_grad()
def held_out_accuracy(head: ClassParallelFC, embed: Callable[[torch.Tensor], torch.Tensor], loader: Iterable,
                      ks: Sequence[int], when: str) -> dict[int, float]:
    """Top-k accuracy ``{k: fraction}`` of ``head`` on ``embed(x)`` over every ``(x, y)`` of this
    rank's ``loader`` and the other ranks' (their counts summed), logged as of ``when``."""
    counts = torch.zeros(1 + len(ks), dtype=torch.float64, device=head.weight.device)
    for inputs, labels in loader:
        counts += topk_correct(head, embed(inputs), labels, ks)
    result = accuracies(counts, ks)
    summary = ", ".join(f"top-{k} {acc:.4f}" for k, acc in result.items())
    log_dist(f"{when}: held-out {summary} on {int(counts[0])} samples")
    return result
