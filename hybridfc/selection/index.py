"""Nearest rows of one shard of class centres by cosine similarity.

A :class:`ShardIndex` holds the ``(n, d)`` L2-normalised fp32 centres of one shard and answers
``(q, d)`` normalised queries with the ``k`` rows of largest inner product (= cosine), best
first, as ``(q, k)`` scores and ``(q, k)`` 0-based rows. Three kinds of index:

``exact``  blockwise ``queries @ centres.T`` and ``topk``; the queries go in blocks so that one
           block of scores is at most about 64 MiB, whatever ``n``. Needs nothing but torch.
``ivf``    :class:`~hybridfc.selection.ivf.InvertedFileIndex`: about ``sqrt(n)`` inverted lists
           from a seeded spherical k-means in torch, searched list by list with matmuls;
           a query scans the lists of its :func:`ivf_probes` nearest centroids.
``hnsw``   ``faiss.IndexHNSWFlat`` (inner product, 32 links per node, seeded node levels).
           Insertion runs on faiss's OpenMP threads; faiss does not promise that two parallel
           builds are identical (they were on one and on two threads with faiss 1.15).

faiss is imported only when an ``hnsw`` index is built, so ``exact`` and ``ivf`` work without
it. Searches pass their parameters per call (no index state is changed), so an index may be
built in one thread and searched from several.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from hybridfc.selection.ivf import InvertedFileIndex, ivf_lists, ivf_probes

IndexKind = Literal["exact", "ivf", "hnsw"]

EXACT_MAX_ROWS = 32768
GRAPH_EXACT_MAX_ROWS = 131072
KINDS: tuple[str, ...] = ("exact", "ivf", "hnsw")

_BLOCK_BYTES = 64 << 20
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


def exact_search(
    queries: torch.Tensor, centres: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest inner products of ``(q, d)`` queries with ``(n, d)`` centres, in query blocks.

    Returns ``(q, k)`` scores (dtype of the centres) and ``(q, k)`` int64 rows, best first.
    ``exclude`` ``(q,)`` names one row per query that is never returned (out-of-range: none).
    Where fewer than ``k`` rows qualify the row is -1 and the score -inf.
    """
    num_queries, n = queries.shape[0], centres.shape[0]
    found = min(k, n)
    scores = centres.new_full((num_queries, k), -torch.inf)
    rows = torch.full((num_queries, k), -1, dtype=torch.int64, device=centres.device)
    block = max(1, _BLOCK_BYTES // max(1, n * centres.element_size()))
    for begin in range(0, num_queries if found else 0, block):
        end = min(begin + block, num_queries)
        block_scores = queries[begin:end].to(centres) @ centres.t()
        if exclude is not None:
            _mask_rows_(block_scores, exclude[begin:end].to(centres.device))
        scores[begin:end, :found], rows[begin:end, :found] = block_scores.topk(found, dim=1)
    rows[scores == -torch.inf] = -1
    return scores, rows


def _mask_rows_(scores: torch.Tensor, exclude: torch.Tensor) -> None:
    """Set ``scores[i, exclude[i]]`` to -inf where ``exclude[i]`` is a valid column."""
    valid = (exclude >= 0) & (exclude < scores.shape[1])
    scores[torch.nonzero(valid).squeeze(1), exclude[valid]] = -torch.inf


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
        queries = queries.detach()
        if self.kind == "exact" or not len(self):
            scores, rows = exact_search(queries, self.centres, k)
        elif self.kind == "ivf":
            scores, rows = self._index.search(queries.to("cpu", torch.float32), k, self.num_probes)
        else:
            scores, rows = self._hnsw_search(queries.to("cpu", torch.float32).contiguous(), k)
        return scores.to(queries.device), rows.to(queries.device)

    def _hnsw_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = self._faiss.SearchParametersHNSW(efSearch=max(64, 2 * k))
        distances, labels = self._index.search(queries.numpy(), k, params=params)
        scores, rows = torch.from_numpy(distances), torch.from_numpy(labels)
        scores[rows < 0] = -torch.inf
        return scores, rows
