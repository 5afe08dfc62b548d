"""Input checks whose verdict travels with the batch-size exchange.

Each rank checks its own ``(embeddings, labels)`` and encodes the verdict as a row of four
int64 numbers: ``[batch_size, problem, detail, non_finite]``. The head all-gathers these rows
anyway (uneven batches need every rank's size), so a bad input on one rank becomes a clear
:class:`InputError` on *every* rank, with no extra collective and no hang.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class InputError(ValueError):
    """A rank of the group passed embeddings or labels the head cannot use."""


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.bool,
           torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
"""The dtypes a verdict can name: its ``detail`` is an index here (a rank's dtype travels as a number)."""


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "another dtype"


class Problem(IntEnum):
    NONE = 0
    EMBEDDINGS_NOT_2D = 1
    EMBEDDINGS_NOT_FLOAT = 2
    WRONG_WIDTH = 3
    LABELS_NOT_INTEGER = 4
    LABELS_SHAPE = 5
    LABEL_OUT_OF_RANGE = 6


def _shape_problem(embeddings: torch.Tensor, labels: torch.Tensor, width: int) -> tuple[Problem, int]:
    """What the shapes and dtypes alone tell (no value read, so no host synchronisation)."""
    if embeddings.dim() != 2:
        return Problem.EMBEDDINGS_NOT_2D, embeddings.dim()
    if not embeddings.is_floating_point():
        return Problem.EMBEDDINGS_NOT_FLOAT, _dtype_code(embeddings.dtype)
    if embeddings.shape[1] != width:
        return Problem.WRONG_WIDTH, embeddings.shape[1]
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return Problem.LABELS_NOT_INTEGER, _dtype_code(labels.dtype)
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        return Problem.LABELS_SHAPE, labels.numel()
    return Problem.NONE, 0


def check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, width: int) -> torch.Tensor:
    """This rank's verdict ``[batch_size, problem, detail, non_finite]``, int64 ``(4,)`` on the
    labels' device. The value checks (labels in range, embeddings finite) stay on the device: the
    verdict is read once, after the exchange that carries it."""
    problem, detail = _shape_problem(embeddings, labels, width)
    if problem != Problem.NONE:
        return torch.tensor([0, int(problem), detail, 0], dtype=torch.int64, device=labels.device)
    labels = labels.to(torch.int64)
    bad = (labels < 0) | (labels >= num_classes)
    any_bad = bad.any() if labels.numel() else torch.zeros((), dtype=torch.bool, device=labels.device)
    first_bad = labels[bad.int().argmax()] if labels.numel() else torch.zeros((), dtype=torch.int64,
                                                                                  device=labels.device)
    non_finite = ~torch.isfinite(embeddings).all().to(labels.device) & ~any_bad
    zero = torch.zeros((), dtype=torch.int64, device=labels.device)
    return torch.stack([torch.where(any_bad, zero, embeddings.shape[0]),
                        torch.where(any_bad, int(Problem.LABEL_OUT_OF_RANGE), zero),
                        torch.where(any_bad, first_bad, zero),
                        non_finite.to(torch.int64)])


def describe(problem: int, detail: int, num_classes: int, width: int) -> str:
    """A sentence naming the problem and what is allowed."""
    return {
        Problem.EMBEDDINGS_NOT_2D: f"embeddings must be 2-D (b, {width}), got {detail} dimensions",
        Problem.EMBEDDINGS_NOT_FLOAT: f"embeddings must be a floating-point tensor, got {_dtype_name(detail)}",
        Problem.WRONG_WIDTH: f"embeddings have width {detail}, the head expects embedding_size={width}",
        Problem.LABELS_NOT_INTEGER: f"labels must be an integer tensor (int64), got {_dtype_name(detail)}",
        Problem.LABELS_SHAPE: f"labels must be 1-D with one label per embedding row, got {detail} labels",
        Problem.LABEL_OUT_OF_RANGE: f"label {detail} is out of range [0, {num_classes})",
    }[Problem(problem)]


def raise_if_any_bad(verdicts: torch.Tensor, num_classes: int, width: int) -> None:
    """Raise :class:`InputError` listing every bad rank; ``verdicts`` is ``(world_size, 4)``."""
    bad = [
        f"rank {rank}: {describe(int(v[1]), int(v[2]), num_classes, width)}"
        for rank, v in enumerate(verdicts.tolist())
        if v[1] != Problem.NONE
    ]
    if bad:
        raise InputError("hybridfc: bad input to ClassParallelFC on " + "; ".join(bad))
    if int(verdicts[:, 0].sum()) == 0:
        raise InputError("hybridfc: the global batch is empty (every rank passed 0 samples)")
