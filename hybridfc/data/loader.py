"""The training loader: every rank sees a disjoint part of a fresh permutation each epoch.

Each epoch draws one permutation of all indices from ``seed + epoch`` (the same on every
rank). Global step s takes ``perm[s*G:(s+1)*G]`` with ``G = world_size * batch_size`` and
rank r takes every ``world_size``-th element of it, starting at r. So, over all ranks, every
sample is seen exactly once per epoch (nothing dropped, nothing duplicated) and all ranks
yield the same number of batches. When the last step would leave some rank empty (fewer
than ``world_size`` samples), it is merged into the step before, whose local batches then
hold ``batch_size`` or ``batch_size + 1`` samples. The uneven last batch is kept.

The loader knows how far into its epoch it is, in samples of the epoch's permutation
(:meth:`DistributedLoader.state_dict`): a loader given that state continues the same global
order from the next sample, on any number of ranks and local batch size, and
``hybridfc.HybridEngine`` saves and restores it with its checkpoints.

Example::

    from hybridfc.data import DistributedLoader, SyntheticClasses

    loader = DistributedLoader(SyntheticClasses(1000, 50), batch_size=128)
    for epoch in range(3):
        for x, y in loader:      # each iter() starts the next epoch: 0, 1, 2
            ...                  # x: (b, 64) float32, y: (b,) int64, b <= 128
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hybridfc.parallel.groups import group_rank, group_size


def step_bounds(num_samples: int, global_batch: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of each global step over a permutation of ``num_samples`` indices.

    Steps hold ``global_batch`` samples; a last step with fewer than ``world_size`` samples
    is merged into the one before.
    """
    starts = list(range(0, num_samples, global_batch))
    if len(starts) > 1 and num_samples - starts[-1] < world_size:
        starts.pop()
    return list(zip(starts, starts[1:] + [num_samples]))


class _RankBatches:
    """This rank's batches of one epoch, as index lists made on demand."""

    def __init__(
        self, perm: torch.Tensor, bounds: Sequence[tuple[int, int]], rank: int, world_size: int
    ) -> None:
        self._perm = perm
        self._bounds = bounds
        self._rank = rank
        self._world_size = world_size

    def __len__(self) -> int:
        return len(self._bounds)

    def __iter__(self) -> Iterator[list[int]]:
        for start, end in self._bounds:
            yield self._perm[start:end][self._rank :: self._world_size].tolist()


class DistributedLoader:
    """Iterates this rank's batches of ``dataset``, reshuffled every epoch.

    ``rank`` and ``world_size`` default to those of ``torch.distributed`` (0 and 1 when it
    is not initialised). Batches are what ``collate_fn`` makes of the samples (default
    collate: for ``SyntheticClasses``, x (b, d) float32 and y (b,) int64), with
    1 <= b <= ``batch_size``, or ``batch_size + 1`` in a merged last step.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        rank = group_rank() if rank is None else rank
        world_size = group_size() if world_size is None else world_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if len(dataset) < world_size:
            raise ValueError(
                f"dataset has {len(dataset)} samples, fewer than world_size={world_size}: "
                "some rank would get no batch"
            )
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self._batch_size = batch_size
        self._bounds = step_bounds(len(dataset), world_size * batch_size, world_size)
        self._epoch = 0
        self._started = False
        self._consumed = 0
        self._resume_at = 0

    @property
    def batch_size(self) -> int:
        """The local batch size (all but possibly the last batch of an epoch hold it)."""
        return self._batch_size

    @property
    def epoch(self) -> int:
        """The epoch of the current iteration, or the next one if none began since set_epoch."""
        return self._epoch

    @property
    def num_samples(self) -> int:
        """The number of samples this rank sees per epoch (the same every epoch)."""
        return len(range(self.rank, len(self.dataset), self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` from its start."""
        self._epoch = epoch
        self._started = False
        self._resume_at = 0

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: the epoch, and the samples of its permutation handed out so far
        (over all ranks, the batch just yielded included)."""
        return {"epoch": self._epoch, "samples": self._consumed, "num_samples": len(self.dataset), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next ``iter()`` continue from ``state``: the rest of that epoch, or the next
        epoch when it was used up."""
        if state["num_samples"] != len(self.dataset) or state["seed"] != self.seed:
            raise ValueError(f"hybridfc: the saved loader position is for {state['num_samples']} samples and seed "
                             f"{state['seed']}, this loader has {len(self.dataset)} and seed {self.seed}")
        finished = state["samples"] >= len(self.dataset)
        self.set_epoch(state["epoch"] + finished)
        self._resume_at = 0 if finished else state["samples"]

    def __len__(self) -> int:
        """Batches per rank per epoch, equal on all ranks."""
        return len(self._bounds)

    def __iter__(self) -> Iterator[Any]:
        if self._started:
            self._epoch += 1
            self._resume_at = 0
        self._started = True
        skip = self._resume_at
        bounds = self._bounds if not skip else [
            (start + skip, end + skip)
            for start, end in step_bounds(len(self.dataset) - skip, self.world_size * self._batch_size,
                                          self.world_size)]
        loader = DataLoader(
            self.dataset,
            batch_sampler=_RankBatches(self._permutation(), bounds, self.rank, self.world_size),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        self._consumed = skip
        return self._counted(iter(loader), bounds)

    def _counted(self, batches: Iterator[Any], bounds: Sequence[tuple[int, int]]) -> Iterator[Any]:
        """The batches, counting the samples handed out before each is yielded."""
        for (_, end), batch in zip(bounds, batches):
            self._consumed = end
            yield batch

    def _permutation(self) -> torch.Tensor:
        """All indices (n,) int64 in this epoch's order."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        return torch.randperm(n, generator=generator)
