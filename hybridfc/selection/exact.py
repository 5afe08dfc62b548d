"""Exact nearest rows by inner product: blockwise ``queries @ centres.T`` and ``topk``.

The queries go in blocks so that one block of scores is at most about 64 MiB, whatever the
number of rows; the scores are computed on the centres' device, in their dtype.

>>> scores, rows = exact_search(queries, centres, k=32)      # (q, d), (n, d) -> (q, k) each
"""

from __future__ import annotations

from typing import Optional

import torch

_BLOCK_BYTES = 64 << 20


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
