"""The step clock of row-sparse momentum SGD against a step-by-step float64 replay.

Rows are updated on random subsets of steps with a learning rate that changes every step; some
rows miss well over a hundred steps in a row. The replay applies every missed step one at a
time: ``b ← m·b`` and ``w ← (1 - lr·wd/(1 - m))·w``.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hybridfc.head.row_clock import RowClock

ROWS = 12
STEPS = 1100
WEIGHT_DECAY = 0.05


def replayed(last_step: int, step: int, lrs: list[float], momentum: float) -> tuple[float, float]:
    """(shrink, decay) at ``step`` of a row last updated at ``last_step``, one missed step at a time."""
    shrink, decay = 1.0, 1.0
    for missed in range(last_step + 1, step):
        shrink *= 1 - lrs[missed] * WEIGHT_DECAY / (1 - momentum)
        decay *= momentum
    return shrink, decay * momentum


def schedule(seed: int) -> tuple[list[float], list[torch.Tensor]]:
    """Per step (1-based) a learning rate and the rows it updates; row 0 sleeps for long
    stretches and row 1 is never updated before step 1050 (past the clock's first 1024 steps)."""
    gen = torch.Generator().manual_seed(seed)
    lrs = [0.0] + (torch.rand(STEPS, generator=gen, dtype=torch.float64) * 0.2).tolist()
    rows = []
    for step in range(1, STEPS + 1):
        chosen = torch.rand(ROWS, generator=gen) < 0.3
        chosen[0] = step in (3, 150, 151, 1090)
        chosen[1] = step >= 1050 and bool(chosen[1])
        rows.append(chosen.nonzero().flatten())
    return lrs, rows


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_clock_equals_a_step_by_step_replay(momentum):
    lrs, rows = schedule(seed=int(momentum * 10))
    clock = RowClock.create(ROWS, torch.device("cpu"))
    last = [0] * ROWS
    for step in range(1, STEPS + 1):
        shrink, decay = clock.tick(rows[step - 1], lrs[step], momentum, WEIGHT_DECAY)
        expected = torch.tensor([replayed(last[r], step, lrs, momentum) for r in rows[step - 1].tolist()],
                                dtype=torch.float64).reshape(-1, 2)
        assert_close(shrink, expected[:, :1], rtol=1e-12, atol=0)
        assert_close(decay, expected[:, 1:], rtol=1e-12, atol=0)
        for r in rows[step - 1].tolist():
            last[r] = step


def test_clock_survives_its_state_dict():
    """A clock rebuilt from its state (as after a checkpoint) ticks exactly like the original."""
    lrs, rows = schedule(seed=3)
    clock = RowClock.create(ROWS, torch.device("cpu"))
    for step in range(1, 1030):
        clock.tick(rows[step - 1], lrs[step], 0.9, WEIGHT_DECAY)
    copy = RowClock.from_state({name: value.clone() for name, value in clock.to_state().items()})
    for step in range(1030, STEPS + 1):
        for a, b in zip(clock.tick(rows[step - 1], lrs[step], 0.9, WEIGHT_DECAY),
                        copy.tick(rows[step - 1], lrs[step], 0.9, WEIGHT_DECAY), strict=True):
            assert torch.equal(a, b)


def test_weight_decay_that_would_flip_the_rows_is_refused():
    clock = RowClock.create(ROWS, torch.device("cpu"))
    with pytest.raises(ValueError, match="lr \\* weight_decay / \\(1 - momentum\\)"):
        clock.tick(torch.tensor([0]), lr=1.0, momentum=0.9, weight_decay=0.1)
