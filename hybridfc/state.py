"""One protocol for everything a checkpoint holds.

A *state part* is anything whose state a run needs to resume: the head's shard, its optimizer, the
selection's graph or index, the grad_topk residual, the plateau rule, the loader's position, the
random generators. Each implements :class:`StatePart`:

* ``name``: its file in a checkpoint's tag directory (``hybridfc_<name>_rank<r>_of_<N>.pt``);
* ``state_dict()``: this rank's state (what ``torch.save`` can write with ``weights_only``);
* ``merge(saved)``: this rank's state out of the states the N saved ranks wrote
  (:class:`SavedStates`, read on first use), whatever N is: the own state where the layout is the
  same, rows cut by ownership, a mean (a residual), rank 0's (scalars the ranks share), or None:
  nothing to load, the part starts fresh;
* ``load_state_dict(state)``: put a merged state back.

The checkpoint code (:mod:`hybridfc.checkpoint.store`) iterates over the parts it is given and
never knows a part's keys; a new part needs no change there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable


@runtime_checkable
class StatePart(Protocol):
    """What a checkpoint holds of one piece of a run (module docstring)."""

    name: str

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...

    def merge(self, saved: "SavedStates") -> Optional[Any]: ...


class SavedStates(Sequence):
    """The states the N ranks of a checkpoint saved of one part, each read on first use.

    Args:
        read: ``read(r)``: the state saved by rank ``r``.
        paths: the file of each saved rank (for error messages); empty when the checkpoint does not
            hold the part.
        rank, world_size: this run's rank and number of ranks.
    """

    def __init__(self, read: Callable[[int], Any], paths: Sequence[Path], rank: int, world_size: int) -> None:
        self._read, self.paths = read, list(paths)
        self.rank, self.world_size = rank, world_size
        self._last: Optional[tuple[int, Any]] = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:   # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._last is None or self._last[0] != index:
            self._last = (index, self._read(index))
        return self._last[1]

    @property
    def same_layout(self) -> bool:
        """Saved on as many ranks as this run has."""
        return len(self) == self.world_size

    def own(self) -> Optional[Any]:
        """This rank's saved state where the number of ranks is the same, else None."""
        return self[self.rank] if self.same_layout else None

    def first(self) -> Optional[Any]:
        """Rank 0's saved state (for what every rank holds alike), None when nothing was saved."""
        return self[0] if len(self) else None
