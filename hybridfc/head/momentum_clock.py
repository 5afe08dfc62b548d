"""The step clock of row-sparse momentum SGD: what the steps a row missed would have done to it.

Dense momentum SGD keeps moving a row on the steps where its gradient is zero: after its last
update at step ``t0`` with buffer ``b``, step ``s > t0`` multiplies the buffer by ``m`` and moves
the row by ``-lr_s · m^(s - t0) · b``. A sparse update touches a row only when it is selected
again, at step ``t``; to land where the dense update would (over the missed steps, without
weight decay, which only applies on the steps that select the row), it first applies

* the *coast* ``-c · b`` with ``c = sum_{s=t0+1}^{t-1} lr_s · m^(s - t0)``, the missed steps'
  movement, and
* the *decay* ``b ← m^(t - t0) · b``, the buffer the dense update would have at step ``t``
  (the current step's ``m`` included),

then the ordinary update ``b ← b + g + wd · w; w ← w - lr_t · b``.

``c`` needs the learning rates of the missed steps. The clock keeps those of the last ``W``
applied steps, with ``m^W`` below fp64's resolution (343 steps for m = 0.9, 3,666 for 0.99), and
one number per step older than that: ``c`` of a row whose last update was that step and that
has missed every step since (beyond ``W`` missed steps ``c`` no longer changes in fp64). That is
8 bytes per applied step, 8 MB over a million steps.

>>> clock = MomentumClock.create(momentum=0.9, num_rows=shard_rows, device=weight.device)
>>> decay, coast = clock.tick(rows, lr)          # (n, 1) fp64 each, then update the rows
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FP64_RESOLUTION = 2.0 ** -53


def coast_window(momentum: float) -> int:
    """Steps after which ``momentum^steps`` is below fp64's resolution."""
    return max(1, math.ceil(math.log(_FP64_RESOLUTION) / math.log(momentum)))


@dataclass
class MomentumClock:
    """Per-row last-update steps and the learning-rate history of row-sparse momentum SGD.

    Tensors (all kept in the optimizer's state, so they are checkpointed):
    ``applied_steps`` 0-d int64; ``row_last_step`` ``(rows,)`` int64, 0 for never updated;
    ``recent_lr`` ``(W,)`` fp64, the lr of applied step ``t - i`` at index ``i - 1``;
    ``settled_coast`` ``(capacity,)`` fp64, at index ``u`` the coast of a row last updated at
    step ``u`` once it has missed ``W`` steps.
    """

    momentum: float
    applied_steps: torch.Tensor
    row_last_step: torch.Tensor
    recent_lr: torch.Tensor
    settled_coast: torch.Tensor

    STATE = ("applied_steps", "row_last_step", "recent_lr", "settled_coast")

    @classmethod
    def create(cls, momentum: float, num_rows: int, device: torch.device) -> "MomentumClock":
        return cls(momentum,
                   torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros(num_rows, dtype=torch.int64, device=device),
                   torch.zeros(coast_window(momentum), dtype=torch.float64, device=device),
                   torch.zeros(1024, dtype=torch.float64, device=device))

    @classmethod
    def from_state(cls, momentum: float, state: dict[str, torch.Tensor]) -> "MomentumClock":
        return cls(momentum, *(state[name] for name in cls.STATE))

    def to_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.STATE}

    def tick(self, rows: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance to the next applied step, which updates ``rows`` ``(n,)`` with learning rate
        ``lr``; returns each row's decay and coast, ``(n, 1)`` fp64."""
        step = int(self.applied_steps) + 1
        window = self.recent_lr.numel()
        coasts = self._coasts_by_missed_steps()
        self._settle(step - 1 - window, coasts[window])
        last = self.row_last_step[rows]
        missed = step - 1 - last
        recent = missed <= window
        coast = torch.where(recent, coasts[missed.clamp(max=window)],
                            self.settled_coast[torch.where(recent, 0, last)])
        decay = torch.pow(self.momentum, (missed + 1).double())
        self.row_last_step[rows] = step
        self.applied_steps.fill_(step)
        self.recent_lr.copy_(torch.cat([self.recent_lr.new_tensor([lr]), self.recent_lr[:-1]]))
        return decay.unsqueeze(1), coast.unsqueeze(1)

    def _coasts_by_missed_steps(self) -> torch.Tensor:
        """``(W + 1,)`` fp64: at index ``d`` the coast of a row that missed the last ``d`` steps,
        ``sum_{i<d} recent_lr[i] · m^(d - i)``."""
        window = self.recent_lr.numel()
        exponents = torch.arange(window + 1, dtype=torch.float64, device=self.recent_lr.device)
        scaled = torch.cumsum(self.recent_lr * torch.pow(self.momentum, -exponents[:-1]), 0)
        return torch.cat([scaled.new_zeros(1), scaled * torch.pow(self.momentum, exponents[1:])])

    def _settle(self, last_step: int, coast: torch.Tensor) -> None:
        """Record the final coast of rows last updated at ``last_step`` (none before step 1)."""
        if last_step < 1:
            return
        if last_step >= self.settled_coast.numel():
            grown = self.settled_coast.new_zeros(2 * self.settled_coast.numel())
            grown[: self.settled_coast.numel()] = self.settled_coast
            self.settled_coast = grown
        self.settled_coast[last_step] = coast
