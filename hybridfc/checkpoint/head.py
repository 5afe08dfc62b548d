"""The head's state parts: its shard of rows, its optimizer, its selection; and the head saved
and loaded alone (any training loop: :func:`save_head`, :func:`load_head`).

Loading checks that a saved shard is one of this head (``num_classes``, ``embedding_size``,
storage dtype, and where the ranks are as many, the rows) and raises :class:`CheckpointError`
naming the file and the difference otherwise: a head is never silently re-initialised. Another
number of ranks, or more classes (*growing*), cut the rows by ownership
(:mod:`hybridfc.checkpoint.reshard`); fewer classes is an error. The selection's graph or index
is kept where the rows stay where they were, else rebuilt from the rows at the first step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from hybridfc.checkpoint.format import LAYOUT_VERSION, CheckpointError, check_description, shard_file, shard_files
from hybridfc.checkpoint.reshard import new_row_count, new_weight_rows, owned_rows, resharded_optimizer
from hybridfc.checkpoint.store import load_parts, read_parts, save_parts
from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.optimizer import HeadOptimizer
from hybridfc.state import SavedStates, StatePart

SHARD_FIELDS = ("world_size", "class_start", "num_local")
"""The fields of a shard's description that depend on the number of ranks."""


def describe(head: ClassParallelFC) -> dict[str, Any]:
    """What a shard file says of its head and rows."""
    return {"layout": LAYOUT_VERSION, "num_classes": head.num_classes, "embedding_size": head.embedding_size,
            "storage_dtype": str(head.weight.dtype).removeprefix("torch."), "world_size": head.world_size,
            "class_start": head.class_start, "num_local": head.num_local}


def _same_rows(saved: SavedStates, head: ClassParallelFC) -> Optional[dict[str, Any]]:
    """This rank's saved state where it holds exactly the rows ``head`` has, else None."""
    own = saved.own()
    if own is None or own["shard"]["num_classes"] != head.num_classes:
        return None
    return own


class HeadShard:
    """The shard's rows and the head's counters. ``grown_from``: after a load that grew the head,
    the saved number of classes (else None)."""

    name = "head"

    def __init__(self, head: ClassParallelFC) -> None:
        self.head = head
        self.grown_from: Optional[int] = None

    def state_dict(self) -> dict[str, Any]:
        head = self.head
        return {"shard": describe(head), "weight": head.weight.detach().cpu(),
                "non_finite_batches": head.non_finite_batches, "steps": head.steps}

    def merge(self, saved: SavedStates) -> dict[str, Any]:
        if not len(saved):
            raise CheckpointError("hybridfc: the checkpoint holds no head shards")
        own = saved.own()
        if own is not None and own["shard"]["num_classes"] >= self.head.num_classes:
            self._check(saved.paths[saved.rank], own, ignore=())
            return {**own, "grown_from": None}
        return self._resharded(saved)

    def _check(self, path: Path, state: dict[str, Any], ignore: tuple[str, ...]) -> None:
        saved = dict(state["shard"])
        saved.setdefault("storage_dtype", str(state["weight"].dtype).removeprefix("torch."))
        check_description(saved, describe(self.head), path, ignore)
        if saved["num_classes"] > self.head.num_classes:
            raise CheckpointError(f"hybridfc: head shard {path} holds {saved['num_classes']} classes, this head "
                                  f"{self.head.num_classes}: a head grows (more classes), never shrinks")

    def _resharded(self, saved: SavedStates) -> dict[str, Any]:
        head, first = self.head, saved.first()
        classes = first["shard"]["num_classes"]
        rows = owned_rows(saved, head, lambda state, r: state["weight"][r],
                          lambda r, state: self._check(saved.paths[r], state, SHARD_FIELDS + ("num_classes",)))
        weight = torch.cat(rows + [new_weight_rows(head, new_row_count(head, classes))])
        return {**first, "shard": describe(head), "weight": weight,
                "grown_from": classes if classes < head.num_classes else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.head.weight.copy_(state["weight"])
        self.head.non_finite_batches, self.head.steps = state["non_finite_batches"], state["steps"]
        self.grown_from = state.get("grown_from")


class HeadOptimizerState:
    """The head optimizer's state (per-row entries cut by ownership) and its skip count."""

    name = "optimizer"

    def __init__(self, head: ClassParallelFC, optimizer: Optional[HeadOptimizer] = None) -> None:
        self.head, self.optimizer = head, optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"shard": describe(self.head), "state": self.optimizer.state_dict(),
                "skipped_steps": self.optimizer.skipped_steps}

    def merge(self, saved: SavedStates) -> Optional[dict[str, Any]]:
        if not len(saved):
            return None
        own = _same_rows(saved, self.head)
        if own is not None:
            return own
        count = new_row_count(self.head, saved.first()["shard"]["num_classes"])
        return {"state": resharded_optimizer(saved, self.head, count), "skipped_steps": saved.first()["skipped_steps"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["state"])
        self.optimizer.skipped_steps = state["skipped_steps"]


class SelectionState:
    """The selection's counters and graph or index (a build in flight included), kept where the
    rows stay where they were; elsewhere rebuilt from the rows at the first step."""

    name = "selection"

    def __init__(self, head: ClassParallelFC) -> None:
        self.head = head

    def state_dict(self) -> dict[str, Any]:
        return {"shard": describe(self.head), "state": self.head.selection.state_dict()}

    def merge(self, saved: SavedStates) -> Optional[dict[str, Any]]:
        return _same_rows(saved, self.head)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.selection.load_state_dict(state["state"])


def head_parts(head: ClassParallelFC, optimizer: Optional[HeadOptimizer]) -> list[StatePart]:
    """The head's parts, its optimizer's where it is given."""
    optimizer_part = [HeadOptimizerState(head, optimizer)] if optimizer is not None else []
    return [HeadShard(head), *optimizer_part, SelectionState(head)]


def save_head(head: ClassParallelFC, optimizer: HeadOptimizer, tag_dir: "str | os.PathLike",
              parts: Sequence[StatePart] = ()) -> Path:
    """Write this rank's shard, its optimizer state and selection, and the ``parts`` given, into
    ``tag_dir``; returns the shard's file."""
    save_parts(tag_dir, [*head_parts(head, optimizer), *parts], head.rank, head.world_size)
    return shard_file(tag_dir, head.rank, head.world_size)


def read_head(head: ClassParallelFC, tag_dir: "str | os.PathLike") -> dict[str, Any]:
    """This rank's part of the head in ``tag_dir``, read and checked against ``head``: the merged
    state of each head part by name (``state["head"]["grown_from"]``: the saved number of classes
    where the head grew). A missing, truncated or corrupt file, or one of another head, is a
    :class:`CheckpointError` naming the file and what differs."""
    shard_files(tag_dir)
    parts = [HeadShard(head), HeadOptimizerState(head), SelectionState(head)]
    return read_parts(tag_dir, parts, head.rank, head.world_size)


def apply_head(head: ClassParallelFC, optimizer: Optional[HeadOptimizer], states: dict[str, Any]) -> None:
    """Put what :func:`read_head` returned into ``head`` (and ``optimizer``, when given)."""
    load_parts(head_parts(head, optimizer), states)


def load_head(head: ClassParallelFC, optimizer: Optional[HeadOptimizer], tag_dir: "str | os.PathLike") -> None:
    """Restore this rank's shard (and optimizer state, when given) from ``tag_dir``."""
    apply_head(head, optimizer, read_head(head, tag_dir))
