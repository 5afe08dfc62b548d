"""The step clock of row-sparse momentum SGD against a step-by-step float64 replay.

Rows are updated on random subsets of steps with a learning rate that changes every step; some
rows miss far more steps than the clock's window, so both its recent-lr window and its settled
history are read. The replay applies every missed step one at a time: ``b ← m·b`` and
``w ← (1 - lr·wd/(1 - m))·w - lr·b``, tracking how ``w`` depends on the row's weight and buffer
at its last update.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hybridfc.head.row_clock import RowClock, coast_window

ROWS = 12
STEPS = 260
WEIGHT_DECAY = 0.05


def replayed(last_step: int, step: int, lrs: list[float], momentum: float) -> tuple[float, float, float]:
    """(shrink, coast, decay) at ``step`` of a row last updated at ``last_step``: ``w`` becomes
    ``shrink·w - coast·b`` and ``b`` becomes ``decay·b``, one missed step at a time (a row never
    updated has no momentum: its coast is not compared)."""
    shrink, coast, buffer = 1.0, 0.0, 1.0
    for missed in range(last_step + 1, step):
        buffer *= momentum
        factor = 1 - lrs[missed] * WEIGHT_DECAY / (1 - momentum)
        shrink, coast = factor * shrink, factor * coast + lrs[missed] * buffer
    return shrink, coast, buffer * momentum


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


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.7])
def test_clock_equals_a_step_by_step_replay(momentum):
    assert coast_window(momentum) < 107  # row 0 misses 146 and 107 steps in a row
    lrs, rows = schedule(seed=int(momentum * 10))
    clock = RowClock.create(momentum, ROWS, torch.device("cpu"))
    last = [0] * ROWS
    for step in range(1, STEPS + 1):
        shrink, coast, decay = clock.tick(rows[step - 1], lrs[step], WEIGHT_DECAY)
        expected = torch.tensor([replayed(last[r], step, lrs, momentum) for r in rows[step - 1].tolist()],
                                dtype=torch.float64).reshape(-1, 3)
        assert_close(shrink, expected[:, :1], rtol=1e-12, atol=0)
        updated_before = torch.tensor([last[r] > 0 for r in rows[step - 1].tolist()], dtype=torch.bool)
        # the settled coast leaves out terms below m^W = 2^-53 of the first, which the strong decay
        # here (lr·wd/(1 - m) up to 9 % per step) shrinks less than the first: rtol 1e-10
        assert_close(coast[updated_before], expected[updated_before, 1:2], rtol=1e-10, atol=0)
        assert_close(decay, expected[:, 2:], rtol=1e-12, atol=0)
        for r in rows[step - 1].tolist():
            last[r] = step


def test_clock_survives_its_state_dict():
    """A clock rebuilt from its state (as after a checkpoint) ticks exactly like the original."""
    lrs, rows = schedule(seed=3)
    clock = RowClock.create(0.5, ROWS, torch.device("cpu"))
    for step in range(1, 120):
        clock.tick(rows[step - 1], lrs[step], WEIGHT_DECAY)
    copy = RowClock.from_state(0.5, {name: value.clone() for name, value in clock.to_state().items()})
    for step in range(120, STEPS + 1):
        for a, b in zip(clock.tick(rows[step - 1], lrs[step], WEIGHT_DECAY),
                        copy.tick(rows[step - 1], lrs[step], WEIGHT_DECAY), strict=True):
            assert torch.equal(a, b)


def test_weight_decay_that_would_flip_the_rows_is_refused():
    clock = RowClock.create(0.9, ROWS, torch.device("cpu"))
    with pytest.raises(ValueError, match="lr \\* weight_decay / \\(1 - momentum\\)"):
        clock.tick(torch.tensor([0]), lr=1.0, weight_decay=0.1)
