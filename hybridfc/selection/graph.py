"""The class-to-class K-nearest-neighbour graph over all classes, sharded by owner.

Rank r of N holds the ``(C_r, d)`` L2-normalised rows of its shard (global ids ``class_start``
onwards, :func:`~hybridfc.parallel.groups.shard_range`) and gets back the ``(C_r, k)`` global ids
of each of its classes' ``k`` nearest classes by cosine, over every shard, nearest first and
never the class itself. No rank ever holds more than two shards' worth of rows:

1. every rank builds a :class:`~hybridfc.selection.index.ShardIndex` over its own rows;
2. the rows also serve as queries, padded to the largest shard, ``(P, d)`` with
   ``P = ceil(C / N)``, and travel around the ring with their running top ``k + 1``
   (``(P, k + 1)`` scores and global ids). At hop h rank r holds the queries of rank
   ``(r - h) mod N``, searches its own index for their ``k + 1`` nearest rows, turns the rows
   into global ids and merges them into the running lists. Hop 0 is a rank's own queries on
   its own index; between hops every rank sends what it holds to rank ``r + 1``;
3. after N hops rank r holds the finished lists of rank ``r + 1``, and one more shift (of the
   lists, not the queries) brings every rank its own;
4. each list drops the class itself (or, where the class is not in it, its last entry).

An approximate index first measures itself (:meth:`ShardIndex.widen_to_recall`) on the same
:data:`~hybridfc.selection.index.RECALL_QUERIES` rows on every rank, drawn evenly from all shards
(one all-gather): recall@k of each shard's search against an exhaustive one. With
``min_recall`` each rank widens its search until its shard reaches it.

Per rank this is N index searches of ``P`` queries and ``N`` ring shifts of ``P·(d + 3(k + 1))``
words, point to point on ``group``. The build is written as steps (:func:`knn_graph_steps`): the
computing between exchanges can run on a background thread while every exchange runs on the
training thread (:mod:`hybridfc.selection.rebuild`). Lists merge by score with ties going to the smaller global
id, so a graph depends only on the rows, the index kind and the seed.
"""

from __future__ import annotations

from typing import Optional

import torch

from hybridfc.parallel.collectives import all_gather, ring_shift
from hybridfc.parallel.groups import ProcessGroup, collective_device, group_rank, group_size, shard_range
from hybridfc.selection.build_steps import BuildSteps, Exchange, run_inline
from hybridfc.selection.exact import exact_search
from hybridfc.selection.index import (GRAPH_EXACT_MAX_ROWS, RECALL_QUERIES, ShardIndex, choose_index_kind,
                                      drop_own_rows, log_recall)


def build_knn_graph(centres: torch.Tensor, class_start: int, num_classes: int, k: int,
                    group: ProcessGroup = None, kind: str = "exact", seed: int = 0,
                    min_recall: Optional[float] = None) -> torch.Tensor:
    """This rank's rows of the K-nearest-neighbour graph over the normalised centres of all classes.

    ``centres``: ``(C_r, d)`` this rank's L2-normalised fp32 rows, global ids ``class_start`` to
    ``class_start + C_r - 1``. Returns ``(C_r, k)`` int64 global ids, nearest first by cosine,
    never the class itself; neighbours may live in any shard. An approximate ``kind`` may leave
    -1 where it found fewer than ``k`` neighbours, and widens its search until its measured
    recall reaches ``min_recall`` (see the module docstring). Collective over ``group``
    (``None``: the default group; without ``torch.distributed`` a world of one): the
    exchanges of :func:`knn_graph_steps`, run as they come.
    """
    return run_inline(knn_graph_steps(centres, class_start, num_classes, k, group, kind, seed, min_recall))


def knn_graph_steps(centres: torch.Tensor, class_start: int, num_classes: int, k: int,
                    group: ProcessGroup = None, kind: str = "exact", seed: int = 0,
                    min_recall: Optional[float] = None) -> BuildSteps:
    """:func:`build_knn_graph` as build steps: the computing is done here, each exchange with the
    other ranks is yielded (an :data:`~hybridfc.selection.rebuild.Exchange`) for the caller to
    run, and its result is sent back in. A background rebuild runs the computing on its own thread
    and the exchanges on the training thread."""
    if not 1 <= k <= num_classes - 1:
        raise ValueError(f"k={k} neighbours must be between 1 and num_classes - 1 = {num_classes - 1} "
                         f"(num_classes={num_classes})")
    world_size, rank = group_size(group), group_rank(group)
    sizes = [shard_range(num_classes, world_size, r)[1] for r in range(world_size)]
    if centres.dim() != 2 or centres.shape[0] != sizes[rank]:
        raise ValueError(f"centres must be ({sizes[rank]}, d) on rank {rank} of {world_size} for "
                         f"{num_classes} classes, got shape {tuple(centres.shape)}")
    centres = centres.detach().float()
    kind = choose_index_kind(max(sizes), kind, GRAPH_EXACT_MAX_ROWS)   # one kind on every rank
    index = ShardIndex(centres, kind, seed)
    if kind != "exact":
        recall, sampled = yield from fit_shard_search_steps(index, centres, num_classes, k, group, seed, min_recall)
        log_recall("knn graph", index, k, recall, sampled, min_recall)

    queries = centres.new_zeros(max(sizes), centres.shape[1])
    queries[: sizes[rank]] = centres
    scores = centres.new_full((max(sizes), k + 1), -torch.inf)
    ids = torch.full_like(scores, -1, dtype=torch.int64)
    for hop in range(world_size):
        if hop:
            queries, scores, ids = yield _shift([queries, scores, ids], group)
        count = sizes[(rank - hop) % world_size]
        scores[:count], ids[:count] = _search_and_merge(index, queries[:count], class_start,
                                                        scores[:count], ids[:count])
    if world_size > 1:
        scores, ids = yield _shift([scores, ids], group)
    own = torch.arange(class_start, class_start + sizes[rank], device=ids.device)
    return drop_own_rows(ids[: sizes[rank]], own, k)


