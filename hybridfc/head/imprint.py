"""Warm start ("imprinting") of a :class:`~hybridfc.head.class_parallel_fc.ClassParallelFC`:
each class row becomes the mean of its samples' L2-normalised features.

>>> from hybridfc.head.imprint import imprint
>>> head = hybridfc.ClassParallelFC(1_000_000, 512)
>>> imprinted = imprint(head, backbone, loader)    # on every rank of head.group, each its own batches
>>> log_dist(f"{imprinted} of {head.num_classes} rows imprinted")

Call it before training starts (a ``knn`` selection builds its graph from the rows at the first
step). One pass, in rounds; in each round every rank:

1. embeds its next batch ``x`` -> ``(b_r, d)`` (a rank out of batches contributes an empty one)
   and checks it with its labels ``y (b_r,)``;
2. all-gathers its batch size, its verdict, whether it still had a batch and whether its
   features are float64 (one small vector): a bad input raises
   :class:`~hybridfc.head.validation.InputError` (a ``ValueError``) on every rank, and the pass
   ends on every rank in the first round where no rank had a batch;
3. L2-normalises its features (float32, or float64 when any rank's are float64) and all-gathers
   them with the labels, ``(B, d)`` and ``(B,)``;
4. adds the features of the labels in its shard ``[class_start, class_start + num_local)`` to
   per-row sums (in the weight's dtype, at least float32) and counts. The weight itself is never
   gathered.

At the end each row with at least one sample is set, in place, to the mean of its samples'
normalised features (cast to the weight's dtype; the mean is not renormalised); the other rows
keep their values.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.validation import InputError, Problem, check_inputs, describe
from hybridfc.parallel import all_gather_vector, all_reduce, collective_device, gather_padded

Batch = tuple[torch.Tensor, torch.Tensor]

# Columns of the exchanged vector: check_inputs' four, then this round's two flags.
_SIZE, _PROBLEM, _DETAIL, _NON_FINITE, _HAS_BATCH, _FLOAT64 = range(6)


def imprint(head: ClassParallelFC, embed: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch]) -> int:
    """Set the rows of ``head``'s classes to the mean normalised feature of their samples.

    Args:
        head: the head whose shard is imprinted; every rank of ``head.group`` calls this.
        embed: ``x`` -> ``(b, d)`` features (the backbone), run under ``torch.no_grad()``.
        batches: this rank's ``(x, y)`` pairs, ``y (b,)`` global int64 labels in ``[0, C)``;
            read once, lazily; ranks may have different numbers of batches.

    Returns:
        The number of rows imprinted over all ranks (classes with at least one sample), the same
        on every rank.
    """
    sums = head.weight.new_zeros(head.weight.shape, dtype=torch.promote_types(head.weight.dtype, torch.float32))
    counts = torch.zeros(head.num_local, dtype=torch.int64, device=head.weight.device)
    remaining = iter(batches)
    with torch.no_grad():
        while True:
            batch = next(remaining, None)
            features, labels = _embed(head, embed, batch)
            sizes, dtype, any_batch = _agree_on_round(head, features, labels, batch is not None)
            if not any_batch:
                break
            if sum(sizes):
                _add_shard_samples(head, sums, counts, F.normalize(features.to(dtype), dim=1), labels, sizes)
        return _set_rows_to_means(head, sums, counts)


def _embed(head: ClassParallelFC, embed: Callable[[torch.Tensor], torch.Tensor],
           batch: Optional[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """This round's raw features ``(b, d)`` and labels ``(b,)`` on the shard's device; empty
    ``(0, d)`` float32 and ``(0,)`` int64 for a rank out of batches."""
    device = head.weight.device
    if batch is None:
        return (torch.empty(0, head.embedding_size, device=device),
                torch.empty(0, dtype=torch.int64, device=device))
    x, labels = batch
    return embed(x).to(device), labels.to(device)


def _agree_on_round(head: ClassParallelFC, features: torch.Tensor, labels: torch.Tensor,
                    has_batch: bool) -> tuple[list[int], torch.dtype, bool]:
    """All-gather every rank's verdict on its batch; raise on every rank if any is bad. Returns the
    batch sizes, the dtype the features travel in, and whether any rank still had a batch."""
    flags = torch.tensor([int(has_batch), int(features.dtype == torch.float64)], device=labels.device)
    verdict = torch.cat([check_inputs(features, labels, head.num_classes, head.embedding_size), flags])
    table = all_gather_vector(verdict.to(collective_device(head.group)), head.group).cpu()
    _raise_if_any_bad(head, table.tolist())
    dtype = torch.float64 if bool(table[:, _FLOAT64].any()) else torch.float32
    return table[:, _SIZE].tolist(), dtype, bool(table[:, _HAS_BATCH].any())


def _raise_if_any_bad(head: ClassParallelFC, table: list[list[int]]) -> None:
    """Raise :class:`InputError` naming every rank whose verdict row is bad."""
    bad = [f"rank {rank}: {_describe_verdict(head, row)}" for rank, row in enumerate(table)
           if row[_PROBLEM] != Problem.NONE or row[_NON_FINITE]]
    if bad:
        raise InputError("hybridfc: bad input to imprint on " + "; ".join(bad))


def _describe_verdict(head: ClassParallelFC, row: list[int]) -> str:
    """What is wrong with one rank's batch, as a sentence."""
    if row[_PROBLEM] != Problem.NONE:
        return describe(row[_PROBLEM], row[_DETAIL], head.num_classes, head.embedding_size)
    return "embed returned non-finite features"


def _add_shard_samples(head: ClassParallelFC, sums: torch.Tensor, counts: torch.Tensor, features: torch.Tensor,
                       labels: torch.Tensor, sizes: list[int]) -> None:
    """Gather every rank's normalised ``features (b_r, d)`` and ``labels (b_r,)``; add those of
    this shard's classes to ``sums (num_local, d)`` and ``counts (num_local,)``."""
    all_features = gather_padded(features, sizes, head.group)
    rows = gather_padded(labels.to(torch.int64), sizes, head.group) - head.class_start
    in_shard = (rows >= 0) & (rows < head.num_local)
    sums.index_add_(0, rows[in_shard], all_features[in_shard].to(sums.dtype))
    counts.index_add_(0, rows[in_shard], torch.ones_like(rows[in_shard]))


def _set_rows_to_means(head: ClassParallelFC, sums: torch.Tensor, counts: torch.Tensor) -> int:
    """Rows with samples <- their mean feature; returns the global number of such rows."""
    seen = torch.nonzero(counts).squeeze(1)
    means = sums[seen] / counts[seen].unsqueeze(1).to(sums.dtype)
    head.weight.index_copy_(0, seen, means.to(head.weight.dtype))
    imprinted = torch.tensor([seen.numel()], dtype=torch.int64, device=collective_device(head.group))
    return int(all_reduce(imprinted, "sum", head.group))
