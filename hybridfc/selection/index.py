"""Nearest rows of one shard of class centres by cosine similarity.

A :class:`ShardIndex` holds the ``(n, d)`` L2-normalised fp32 centres of one shard and answers
``(q, d)`` normalised queries with the ``k`` rows of largest inner product (= cosine), best
first, as ``(q, k)`` scores and ``(q, k)`` 0-based rows. Three kinds of index:

``exact``  blockwise ``queries @ centres.T`` and ``topk``
           (:func:`~hybridfc.selection.exact.exact_search`), memory bounded whatever ``n``.
``ivf``    :class:`~hybridfc.selection.ivf.InvertedFileIndex`: about ``sqrt(n)`` inverted lists
           from a seeded spherical k-means in torch, searched list by list with matmuls;
           a query scans the lists of its :func:`ivf_probes` nearest centroids.
``hnsw``   ``faiss.IndexHNSWFlat`` (inner product, 32 links per node, seeded node levels),
           searched with ``efSearch`` candidates (``max(64, 2k)`` until widened). Insertion
           runs on faiss's OpenMP threads; faiss does not promise that two parallel builds are
           identical (they were on one and on two threads with faiss 1.15).

An approximate index measures itself: :meth:`ShardIndex.widen_to_recall` compares its search of
sampled queries with an exhaustive one and, given a target, doubles the search's breadth (IVF
lists probed, HNSW ``efSearch``) until the recall@k of the sample reaches it or the search is
exhaustive. Where the centres have little structure (isotropic rows in 128 dimensions) that
ends near an exhaustive scan: nearest neighbours there are barely nearer than any other row.

faiss is imported only when an ``hnsw`` index is built, so ``exact`` and ``ivf`` work without
it. Searches pass their parameters per call (no index state is changed), so an index may be
built in one thread and searched from several.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from hybridfc.log import log_dist
from hybridfc.selection.exact import exact_search
from hybridfc.selection.ivf import InvertedFileIndex, ivf_lists, ivf_probes

IndexKind = Literal["exact", "ivf", "hnsw"]

EXACT_MAX_ROWS = 32768
GRAPH_EXACT_MAX_ROWS = 131072
KINDS: tuple[str, ...] = ("exact", "ivf", "hnsw")
RECALL_QUERIES = 512
"""Sampled rows on which an approximate index's recall is measured at each build."""

_HNSW_LINKS = 32
_HNSW_EF_CONSTRUCTION = 80


def choose_index_kind(num_rows: int, requested: str = "auto", exact_max_rows: int = EXACT_MAX_ROWS) -> IndexKind:
    """``"auto"``: ``"exact"`` up to ``exact_max_rows`` rows, else ``"ivf"``; other kinds as is.

    A few hundred queries per step (``hf``) pay for an index above :data:`EXACT_MAX_ROWS` rows.
    A class graph asks every row of every shard; there exact search costs at most about 1.5x
    an IVF's up to about :data:`GRAPH_EXACT_MAX_ROWS` rows, with recall 1 instead of ~0.45 on
    unstructured centres (50k rows: 39 s vs 29 s, ``benchmarks/RESULTS.md``).
    """
    if requested == "auto":
        return "exact" if num_rows <= exact_max_rows else "ivf"
    if requested not in KINDS:
        raise ValueError(f"index kind {requested!r} is not one of 'auto', {', '.join(map(repr, KINDS))}")
    return requested  # type: ignore[return-value]


