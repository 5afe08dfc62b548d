"""The step clock of row-sparse momentum SGD: what the steps a row missed do to it.

A sparse update touches a row only on the steps that select it. When a row is selected again
at step ``t`` after its last update at ``t0``, it first gets two things the missed steps
``s = t0+1 … t-1`` would have done to it under dense momentum SGD:

* its momentum buffer's *decay*, ``b ← m^(t - t0) · b`` (the current step's ``m`` included), so
  that an old push is not re-applied at full strength; and
* weight decay, as the *shrink* ``w ← S · w`` with ``S = prod_s (1 - lr_s · wd / (1 - m))``,
  the rate at which dense weight decay settles under momentum (a constant pull ``wd · w`` is
  amplified by ``1 / (1 - m)``; exact when ``m = 0``),

then the ordinary update ``b ← b + g + wd · w; w ← w - lr_t · b``. The movement the decaying
buffer would have carried the row on the missed steps is *not* applied: dense SGD would have
had gradients on those steps too, and for a hard negative, which is selected because samples
sit next to it, they push back; replaying the push alone cost the hard-negative selections
accuracy on the synthetic task (``benchmarks/RESULTS.md``).

The clock keeps, per applied step ``u``, the log of the shrink of steps ``1 … u`` (a prefix
sum, 8 bytes per applied step, 8 MB over a million steps) and each row's last update step.

>>> clock = RowClock.create(num_rows=shard_rows, device=weight.device)
>>> shrink, decay = clock.tick(rows, lr, momentum, weight_decay)   # (n, 1) fp64 each
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RowClock:
    """Per-row last-update steps and the prefix log-shrink of row-sparse momentum SGD.

    Tensors (all kept in the optimizer's state, so they are checkpointed):
    ``applied_steps`` 0-d int64; ``row_last_step`` ``(rows,)`` int64, 0 for never updated;
    ``log_shrink`` ``(capacity,)`` fp64, at index ``u`` the log-shrink of steps ``1 … u``.
    """

    applied_steps: torch.Tensor
    row_last_step: torch.Tensor
    log_shrink: torch.Tensor

    STATE = ("applied_steps", "row_last_step", "log_shrink")

    @classmethod
    def create(cls, num_rows: int, device: torch.device) -> "RowClock":
        return cls(torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros(num_rows, dtype=torch.int64, device=device),
                   torch.zeros(1024, dtype=torch.float64, device=device))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "RowClock":
        return cls(*(state[name] for name in cls.STATE))

    def to_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.STATE}

    def tick(self, rows: torch.Tensor, lr: float, momentum: float, weight_decay: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance to the next applied step, which updates ``rows`` ``(n,)``; returns each row's
        shrink and momentum decay, ``(n, 1)`` fp64."""
        step = int(self.applied_steps) + 1
        self._reserve(step)
        last = self.row_last_step[rows]
        shrink = torch.exp(self.log_shrink[step - 1] - self.log_shrink[last])
        decay = torch.pow(momentum, (step - last).double())
        self.log_shrink[step] = self.log_shrink[step - 1] + _log_shrink_per_step(lr, momentum, weight_decay)
        self.row_last_step[rows] = step
        self.applied_steps.fill_(step)
        return shrink.unsqueeze(1), decay.unsqueeze(1)

    def _reserve(self, step: int) -> None:
        """Room in ``log_shrink`` for indices ``0 … step``."""
        if step < self.log_shrink.numel():
            return
        grown = self.log_shrink.new_zeros(2 * self.log_shrink.numel())
        grown[: self.log_shrink.numel()] = self.log_shrink
        self.log_shrink = grown


def decay_rate(lr: float, momentum: float, weight_decay: float) -> float:
    """The share of a row that weight decay takes per step, amplified by the momentum:
    ``lr · wd / (1 − m)``; at 1 or more it would flip the row's sign."""
    return lr * weight_decay / (1 - momentum)


def _log_shrink_per_step(lr: float, momentum: float, weight_decay: float) -> float:
    rate = decay_rate(lr, momentum, weight_decay)
    if rate >= 1:
        raise ValueError(f"hybridfc: lr * weight_decay / (1 - momentum) = {rate:g} must be below 1 "
                         f"(lr={lr}, weight_decay={weight_decay}, momentum={momentum}): weight decay "
                         "would flip the rows' sign")
    return math.log1p(-rate)
