"""Saving and loading the registered state parts (:mod:`hybridfc.state`), whatever they are.

Each part writes ``hybridfc_<name>_rank<r>_of_<N>.pt`` into the tag directory; loading hands each
part the states its N saved ranks wrote (:class:`~hybridfc.state.SavedStates`, empty where the
checkpoint holds none of it) to merge into this rank's, then puts the merged states back. A
checkpoint of layout 1 is read through :mod:`hybridfc.checkpoint.legacy`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from hybridfc.checkpoint import legacy
from hybridfc.checkpoint.format import part_file, part_files, read_file, write_file
from hybridfc.state import SavedStates, StatePart


def save_parts(tag_dir: "str | os.PathLike", parts: Sequence[StatePart], rank: int, world_size: int) -> None:
    """Write this rank's state of every part into ``tag_dir`` (each file fsynced)."""
    for part in parts:
        write_file(part_file(tag_dir, part.name, rank, world_size), part.state_dict())


def saved_states(tag_dir: "str | os.PathLike", name: str, rank: int, world_size: int,
                 layout_1: Sequence[Path] = ()) -> SavedStates:
    """What the saved ranks wrote of part ``name``, read on first use (``layout_1``: the head shard
    files of a layout-1 checkpoint, which hold every part)."""
    if layout_1:
        return SavedStates(lambda r: legacy.read(layout_1[r], name), layout_1, rank, world_size)
    files = part_files(tag_dir, name)
    return SavedStates(lambda r: read_file(files[r], name), files, rank, world_size)


def read_parts(tag_dir: "str | os.PathLike", parts: Sequence[StatePart], rank: int,
               world_size: int) -> dict[str, Optional[Any]]:
    """Each part's state for this rank, merged from what the saved ranks wrote (None: nothing to
    load). Nothing is put back yet, so that a bad checkpoint changes nothing."""
    layout_1 = legacy.layout_1_files(tag_dir)
    return {part.name: part.merge(saved_states(tag_dir, part.name, rank, world_size, layout_1)) for part in parts}


def load_parts(parts: Sequence[StatePart], states: dict[str, Optional[Any]]) -> None:
    """Put back what :func:`read_parts` returned, each part that has a state to load."""
    for part in parts:
        if states.get(part.name) is not None:
            part.load_state_dict(states[part.name])
