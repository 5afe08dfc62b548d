"""The step clock of row-sparse momentum SGD against a step-by-step float64 replay.

Rows are updated on random subsets of steps with a learning rate that changes every step; some
rows miss far more steps than the clock's window, so both its recent-lr window and its settled
history are read. The replay applies every missed step one at a time.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hybridfc.head.momentum_clock import MomentumClock, coast_window

ROWS = 12
STEPS = 260


def replayed(last_step: int, step: int, lrs: list[float], momentum: float) -> tuple[float, float]:
    """(decay, coast) at ``step`` of a row last updated at ``last_step``, one missed step at a
    time (a row never updated has no momentum: its coast is not compared)."""
    decay, coast = 1.0, 0.0
    for missed in range(last_step + 1, step):
        decay *= momentum
        coast += lrs[missed] * decay
    return decay * momentum, coast


def schedule(seed: int) -> tuple[list[float], list[torch.Tensor]]:
    """Per step (1-based) a learning rate and the rows it updates; rows 0 and 1 sleep for long
    stretches (row 1 is never updated before step 200)."""
    gen = torch.Generator().manual_seed(seed)
    lrs = [0.0] + (torch.rand(STEPS, generator=gen, dtype=torch.float64) + 0.05).tolist()
    rows = []
    for step in range(1, STEPS + 1):
        chosen = torch.rand(ROWS, generator=gen) < 0.3
        chosen[0] = step in (3, 150, 151, 259)
        chosen[1] = step >= 200 and bool(chosen[1])
        rows.append(chosen.nonzero().flatten())
    return lrs, rows


@pytest.mark.parametrize("momentum", [0.5, 0.7])
def test_clock_equals_a_step_by_step_replay(momentum):
    assert coast_window(momentum) < 107  # row 0 misses 146 and 107 steps in a row
    lrs, rows = schedule(seed=int(momentum * 10))
    clock = MomentumClock.create(momentum, ROWS, torch.device("cpu"))
    last = [0] * ROWS
    for step in range(1, STEPS + 1):
        decay, coast = clock.tick(rows[step - 1], lrs[step])
        expected = torch.tensor([replayed(last[r], step, lrs, momentum) for r in rows[step - 1].tolist()],
                                dtype=torch.float64).reshape(-1, 2)
        assert_close(decay, expected[:, :1], rtol=1e-12, atol=0)
        updated_before = torch.tensor([last[r] > 0 for r in rows[step - 1].tolist()], dtype=torch.bool)
        assert_close(coast[updated_before], expected[updated_before, 1:], rtol=1e-12, atol=0)
        for r in rows[step - 1].tolist():
            last[r] = step
    assert clock.settled_coast.numel() >= STEPS - coast_window(momentum)


def test_clock_survives_its_state_dict():
    """A clock rebuilt from its state (as after a checkpoint) ticks exactly like the original."""
    lrs, rows = schedule(seed=3)
    clock = MomentumClock.create(0.5, ROWS, torch.device("cpu"))
    for step in range(1, 120):
        clock.tick(rows[step - 1], lrs[step])
    copy = MomentumClock.from_state(0.5, {name: value.clone() for name, value in clock.to_state().items()})
    for step in range(120, STEPS + 1):
        for a, b in zip(clock.tick(rows[step - 1], lrs[step]), copy.tick(rows[step - 1], lrs[step])):
            assert torch.equal(a, b)
