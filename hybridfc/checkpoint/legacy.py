"""Checkpoints of layout 1 (before one file per state part), read as if they had that layout.

Layout 1 kept everything a rank saved in its head shard file: the rows and the shard's
description, ``optimizer`` and ``skipped_steps``, ``selection``, and a ``run_state`` dict with the
engine's parts (``rng``, ``loader``, ``grad_topk``, ``plateau``, named as the parts are now). This
module is the one place that knows that layout: it hands each part its piece of the old file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hybridfc.checkpoint.format import HEAD, LAYOUT_VERSION, part_files, read_file

_HEAD_KEYS = ("shard", "weight", "non_finite_batches", "steps")


def layout_1_files(tag_dir: "str | Path") -> list[Path]:
    """The head shard files of ``tag_dir`` when they are of layout 1, else none."""
    files = part_files(tag_dir, HEAD)
    if not files:
        return []
    shard = read_file(files[0], HEAD, mmap=True).get("shard", {})
    return files if shard.get("layout") == 1 else []


def part_state(name: str, state: dict[str, Any]) -> Any:
    """Part ``name``'s state inside a layout-1 head shard file (None where it holds none)."""
    shard = {**state["shard"], "layout": LAYOUT_VERSION}
    if name == HEAD:
        return {**{key: state[key] for key in _HEAD_KEYS}, "shard": shard}
    if name == "optimizer":
        return {"shard": shard, "state": state["optimizer"], "skipped_steps": state["skipped_steps"]}
    if name == "selection":
        return {"shard": shard, "state": state["selection"]}
    return (state.get("run_state") or {}).get(name)


def read(path: Path, name: str) -> Any:
    """Part ``name``'s state in the layout-1 head shard file ``path`` (its tensors mapped, not read)."""
    return part_state(name, read_file(path, HEAD, mmap=True))

