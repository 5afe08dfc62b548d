"""Where this rank's data stands, as state parts: its random generators (``rng``: this rank's own
on as many ranks, else not restored) and the loader's position in the epoch's global sample order
(``loader``: rank 0's, the same on every rank). A checkpoint keeps them as of the last
``engine.step()``, so a loop that has already taken the next batch when it saves resumes at that
batch, not after it."""

from __future__ import annotations

from typing import Any, Optional

from hybridfc.checkpoint.rng import rng_states, set_rng_states
from hybridfc.data.loader import DistributedLoader
from hybridfc.log import log_dist
from hybridfc.state import SavedStates, StatePart


class DataPosition:
    """The random generators and the loader's position, as of the last :meth:`mark`."""

    def __init__(self, loader: Optional[DistributedLoader]) -> None:
        self.loader = loader
        self._at_step: Optional[dict[str, Any]] = None

    def mark(self) -> None:
        """Remember where the data stands now (at each ``engine.step()``)."""
        self._at_step = self.now()

    def forget(self) -> None:
        """Drop the mark (after a load: the loaded position is where the data stands)."""
        self._at_step = None

    def now(self) -> dict[str, Any]:
        return {"rng": rng_states(), "loader": None if self.loader is None else self.loader.state_dict()}

    def saved(self, key: str) -> Any:
        """What a save keeps of ``key``: as of the last mark, or now."""
        return (self._at_step or self.now())[key]

    def parts(self) -> list[StatePart]:
        """The state parts: ``rng``, and ``loader`` where there is one."""
        return [RandomState(self)] + ([LoaderPosition(self)] if self.loader is not None else [])


class _SavedAtStep:
    """A part whose state a save takes from the :class:`DataPosition` (its key: the part's name)."""

    name: str

    def __init__(self, position: DataPosition) -> None:
        self.position = position

    def state_dict(self) -> Any:
        return self.position.saved(self.name)


class RandomState(_SavedAtStep):
    """This rank's random generators (not restored on another number of ranks)."""

    name = "rng"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_states(state)

    def merge(self, saved: SavedStates) -> Optional[dict[str, Any]]:
        return saved.own()


class LoaderPosition(_SavedAtStep):
    """The loader's epoch and samples handed out; grown data starts its next epoch afresh."""

    name = "loader"

    def load_state_dict(self, state: dict[str, int]) -> None:
        loader = self.position.loader
        if state["num_samples"] == len(loader.dataset):
            loader.load_state_dict(state)
            return
        loader.set_epoch(state["epoch"] + 1)
        log_dist(f"the training data has {len(loader.dataset)} samples, the checkpoint's loader had "
                 f"{state['num_samples']}: training goes on from epoch {state['epoch'] + 1}'s start")

    def merge(self, saved: SavedStates) -> Optional[dict[str, int]]:
        return saved.first()
