"""Save and restore the head's shards and optimizer state beside a DeepSpeed checkpoint.

Layout: DeepSpeed writes ``<save_dir>/<tag>/…`` and ``<save_dir>/latest``; each rank of the
head's group writes ``<save_dir>/<tag>/hybridfc_head_rank{r:05d}_of_{N:05d}.pt`` holding its
rows, their optimizer state and the shard's description. A shard is written to a temporary
file and renamed into place, so an interrupted save never damages an earlier checkpoint.

Loading checks that the saved shard is the one this rank owns (same ``num_classes``,
``embedding_size``, world size and row range) and raises :class:`CheckpointError` naming the
difference otherwise: a head is never silently re-initialised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.optimizer import HeadOptimizer


class CheckpointError(RuntimeError):
    """A checkpoint's head does not match the head it is loaded into, or is missing."""


def shard_file(tag_dir: "str | os.PathLike", rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps its head shard inside a checkpoint tag."""
    return Path(tag_dir) / f"hybridfc_head_rank{rank:05d}_of_{world_size:05d}.pt"


def _description(head: ClassParallelFC) -> dict[str, int]:
    return {
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "world_size": head.world_size,
        "class_start": head.class_start,
        "num_local": head.num_local,
    }


def save_head(head: ClassParallelFC, optimizer: HeadOptimizer, tag_dir: "str | os.PathLike") -> Path:
    """Write this rank's shard, its optimizer state and counters; returns the file written."""
    path = shard_file(tag_dir, head.rank, head.world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "shard": _description(head),
        "weight": head.weight.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "non_finite_batches": head.non_finite_batches,
        "skipped_steps": optimizer.skipped_steps,
        "steps": head.steps,
        "selection": head.selection.state_dict(),
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def check_head_files(head: ClassParallelFC, tag_dir: "str | os.PathLike") -> Path:
    """This rank's shard file in ``tag_dir``, or a :class:`CheckpointError` that says what is there."""
    path = shard_file(tag_dir, head.rank, head.world_size)
    if path.is_file():
        return path
    found = sorted(p.name for p in Path(tag_dir).glob("hybridfc_head_rank*_of_*.pt"))
    if not found:
        raise CheckpointError(f"hybridfc: checkpoint {tag_dir} holds no head shards; it cannot restore the head")
    raise CheckpointError(
        f"hybridfc: checkpoint {tag_dir} has no head shard for rank {head.rank} of {head.world_size} "
        f"(found {found[0]} … {found[-1]}); it was saved with another world size, and loading it "
        "into a different world size is not supported yet"
    )


def load_head(head: ClassParallelFC, optimizer: "HeadOptimizer | None", tag_dir: "str | os.PathLike") -> None:
    """Restore this rank's shard (and optimizer state, when given) from ``tag_dir``."""
    path = check_head_files(head, tag_dir)
    state: dict[str, Any] = torch.load(path, map_location=head.weight.device, weights_only=True)
    expected = _description(head)
    mismatched = {k: (v, expected[k]) for k, v in state["shard"].items() if expected.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: saved {saved}, this head {ours}" for k, (saved, ours) in mismatched.items())
        raise CheckpointError(f"hybridfc: head shard {path} does not match this head ({details})")
    with torch.no_grad():
        head.weight.copy_(state["weight"])
    head.non_finite_batches = state["non_finite_batches"]
    head.steps = state["steps"]
    head.selection.load_state_dict(state["selection"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        optimizer.skipped_steps = state["skipped_steps"]
