"""The step clock of row-sparse momentum SGD: what the steps a row missed would have done to it.

On a step whose gradient for a row is zero, dense momentum SGD still moves the row: its buffer
``b`` decays by ``m`` and carries it by ``-lr_s · b``, and weight decay shrinks it. A sparse
update touches a row only when it is selected again, at step ``t``; to land where the dense
update would, it first applies the missed steps ``s = t0+1 … t-1`` (``t0``: the row's last
update) one after the other, each

    b ← m · b;   w ← (1 - lr_s · wd / (1 - m)) · w - lr_s · b

with ``wd / (1 - m)`` the rate at which dense weight decay settles under momentum (a constant
pull ``wd · w`` is amplified by ``1 / (1 - m)``; exact when ``m = 0``). Unrolled, that is

* ``w ← S · w - c · b`` with the *shrink* ``S = prod_s (1 - lr_s · wd / (1 - m))`` and the
  *coast* ``c = sum_s lr_s · m^(s - t0) · (the shrink of the steps after s)``, and
* ``b ← m^(t - t0) · b``, the buffer's *decay*, the current step's ``m`` included,

then the ordinary update ``b ← b + g + wd · w; w ← w - lr_t · b``.

The clock keeps, per applied step ``u``, the log of the shrink of steps ``1 … u`` (a prefix
sum), the learning rates of the last ``W`` steps, ``m^W`` below fp64's resolution (343 steps for
m = 0.9, 3,666 for 0.99), and for each older step the coast of a row last updated there that
then missed ``W`` steps (the terms after those are below fp64's resolution; later steps only
shrink it). That is 16 bytes per applied step, 16 MB over a million steps.

>>> clock = RowClock.create(momentum=0.9, num_rows=shard_rows, device=weight.device)
>>> shrink, coast, decay = clock.tick(rows, lr, weight_decay)   # (n, 1) fp64 each
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FP64_RESOLUTION = 2.0 ** -53


def coast_window(momentum: float) -> int:
    """Steps after which ``momentum^steps`` is below fp64's resolution (1 without momentum)."""
    if momentum == 0:
        return 1
    return max(1, math.ceil(math.log(_FP64_RESOLUTION) / math.log(momentum)))


@dataclass
class RowClock:
    """Per-row last-update steps and the per-step history of row-sparse momentum SGD.

    Tensors (all kept in the optimizer's state, so they are checkpointed):
    ``applied_steps`` 0-d int64; ``row_last_step`` ``(rows,)`` int64, 0 for never updated;
    ``recent_lr`` ``(W,)`` fp64, the lr of applied step ``t - i`` at index ``i - 1``;
    ``step_history`` ``(capacity, 2)`` fp64, at row ``u`` the log-shrink of steps ``1 … u`` and
    the settled coast of a row last updated at step ``u``.
    """

    momentum: float
    applied_steps: torch.Tensor
    row_last_step: torch.Tensor
    recent_lr: torch.Tensor
    step_history: torch.Tensor

    STATE = ("applied_steps", "row_last_step", "recent_lr", "step_history")

    @classmethod
    def create(cls, momentum: float, num_rows: int, device: torch.device) -> "RowClock":
        return cls(momentum,
                   torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros(num_rows, dtype=torch.int64, device=device),
                   torch.zeros(coast_window(momentum), dtype=torch.float64, device=device),
                   torch.zeros(1024, 2, dtype=torch.float64, device=device))

    @classmethod
    def from_state(cls, momentum: float, state: dict[str, torch.Tensor]) -> "RowClock":
        return cls(momentum, *(state[name] for name in cls.STATE))

    def to_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.STATE}

    def tick(self, rows: torch.Tensor, lr: float, weight_decay: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance to the next applied step, which updates ``rows`` ``(n,)`` with learning rate
        ``lr`` and ``weight_decay``; returns each row's shrink, coast and decay, ``(n, 1)`` fp64."""
        step = int(self.applied_steps) + 1
        window = self.recent_lr.numel()
        self._reserve(step)
        log_shrink = self.step_history[:, 0]
        coasts = self._coasts_by_missed_steps(log_shrink[max(0, step - 1 - window): step])
        if step - 1 - window >= 1:
            self.step_history[step - 1 - window, 1] = coasts[window]
        last = self.row_last_step[rows]
        missed = step - 1 - last
        coast = coasts[missed.clamp(max=window)]
        settled = missed > window
        if bool(settled.any()):
            at = last[settled]
            coast[settled] = self.step_history[at, 1] * torch.exp(log_shrink[step - 1] - log_shrink[at + window])
        shrink = torch.exp(log_shrink[step - 1] - log_shrink[last])
        decay = torch.pow(self.momentum, (missed + 1).double())
        log_shrink[step] = log_shrink[step - 1] + _log_shrink_per_step(lr, weight_decay, self.momentum)
        self.row_last_step[rows] = step
        self.applied_steps.fill_(step)
        self.recent_lr.copy_(torch.cat([self.recent_lr.new_tensor([lr]), self.recent_lr[:-1]]))
        return shrink.unsqueeze(1), coast.unsqueeze(1), decay.unsqueeze(1)

    def _coasts_by_missed_steps(self, log_shrink: torch.Tensor) -> torch.Tensor:
        """``(W + 1,)`` fp64: at index ``d`` the coast of a row that missed the last ``d`` steps,
        ``sum_{i<d} recent_lr[i] · S_i · m^(d - i)`` with ``S_i`` the shrink of the last ``i``
        steps; ``log_shrink``: the prefix log-shrinks of up to the last ``W + 1`` steps."""
        window = self.recent_lr.numel()
        since = torch.zeros(window, dtype=torch.float64, device=self.recent_lr.device)
        newest_first = (log_shrink[-1] - log_shrink.flip(0))[:window]
        since[: newest_first.numel()] = newest_first
        exponents = torch.arange(window + 1, dtype=torch.float64, device=self.recent_lr.device)
        weighted = self.recent_lr * torch.exp(since) * torch.pow(self.momentum, -exponents[:-1])
        return torch.cat([weighted.new_zeros(1), torch.cumsum(weighted, 0) * torch.pow(self.momentum, exponents[1:])])

    def _reserve(self, step: int) -> None:
        """Room in ``step_history`` for rows ``0 … step``."""
        if step < self.step_history.shape[0]:
            return
        grown = self.step_history.new_zeros(2 * self.step_history.shape[0], 2)
        grown[: self.step_history.shape[0]] = self.step_history
        self.step_history = grown


def _log_shrink_per_step(lr: float, weight_decay: float, momentum: float) -> float:
    rate = lr * weight_decay / (1 - momentum)
    if rate >= 1:
        raise ValueError(f"hybridfc: lr * weight_decay / (1 - momentum) = {rate:g} must be below 1 "
                         f"(lr={lr}, weight_decay={weight_decay}, momentum={momentum}): weight decay "
                         "would flip the rows' sign")
    return math.log1p(-rate)
