"""Rows cut by ownership: a head saved on N ranks, or with fewer classes, loaded on M ranks.

Each rank takes the rows it owns now from every saved shard that holds some of them; rows past
the saved classes (the head *grew*) are new: they keep a fresh head's values and start with empty
optimizer state, their row clock at the saved step (no weight decay for the steps before they
existed).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.optimizer import ROW_STATE
from hybridfc.state import SavedStates


def owned_rows(saved: SavedStates, head: ClassParallelFC, take: Callable[[dict, slice], torch.Tensor],
               check: Optional[Callable[[int, dict], None]] = None) -> list[torch.Tensor]:
    """``take(state, rows)`` of every saved rank whose shard (its state's ``"shard"``) holds rows
    ``head`` owns, ``rows`` being the slice of that shard; ``check(r, state)`` sees every rank's."""
    first, last = head.class_start, head.class_start + head.num_local
    pieces = []
    for r in range(len(saved)):
        state = saved[r]
        if check is not None:
            check(r, state)
        start, count = state["shard"]["class_start"], state["shard"]["num_local"]
        rows = slice(max(first, start) - start, min(last, start + count) - start)
        if rows.start < rows.stop:
            pieces.append(take(state, rows))
    return pieces


def new_row_count(head: ClassParallelFC, saved_classes: int) -> int:
    """The rows of ``head``'s shard past the ``saved_classes`` of a checkpoint (it grew)."""
    return max(head.class_start + head.num_local - max(head.class_start, saved_classes), 0)


def new_weight_rows(head: ClassParallelFC, count: int) -> torch.Tensor:
    """The last ``count`` rows of ``head``'s shard as a fresh head has them."""
    return head.weight.detach()[head.num_local - count:].cpu()


def resharded_optimizer(saved: SavedStates, head: ClassParallelFC, count: int) -> dict[str, Any]:
    """A head optimizer's ``state_dict`` for ``head``'s rows: the per-row entries (:data:`ROW_STATE`)
    cut from the saved shards, ``count`` new rows with empty state appended; the rest rank 0's."""
    common = saved.first()["state"]
    state = common["state"].get(0, {})
    rows = {name: torch.cat(owned_rows(saved, head, lambda s, r, n=name: s["state"]["state"][0][n][r])
                            + [_empty_rows(state, name, count)])
            for name in state if name in ROW_STATE}
    return {**common, "state": {**common["state"], **({0: {**state, **rows}} if state else {})}}


def _empty_rows(state: dict[str, Any], name: str, count: int) -> torch.Tensor:
    """Optimizer entry ``name`` of ``count`` new rows: zeros, a row clock at the saved step."""
    saved = state[name]
    fill = int(state["applied_steps"]) if name == "row_last_step" else 0
    return torch.full((count, *saved.shape[1:]), fill, dtype=saved.dtype)
