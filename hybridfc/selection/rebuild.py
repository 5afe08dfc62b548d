"""Rebuilding a structure derived from the class rows (a KNN graph, an ANN index) off the
critical path, with a swap at a step every rank agrees on.

Timeline with ``interval`` T and ``delay`` D (steps counted from 1, after the optimizer update)::

    first use      build synchronously from the current rows (before the first step needing it)
    step k·T       snapshot the normalised rows; a background thread builds from the snapshot
    step k·T + D   swap the new structure in (the build is normally long finished)

The snapshot and the swap happen at step numbers, never at "whenever the thread is done", so a
run is reproducible: steps k·T+1 … k·T+D use the old structure on every rank, whatever the
machine's speed. The thread's collectives run on a process group of their own, so they never
interleave with the training step's.

A build still running at its swap step on some rank is *late*. With ``late="postpone"`` (the
default) no step waits for it: the ranks agree, with one all-reduce of a flag per step, on the
first step at which every rank's build is done, and swap there; the run is then reproducible
only as long as no build is late. With ``late="wait"`` the swap step waits for the build and
the run stays reproducible. Either way a late build is logged with the ``rebuild_delay``, in
steps of the measured step time, that would have hidden it. No new snapshot is taken while a
build is in flight.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from hybridfc.log import log_dist
from hybridfc.parallel.collectives import all_reduce
from hybridfc.parallel.groups import ProcessGroup

Builder = Callable[[torch.Tensor], Any]
"""Builds the structure from a snapshot: ``(C_r, d)`` L2-normalised fp32 rows on the CPU."""

_NOTICEABLE_WAIT_S = 0.05


def snapshot(weight: torch.Tensor) -> torch.Tensor:
    """``(C_r, d)`` rows -> a normalised fp32 copy on the CPU, independent of later updates."""
    return F.normalize(weight.detach().to(device="cpu", dtype=torch.float32), dim=1)


class _Build(threading.Thread):
    """One background build; keeps its result or its exception for :meth:`BackgroundRebuild.step_end`."""

    def __init__(self, builder: Builder, rows: torch.Tensor) -> None:
        super().__init__(name="hybridfc-rebuild", daemon=True)
        self.builder, self.rows = builder, rows
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.seconds = 0.0
        self.launched = time.perf_counter()

    def run(self) -> None:
        start = time.perf_counter()
        try:
            self.result = self.builder(self.rows)
        except BaseException as exc:
            self.error = exc
        self.seconds = time.perf_counter() - start


class BackgroundRebuild:
    """Keeps the current structure and rebuilds it every ``interval`` steps in the background.

    Args:
        builder: snapshot ``(C_r, d)`` -> structure; runs in a thread, so any collective in it
            must use a process group of its own.
        interval: steps between snapshots (0: build once, never again).
        delay: steps between a snapshot and its swap (1 ≤ delay ≤ interval).
        name: what is rebuilt, for the logs.
        late: ``"postpone"`` or ``"wait"``, what a swap step does with a late build.
        group: the ranks that must agree on a postponed swap (the training group; collectives
            on it run in the main thread, inside :meth:`step_end`).

    Attributes:
        current: the structure in use (None until the first build).
        built_from_step: the step of the snapshot ``current`` was built from (0: the first build).
        waits: seconds each swap waited for its build (0.0 unless ``late="wait"``).
        late_steps: steps each swap came after its scheduled step (0 unless ``late="postpone"``).
        build_seconds: how long each build took.
    """

    def __init__(self, builder: Builder, interval: int, delay: int, name: str, late: str = "postpone",
                 group: ProcessGroup = None) -> None:
        if late not in ("postpone", "wait"):
            raise ValueError(f"hybridfc: late must be 'postpone' or 'wait', got {late!r}")
        self.builder, self.interval, self.delay, self.name = builder, interval, delay, name
        self.late, self.group = late, group
        self.current: Any = None
        self.built_from_step = -1
        self.waits: list[float] = []
        self.late_steps: list[int] = []
        self.build_seconds: list[float] = []
        self._pending: Optional[_Build] = None
        self._pending_step = -1

    def ensure_built(self, weight: torch.Tensor, step: int) -> Any:
        """The current structure, built now from ``weight`` if there is none yet."""
        if self.current is None:
            start = time.perf_counter()
            self.current = self.builder(snapshot(weight))
            self.built_from_step = step
            self.build_seconds.append(time.perf_counter() - start)
            log_dist(f"{self.name}: first build took {self.build_seconds[-1]:.2f} s")
        return self.current

    def step_end(self, step: int, weight: torch.Tensor) -> None:
        """After optimizer step ``step``: swap a build due now (or overdue and done on every
        rank), then start one if a snapshot is due and none is in flight."""
        if self._pending is not None and step >= self._pending_step + self.delay:
            if self.late == "wait" or self._done_on_every_rank(weight.device):
                self._swap(step)
        if self.interval and step % self.interval == 0 and self.current is not None:
            if self._pending is None:
                self.start(snapshot(weight), step)
            else:
                log_dist(f"{self.name}: the rebuild from step {self._pending_step} is still running at step {step}; "
                         "no new snapshot until it is swapped in", level=logging.WARNING)

    def start(self, rows: torch.Tensor, step: int) -> None:
        """Build from the snapshot ``rows`` taken at ``step`` in the background."""
        self._pending, self._pending_step = _Build(self.builder, rows), step
        self._pending.start()

    def _done_on_every_rank(self, device: torch.device) -> bool:
        done = torch.tensor([0 if self._pending.is_alive() else 1], dtype=torch.int32, device=device)
        return bool(all_reduce(done, "min", self.group).item())

    def _swap(self, step: int) -> None:
        build, started = self._pending, time.perf_counter()
        build.join()
        wait = time.perf_counter() - started
        self._pending = None
        if build.error is not None:
            raise RuntimeError(f"hybridfc: the {self.name} rebuild from step {self._pending_step} failed") from build.error
        self.current, self.built_from_step = build.result, self._pending_step
        late_steps = step - (self._pending_step + self.delay)
        self.waits.append(wait)
        self.late_steps.append(late_steps)
        self.build_seconds.append(build.seconds)
        message = (f"{self.name}: swapped in the rebuild from step {self._pending_step} at step {step} "
                   f"(built in {build.seconds:.2f} s, waited {wait:.2f} s, {late_steps} steps late)")
        late = wait > _NOTICEABLE_WAIT_S or late_steps > 0
        if late:
            seconds_per_step = (started - build.launched) / max(1, step - self._pending_step)
            needed = math.ceil(1.2 * build.seconds / max(seconds_per_step, 1e-9))
            message += f"; a rebuild_delay of about {needed} steps (now {self.delay}) would hide the build"
        log_dist(message, level=logging.WARNING if late else logging.INFO)

    def pending_snapshot(self) -> Optional[tuple[torch.Tensor, int]]:
        """The snapshot and step of the build in flight, if any (for checkpoints)."""
        return None if self._pending is None else (self._pending.rows, self._pending_step)

    def wait(self) -> None:
        """Block until the build in flight (if any) has finished, without swapping it in."""
        if self._pending is not None:
            self._pending.join()
