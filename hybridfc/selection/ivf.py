"""An inverted-file (IVF) index over normalised rows, searched list by list with matmuls.

The rows are grouped by their nearest of ``nlist`` centroids (spherical k-means on a seeded
sample); a query scans the lists of its ``nprobe`` nearest centroids. A query-at-a-time scan
(faiss's ``IndexIVFFlat``) reads every probed list from memory once per query, which at a few
hundred thousand rows per shard makes it memory-bound and little faster than exact search.
Here a block of queries is turned around: for each list, the queries of the block that probe it
are scored against it in one ``(m_l, d) @ (d, n_l)`` matmul, so each list is read once per
block and the arithmetic runs at matmul speed. A first pass over each query's nearest list
gives its best ``k`` so far; in the second pass over its other lists only scores reaching the
k-th of those are kept, which spares a top-k per (query, list) pair (on CPU it costs five times
the matmul). A search that probes every list is one blockwise matmul and top-k over all rows.

>>> index = InvertedFileIndex(rows, num_lists=ivf_lists(len(rows)), seed=0)   # rows (n, d)
>>> scores, ids = index.search(queries, k=32, num_probes=32)                  # (q, k) each

Builds are deterministic for a seed (k-means runs in torch), and searches change no state, so
an index may be built in one thread and searched from several.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybridfc.selection.exact import exact_search

_QUERY_BLOCK = 16384
_KMEANS_ITERATIONS = 20
_MIN_POINTS_PER_LIST = 39
_TRAINING_POINTS_PER_LIST = 64


def ivf_lists(num_rows: int) -> int:
    """Inverted lists for ``num_rows`` rows: ``sqrt(n)``, at most ``n // 39``, at least 1."""
    return max(1, min(round(math.sqrt(num_rows)), num_rows // _MIN_POINTS_PER_LIST))


def ivf_probes(num_lists: int) -> int:
    """Lists scanned per query: ``max(32, nlist // 16)``, at most ``nlist``."""
    return min(num_lists, max(32, num_lists // 16))


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor, block_rows: int = 65536) -> torch.Tensor:
    """``(n,)`` index of the centroid of largest inner product with each of ``(n, d)`` points."""
    nearest = [(block @ centroids.t()).argmax(dim=1) for block in points.split(block_rows)]
    return torch.cat(nearest) if nearest else torch.empty(0, dtype=torch.int64)


def spherical_kmeans(points: torch.Tensor, num_centroids: int, generator: torch.Generator,
                     iterations: int = _KMEANS_ITERATIONS) -> torch.Tensor:
    """``(num_centroids, d)`` unit centroids of ``(n, d)`` unit points (n ≥ num_centroids), from
    distinct seeded points; a centroid left without points keeps its place."""
    centroids = points[torch.randperm(len(points), generator=generator)[:num_centroids]].clone()
    for _ in range(iterations):
        assignment = nearest_centroid(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        filled = torch.bincount(assignment, minlength=num_centroids) > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)
    return centroids


class InvertedFileIndex:
    """IVF over ``(n, d)`` L2-normalised fp32 rows by inner product (see the module docstring)."""

    def __init__(self, rows: torch.Tensor, num_lists: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        rows = rows.detach().float()
        sample = torch.randperm(len(rows), generator=generator)[: _TRAINING_POINTS_PER_LIST * num_lists]
        self.centroids = spherical_kmeans(rows[sample.sort().values], num_lists, generator)
        assignment = nearest_centroid(rows, self.centroids)
        self.row_ids = torch.argsort(assignment, stable=True)
        self.sorted_rows = rows[self.row_ids]
        counts = torch.bincount(assignment, minlength=num_lists)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()

    @property
    def num_lists(self) -> int:
        return self.centroids.shape[0]

    def rows(self) -> torch.Tensor:
        """The ``(n, d)`` rows in their original order."""
        out = torch.empty_like(self.sorted_rows)
        out[self.row_ids] = self.sorted_rows
        return out

    def search(self, queries: torch.Tensor, k: int, num_probes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, d)`` queries -> ``(q, k)`` scores and int64 row ids, best first; -inf / -1 where
        the probed lists hold fewer than ``k`` rows."""
        probes = min(num_probes, self.num_lists)
        queries = queries.float()
        if probes == self.num_lists:
            return self._search_all(queries, k)
        found_scores = queries.new_full((queries.shape[0], k), -torch.inf)
        found_ids = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
        for begin in range(0, queries.shape[0], _QUERY_BLOCK):
            block = slice(begin, begin + _QUERY_BLOCK)
            found_scores[block], found_ids[block] = self._search_block(queries[block], k, probes)
        return found_scores, found_ids

    def _search_all(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every list probed: one blockwise matmul + top-k over all rows, cheaper than list by list."""
        scores, at = exact_search(queries, self.sorted_rows, k)
        return scores, torch.where(at >= 0, self.row_ids[at.clamp(min=0)], at)

    def _search_block(self, queries: torch.Tensor, k: int, probes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two passes over the lists: each query's nearest list gives its best ``k`` so far and
        their worst score a bar; the other probed lists contribute only what reaches the bar."""
        num_queries = queries.shape[0]
        probed = (queries @ self.centroids.t()).topk(probes, dim=1).indices
        first_scores, first_ids = _best_per_query(num_queries, k, *self._scan(queries, probed[:, :1], k))
        who, scores, ids = self._scan(queries, probed[:, 1:], k, bar=first_scores[:, -1])
        return _best_per_query(num_queries, k, torch.cat([torch.arange(num_queries).repeat_interleave(k), who]),
                               torch.cat([first_scores.flatten(), scores]), torch.cat([first_ids.flatten(), ids]))

    def _scan(self, queries: torch.Tensor, probed: torch.Tensor, k: int,
              bar: "torch.Tensor | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score every (query, probed list) pair, one matmul per list. Without ``bar``: each pair's
        best ``k``; with it: the pair's scores at or above the query's bar. Returns flat
        ``(query, score, row id)`` candidates. The pairs are sorted by list once, with their
        queries (and bars) gathered in that order, so a list's work is a slice, a matmul and the
        selection of what it keeps."""
        lists = probed.flatten()
        pairs = torch.argsort(lists, stable=True)
        who_sorted = pairs // probed.shape[1]
        queries_sorted = queries[who_sorted]
        bar_sorted = None if bar is None else bar[who_sorted].unsqueeze(1)
        counts = torch.bincount(lists, minlength=self.num_lists).tolist()
        who_parts, score_parts, id_parts = [], [], []
        start = 0
        for lst, count in enumerate(counts):
            begin, end = self.offsets[lst], self.offsets[lst + 1]
            if count and end > begin:
                pair_slice = slice(start, start + count)
                who = who_sorted[pair_slice]
                scores = queries_sorted[pair_slice] @ self.sorted_rows[begin:end].t()
                if bar_sorted is None:
                    best = scores.topk(min(k, end - begin), dim=1)
                    who = who.repeat_interleave(best.indices.shape[1])
                    columns, values = best.indices.flatten(), best.values.flatten()
                else:
                    at, columns = torch.nonzero(scores >= bar_sorted[pair_slice], as_tuple=True)
                    who, values = who[at], scores[at, columns]
                who_parts.append(who)
                score_parts.append(values)
                id_parts.append(self.row_ids[begin:end][columns])
            start += count
        if not who_parts:
            return torch.empty(0, dtype=torch.int64), queries.new_empty(0), torch.empty(0, dtype=torch.int64)
        return torch.cat(who_parts), torch.cat(score_parts), torch.cat(id_parts)


def _best_per_query(num_queries: int, k: int, who: torch.Tensor, scores: torch.Tensor,
                    ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_queries, k)`` best scores and ids from flat candidates; -inf / -1 where fewer."""
    within = 1.0 - scores.double().clamp(min=-2.0)   # in [0, 3]: cosines best first, then the -inf pads
    order = torch.argsort(who * 4.0 + within, stable=True)
    who, scores, ids = who[order], scores[order], ids[order]
    starts = torch.cat([who.new_zeros(1), torch.bincount(who, minlength=num_queries).cumsum(0)[:-1]])
    rank = torch.arange(who.numel()) - starts[who]
    keep = rank < k
    found_scores = scores.new_full((num_queries, k), -torch.inf)
    found_ids = torch.full((num_queries, k), -1, dtype=torch.int64)
    found_scores[who[keep], rank[keep]] = scores[keep]
    found_ids[who[keep], rank[keep]] = ids[keep]
    return found_scores, found_ids