def drop_own_rows(rows: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """``(q, k + 1)`` rows -> ``(q, k)``: without each query's own row ``own`` ``(q,)`` where the
    list holds it, else without the last entry."""
    keep = rows != own.unsqueeze(1)
    keep[keep.all(dim=1), -1] = False
    return rows[keep].view(rows.shape[0], k)


def recall_at_k(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over rows of ``|approximate_row ∩ exact_row| / k`` for two ``(q, k)`` id lists."""
    if approximate.shape != exact.shape:
        raise ValueError(f"neighbour lists differ in shape: {tuple(approximate.shape)} vs {tuple(exact.shape)}")
    if exact.numel() == 0:
        return 1.0
    sorted_exact = exact.sort(dim=1).values.contiguous()
    at = torch.searchsorted(sorted_exact, approximate.contiguous()).clamp_max_(exact.shape[1] - 1)
    hits = (sorted_exact.gather(1, at) == approximate) & (approximate >= 0)
    return hits.float().mean().item()


def _import_faiss(kind: str):
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(f"index kind {kind!r} needs faiss: pip install faiss-cpu "
                          f"(the 'exact' kind works without it)") from exc
    return faiss


class ShardIndex:
    """Nearest rows of ``(n, d)`` L2-normalised fp32 centres by inner product (= cosine).

    ``kind`` is one of :data:`KINDS` or ``"auto"`` (see :func:`choose_index_kind`); ``seed``
    fixes the training sample and k-means of ``ivf`` and the node levels of ``hnsw``. The
    centres may live on any device: the ``exact`` kind computes there, ``ivf`` and ``hnsw`` on
    a CPU copy. ``centres`` gives back the fp32 rows the index was built from.
    """

    def __init__(self, centres: torch.Tensor, kind: str = "exact", seed: int = 0) -> None:
        if centres.dim() != 2:
            raise ValueError(f"centres must be (n, d), got shape {tuple(centres.shape)}")
        self.kind = choose_index_kind(centres.shape[0], kind)
        self.dim, self._num_rows = centres.shape[1], centres.shape[0]
        self._rows = centres.detach().float().contiguous()
        self._index = None
        self.ef_search: Optional[int] = None
        if self.kind == "ivf" and len(self):
            self.num_lists = ivf_lists(len(self))
            self.num_probes = ivf_probes(self.num_lists)
            self._index = InvertedFileIndex(self._rows.cpu(), self.num_lists, seed)
            self._rows = None
        elif self.kind == "hnsw" and len(self):
            self._faiss = _import_faiss(self.kind)
            self._build_hnsw(self._rows.cpu().numpy(), seed)

    def __len__(self) -> int:
        return self._num_rows

    @property
    def centres(self) -> torch.Tensor:
        """The ``(n, d)`` fp32 rows the index was built from."""
        return self._index.rows() if self._rows is None else self._rows

    @property
    def approximate(self) -> bool:
        """Whether a search may miss rows: an ``ivf`` or ``hnsw`` index over at least one row."""
        return self.kind != "exact" and len(self) > 0

    def describe(self, k: int) -> str:
        """The kind and the breadth of its search for ``k`` neighbours, e.g. ``ivf, nprobe 44 of 707 lists``."""
        if self.kind == "ivf" and len(self):
            exhaustive = " (an exact scan)" if self.num_probes >= self.num_lists else ""
            return f"ivf, nprobe {self.num_probes} of {self.num_lists} lists{exhaustive}"
        if self.kind == "hnsw" and len(self):
            return f"hnsw, efSearch {self._ef_search(k)}"
        return self.kind

    def _build_hnsw(self, centres, seed: int) -> None:
        self._index = self._faiss.IndexHNSWFlat(self.dim, _HNSW_LINKS, self._faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        self._index.hnsw.rng = self._faiss.RandomGenerator(seed)
        self._index.add(centres)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, d)`` normalised queries -> ``(q, k)`` fp32 scores and int64 rows, best first.

        Where fewer than ``k`` rows are found (``k > n``, or an approximate index finds fewer)
        the row is -1 and the score -inf. The results are on the queries' device.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (q, {self.dim}), got shape {tuple(queries.shape)}")
        scores, rows = self._search(queries.detach(), k)
        return scores.to(queries.device), rows.to(queries.device)

    def _search(self, queries: torch.Tensor, k: int, exhaustive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` at the index's breadth, or over every row with ``exhaustive``."""
        if not self.approximate or (exhaustive and self.kind == "hnsw"):
            return exact_search(queries, self.centres, k)
        queries = queries.to("cpu", torch.float32).contiguous()
        if self.kind == "ivf":
            return self._index.search(queries, k, self.num_lists if exhaustive else self.num_probes)
        return self._hnsw_search(queries, k)

    def _ef_search(self, k: int) -> int:
        return self.ef_search or max(64, 2 * k)

    def _hnsw_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = self._faiss.SearchParametersHNSW(efSearch=self._ef_search(k))
        distances, labels = self._index.search(queries.numpy(), k, params=params)
        scores, rows = torch.from_numpy(distances), torch.from_numpy(labels)
        scores[rows < 0] = -torch.inf
        return scores, rows

    def widen_to_recall(self, queries: torch.Tensor, own_rows: torch.Tensor, k: int,
                        min_recall: Optional[float] = None) -> float:
        """The recall@k of this index's search against an exhaustive one on ``(q, d)`` sample
        queries, each query's own row (``own_rows`` ``(q,)``, -1 for none) left out. With
        ``min_recall``, first doubles the breadth of the search (IVF ``num_probes``, HNSW
        ``ef_search``) until the sample's recall reaches it or the search scans every row.
        An exact index has recall 1."""
        if not self.approximate or queries.shape[0] == 0:
            return 1.0
        own_rows = own_rows.cpu()
        exact = drop_own_rows(self._search(queries, k + 1, exhaustive=True)[1], own_rows, k)
        while True:
            recall = recall_at_k(drop_own_rows(self._search(queries, k + 1)[1], own_rows, k), exact)
            if min_recall is None or recall >= min_recall or not self._widen(k):
                return recall

    def _widen(self, k: int) -> bool:
        """Double the breadth of the search; False where it already scans every row."""
        if self.kind == "ivf":
            if self.num_probes >= self.num_lists:
                return False
            self.num_probes = min(2 * self.num_probes, self.num_lists)
            return True
        if self._ef_search(k) >= len(self):
            return False
        self.ef_search = min(2 * self._ef_search(k), len(self))
        return True


def log_recall(name: str, index: ShardIndex, k: int, recall: float, queries: int,
               min_recall: Optional[float]) -> None:
    """Rank 0's line on an approximate index's measured recall (nothing for an exact one)."""
    if not index.approximate:
        return
    advice = f"min_recall {min_recall}" if min_recall else "selection.min_recall widens the search"
    log_dist(f"{name}: {index.describe(k)}, recall@{k} {recall:.3f} against exhaustive search on "
             f"{queries} sampled classes ({advice})")
