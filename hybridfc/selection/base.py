"""What every class selection shares: the shard it selects from, the budget, the active set.

A selection turns one step's global labels ``(B,)`` (and, for ``hf``, features ``(B, d)``) into
this rank's active rows ``A_r``: sorted local row ids, always holding every positive of the
global batch that lives in the shard, ``budget`` rows long so that shapes are static. When the
positives alone exceed the budget, the step uses the positives only (counted and logged).

The active set is assembled in order of preference, at a cost proportional to the budget,
not to the shard (a fixed budget costs the same at 10^5 and 10^8 classes)::

    1. the positives in the shard
    2. the candidates (hard negatives, nearest first), repeats and positives dropped, at most
       ``hard_fraction`` of the room the positives leave
    3. uniform random rows, without replacement, until the budget is full

and sorted. With ``sampling_correction`` (the default) the logits of the rows drawn in 3 get
``log(free / drawn)`` (``free``: the rows they were drawn from), the sampled-softmax estimate
of the partition function over those rows; positives and candidates are taken for certain and
get nothing. Keeping room for 3 when candidates abound (``hard_fraction`` < 1) is what lets
the softmax's denominator count the rows left out: without random rows it holds the hard
negatives only, and the loss is that of a far smaller class set. The random rows are drawn
from a generator seeded by ``(seed, rank, step, micro-batch)``: two runs with the same seed
select the same rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import numpy as np
import torch

from hybridfc.config import ConfigError
from hybridfc.log import log_dist
from hybridfc.parallel.groups import ProcessGroup, shard_range



@dataclass(frozen=True)
class Shard:
    """The rows a rank owns: ``[class_start, class_start + num_local)`` of ``num_classes``."""

    num_classes: int
    class_start: int
    num_local: int
    rank: int
    world_size: int
    group: ProcessGroup = None

    @property
    def largest(self) -> int:
        """Rows of the largest shard of the group (rank 0's)."""
        return shard_range(self.num_classes, self.world_size, 0)[1]

    def local_target(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` global labels -> row in this shard, or -1 where the class lives elsewhere."""
        target = labels - self.class_start
        target[(target < 0) | (target >= self.num_local)] = -1
        return target


@dataclass
class Selection:
    """One step's active set on one rank.

    Attributes:
        rows: ``(A,)`` int64 sorted local rows that enter the softmax.
        target: ``(B,)`` int64 position of each sample's class in ``rows``, -1 when elsewhere.
        positives_only: the positives alone filled (or exceeded) the budget.
        logit_offset: ``(A,)`` fp32 added to the logits of ``rows`` (the sampling correction),
            or None.
    """

    rows: torch.Tensor
    target: torch.Tensor
    positives_only: bool = False
    logit_offset: Optional[torch.Tensor] = None


def portion(rate: float, count: int) -> int:
    """⌊rate·count⌋ with the rate read as the decimal it is written as (0.1 of 156250 is 15625)."""
    return math.floor(Fraction(repr(rate)) * count)


def budget_rows(budget: "int | float", shard: Shard) -> int:
    """Rows per step on this rank: ⌊rate·C_r⌋ (at least 1, :func:`portion`) or a count, at most
    this shard.

    A count above the largest shard of the group is a :class:`ConfigError` on every rank.
    """
    if isinstance(budget, float):
        return max(1, portion(budget, shard.num_local))
    if budget > shard.largest:
        raise ConfigError(
            f"selection.budget: {budget} rows is above the shard ({shard.largest} rows: "
            f"{shard.num_classes} classes over {shard.world_size} ranks); use at most {shard.largest}, "
            "or a rate in (0, 1]"
        )
    return min(budget, shard.num_local)


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """A generator for one rank, step and micro-batch, independent of every other."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint64)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0] >> np.uint64(1)))
    return generator


class ClassSelection:
    """Base of the selections: ranks rows by the priority above and keeps ``budget`` of them.

    Subclasses implement :meth:`candidates`. :meth:`step_end` (called once per optimizer step by
    the head) and :meth:`state_dict` serve the selections that rebuild a structure from W.
    """

    dense = False
    """True for ``full``: the head computes every row and keeps a dense gradient."""

    uses_features = False
    """True when :meth:`candidates` looks at the features (so they must all have arrived)."""

    def __init__(self, shard: Shard, budget: "int | float", seed: int, sampling_correction: bool = True,
                 hard_fraction: float = 1.0) -> None:
        self.shard = shard
        self.budget = budget_rows(budget, shard)
        self.seed = seed
        self.sampling_correction = sampling_correction
        self.hard_fraction = hard_fraction
        self.positives_only_steps = 0
        self._row_set: Optional[RowSet] = None

    def candidates(self, labels: torch.Tensor, features: Optional[torch.Tensor],
                   weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Hard negatives of this shard, local rows nearest first (repeats allowed), or None.

        Called on every rank at every step, before the budget is looked at, so that it may run
        collectives."""
        return None

    def select(self, labels: torch.Tensor, features: Optional[torch.Tensor], weight: torch.Tensor, step: int,
               micro: int) -> Selection:
        """The active set for global ``labels (B,)`` and the gathered raw ``features (B, d)``
        (None unless :attr:`uses_features`)."""
        candidates = self.candidates(labels, features, weight)
        target = self.shard.local_target(labels)
        positives = torch.unique(target[target >= 0])
        if positives.numel() >= self.budget:
            return self._positives_only(positives, target)
        rows = self._rows(weight.device)
        rows.take(positives)
        if candidates is not None and candidates.numel():
            rows.take_first_new(candidates, portion(self.hard_fraction, self.budget - rows.count))
        free, count = self.shard.num_local - rows.count, self.budget - rows.count
        drawn = rows.take_random(count, step_generator(self.seed, self.shard.rank, step, micro, weight.device))
        active = rows.finish()
        offset = None
        if self.sampling_correction and 0 < count < free:
            offset = rows.which(active, drawn).to(torch.float32).mul_(math.log(free / count))
        return Selection(active, _remap(target, active), logit_offset=offset)

    def _rows(self, device: torch.device) -> "RowSet":
        if self._row_set is None or self._row_set.device != device:
            self._row_set = RowSet(self.shard.num_local, device)
        return self._row_set

    def _positives_only(self, positives: torch.Tensor, target: torch.Tensor) -> Selection:
        self.positives_only_steps += 1
        if positives.numel() > self.budget:
            log_dist(f"selection: {positives.numel()} positives on rank {self.shard.rank} exceed the budget of "
                     f"{self.budget} rows; this step uses the positives only "
                     f"({self.positives_only_steps} such steps so far)", ranks=None, level=logging.WARNING)
        return Selection(positives, _remap(target, positives), positives_only=True)

    def step_end(self, step: int, weight: torch.Tensor) -> None:
        """Called after optimizer step ``step`` (counted from 1) has updated ``weight``."""

    def close(self) -> None:
        """Stop any background work (the run is ending)."""

    def state_dict(self) -> dict[str, Any]:
        return {"positives_only_steps": self.positives_only_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.positives_only_steps = state["positives_only_steps"]


def _remap(target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each local target's position in the sorted ``rows``; -1 stays -1."""
    remapped = torch.searchsorted(rows, target.clamp_min(0))
    return torch.where(target >= 0, remapped, target)


class RowSet:
    """A set of rows of a shard being filled, at a cost proportional to the rows taken.

    Two persistent ``(C_r,)`` marks (taken, first position in a sequence) are set for the rows
    involved and reset by :meth:`finish`, so no step pays a pass over the whole shard.
    """

    _NONE = torch.iinfo(torch.int32).max

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self.device = device
        self._taken = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self._first = torch.full((num_rows,), self._NONE, dtype=torch.int32, device=device)
        self._parts: list[torch.Tensor] = []
        self.count = 0

    def take(self, rows: torch.Tensor) -> None:
        """Add distinct rows that are not in the set yet."""
        self._taken[rows] = True
        self._parts.append(rows)
        self.count += rows.numel()

    def take_first_new(self, sequence: torch.Tensor, limit: int) -> None:
        """Add the first ``limit`` distinct rows of ``sequence`` not in the set, in order of first
        appearance."""
        positions = torch.arange(sequence.numel(), dtype=torch.int32, device=self.device)
        self._first.scatter_reduce_(0, sequence, positions, reduce="amin")
        is_first = self._first[sequence] == positions
        self._first[sequence] = self._NONE
        self.take(sequence[is_first & ~self._taken[sequence]][:max(limit, 0)])

    def take_random(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Add ``count`` rows not in the set, uniformly at random without replacement; returns them.

        Draws with replacement and keeps the first new rows: uniform sampling without
        replacement at a cost proportional to ``count``. When the rows asked for are a large
        part of those free, a permutation of the free rows is cheaper."""
        free, parts_before = self._taken.numel() - self.count, len(self._parts)
        if count <= 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if 4 * count >= free:
            pool = torch.nonzero(~self._taken).squeeze(1)
            if count < free:
                pool = pool[torch.randperm(free, generator=generator, device=self.device)[:count]]
            self.take(pool)
            return pool
        while count > 0:
            draw = torch.randint(self._taken.numel(), (count + count // 4 + 16,), generator=generator,
                                 device=self.device)
            before = self.count
            self.take_first_new(draw, count)
            count -= self.count - before
        return torch.cat(self._parts[parts_before:])

    def which(self, rows: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
        """``(len(rows),)`` bool: which of ``rows`` are in ``among``, both rows of the shard, at a
        cost proportional to the two (the set must be empty: between :meth:`finish` and the next
        :meth:`take`)."""
        self._taken[among] = True
        found = self._taken[rows]
        self._taken[among] = False
        return found

    def finish(self) -> torch.Tensor:
        """The rows taken, sorted ``(A,)``; the set is empty again afterwards."""
        if self.count == self._taken.numel():
            rows = torch.arange(self.count, device=self.device)
        elif self._parts:
            rows = torch.cat(self._parts).sort().values
        else:
            rows = torch.empty(0, dtype=torch.int64, device=self.device)
        self._taken[rows] = False
        self._parts, self.count = [], 0
        return rows
