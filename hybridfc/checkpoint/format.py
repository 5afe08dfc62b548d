"""The files of a checkpoint's tag directory: one per state part and rank,
``hybridfc_<part>_rank<r:05d>_of_<N:05d>.pt``, each the part's ``state_dict()`` as ``torch.save``
wrote it (fsynced), read back with ``weights_only``; the head's shard describes itself (classes,
width, storage dtype, rows), and a shard of another head is a :class:`CheckpointError` naming the
file and every field that differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LAYOUT_VERSION = 2
"""Version of the layout: 1 kept the optimizer, the selection and the run state inside the head's
shard file (read by :mod:`hybridfc.checkpoint.legacy`); 2 has a file per part."""

HEAD = "head"
"""The part whose files say how many ranks saved a checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint's head does not match the head it is loaded into, or is missing or damaged."""


def part_file(tag_dir: "str | os.PathLike", name: str, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps part ``name`` inside a checkpoint tag."""
    return Path(tag_dir) / f"hybridfc_{name}_rank{rank:05d}_of_{world_size:05d}.pt"


def shard_file(tag_dir: "str | os.PathLike", rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps its head shard inside a checkpoint tag."""
    return part_file(tag_dir, HEAD, rank, world_size)


def part_files(tag_dir: "str | os.PathLike", name: str) -> list[Path]:
    """Every rank's file of part ``name``, in rank order; empty when the tag holds none, a
    :class:`CheckpointError` naming what is missing when it holds some."""
    tag_dir = Path(tag_dir)
    found = sorted(tag_dir.glob(f"hybridfc_{name}_rank[0-9]*_of_[0-9]*.pt"))
    if not found:
        return []
    world_size = int(found[0].stem.rsplit("_of_", 1)[1])
    expected = [part_file(tag_dir, name, rank, world_size) for rank in range(world_size)]
    missing = [p.name for p in expected if not p.is_file()]
    if missing or len(found) != world_size:
        raise CheckpointError(f"hybridfc: {tag_dir} does not hold one {name} shard per rank of {world_size}: "
                              f"missing {missing}, found {[p.name for p in found]}")
    return expected


def shard_files(tag_dir: "str | os.PathLike") -> list[Path]:
    """Every rank's head shard, in rank order, or a :class:`CheckpointError`."""
    files = part_files(tag_dir, HEAD)
    if not files:
        raise CheckpointError(f"hybridfc: {tag_dir} holds no head shards")
    return files


def saved_world_size(tag_dir: "str | os.PathLike") -> int:
    """The number of ranks whose head shards ``tag_dir`` holds (all of them, or an error)."""
    return len(shard_files(tag_dir))


def read_file(path: Path, name: str, mmap: bool = False) -> Any:
    """Part ``name``'s file (with ``mmap``, its tensors mapped rather than read), or a
    :class:`CheckpointError` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"hybridfc: {name} shard {path} cannot be read, it is truncated or corrupt "
                              f"({type(exc).__name__}: {exc})") from None


def write_file(path: Path, state: Any) -> None:
    """``torch.save(state)`` into ``path``, flushed to the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def check_description(saved: dict[str, Any], expected: dict[str, Any], path: Path, ignore: tuple[str, ...]) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` and each field of a head shard's description
    ``saved`` that differs from ``expected`` (but the fields ``ignore``); a description without a
    layout is of layout 0."""
    saved = {"layout": 0, **saved}
    mismatched = {k: (v, expected[k]) for k, v in saved.items() if k not in ignore and expected.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: saved {was}, this head {ours}" for k, (was, ours) in mismatched.items())
        raise CheckpointError(f"hybridfc: head shard {path} does not match this head ({details})")