def _shift(tensors: list[torch.Tensor], group: ProcessGroup) -> Exchange:
    """The ring shift of ``tensors``, sent from the group's device (NCCL moves only CUDA tensors)
    and handed back where they were."""
    device = collective_device(group)
    return lambda: [received.to(t.device) for received, t in
                    zip(ring_shift([t.to(device) for t in tensors], group), tensors)]


def _gathered(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """:func:`all_gather` of ``tensor`` from the group's device, handed back where it was."""
    return all_gather(tensor.to(collective_device(group)), group).to(tensor.device)


def fit_shard_search(index: ShardIndex, centres: torch.Tensor, num_classes: int, k: int,
                     group: ProcessGroup = None, seed: int = 0,
                     min_recall: Optional[float] = None) -> tuple[float, int]:
    """Measure this rank's shard index, and with ``min_recall`` widen its search, on the same
    sampled classes on every rank (an equal seeded share of
    :data:`~hybridfc.selection.index.RECALL_QUERIES` from each shard, all-gathered over
    ``group``): :meth:`ShardIndex.widen_to_recall`. Returns the shard's recall@k and the number
    of sampled classes. ``centres``: ``(C_r, d)``, the rows the index was built from."""
    return run_inline(fit_shard_search_steps(index, centres, num_classes, k, group, seed, min_recall))


def fit_shard_search_steps(index: ShardIndex, centres: torch.Tensor, num_classes: int, k: int,
                           group: ProcessGroup = None, seed: int = 0,
                           min_recall: Optional[float] = None) -> BuildSteps:
    """:func:`fit_shard_search` as build steps (see :func:`knn_graph_steps`)."""
    world_size, rank = group_size(group), group_rank(group)
    sizes = [shard_range(num_classes, world_size, r)[1] for r in range(world_size)]
    share = min(-(-RECALL_QUERIES // world_size), min(sizes))
    generator = torch.Generator().manual_seed(seed * world_size + rank)
    local = torch.randperm(sizes[rank], generator=generator)[:share].sort().values
    queries, own = centres[local.to(centres.device)].float(), local
    if world_size > 1:
        queries, all_rows = yield lambda: (_gathered(queries, group), _gathered(local, group))
        own = torch.cat([rows if r == rank else torch.full_like(rows, -1)
                         for r, rows in enumerate(all_rows.view(world_size, -1))])
    return index.widen_to_recall(queries, own, k, min_recall), queries.shape[0]


def _search_and_merge(index: ShardIndex, queries: torch.Tensor, class_start: int,
                      scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the index's nearest rows for ``(q, d)`` queries into running ``(q, m)`` lists."""
    found_scores, rows = index.search(queries, ids.shape[1])
    found_ids = torch.where(rows >= 0, rows + class_start, rows)
    return _merge_lists(scores, ids, found_scores, found_ids)


def _merge_lists(scores_a: torch.Tensor, ids_a: torch.Tensor, scores_b: torch.Tensor,
                ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``m`` of two ``(q, m)`` lists of (score, id), best first, ties to the smaller id."""
    scores, ids = torch.cat([scores_a, scores_b], dim=1), torch.cat([ids_a, ids_b], dim=1)
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    best = scores.argsort(dim=1, descending=True, stable=True)[:, : ids_a.shape[1]]
    return scores.gather(1, best), ids.gather(1, best)


def exact_neighbours(queries: torch.Tensor, query_ids: torch.Tensor, centres: torch.Tensor,
                     k: int) -> torch.Tensor:
    """One process: the ``k`` nearest rows of ``(C, d)`` centres (id = row) of ``(q, d)`` queries.

    ``query_ids`` ``(q,)`` are the queries' own ids, never returned. Returns ``(q, k)`` int64,
    nearest first (-1 past the ``C - 1`` others). Scores are computed in the centres' dtype,
    in query blocks of at most about 64 MiB.
    """
    return exact_search(queries, centres, k, exclude=query_ids)[1]
