"""Rebuilding a structure derived from the class rows (a KNN graph, an ANN index) off the
critical path, with a swap at a step every rank agrees on.

Timeline with ``interval`` T and ``delay`` D (steps counted from 1, after the optimizer update)::

    first use      build synchronously from the current rows (before the first step needing it)
    step k·T       snapshot the normalised rows; a background thread builds from the snapshot
    step k·T + D   swap the new structure in (the build is normally long finished)

The snapshot and the swap happen at step numbers, never at "whenever the thread is done", so a
run is reproducible: steps k·T+1 … k·T+D use the old structure on every rank, whatever the
machine's speed.

**No collective runs on the background thread.** A builder that needs the other ranks is written
as build steps (:mod:`hybridfc.selection.build_steps`): the thread computes and hands each
exchange over; at each step boundary while a build is in flight the ranks agree (one all-gather
of a state per rank) and, when every rank's build is waiting for the same exchange, the training
thread runs it. So a script may end at any moment, with or without ``destroy_process_group()``:
at exit the thread is told to stop, finishes what it is computing and is joined; nothing is left
inside a collective. A build that fails raises at the next step boundary on every rank: its own
error on the rank where it failed, a :class:`~hybridfc.parallel.collectives.RankError` naming that
rank on the others.

A build needs a step boundary for each of its exchanges (a knn graph on N ranks: N, and one more
for an approximate index's measurement), so ``rebuild_delay`` should exceed that count as well
as the build's computing time. A build still running at its swap step on some rank is *late*. With ``late="postpone"`` (the
default) no step waits for it: it is swapped in at the first step boundary at which it is done on
every rank; the run is then reproducible only as long as no build is late. With ``late="wait"``
the swap step waits for the build (running its remaining exchanges) and the run stays
reproducible. Either way a late build is logged with the ``rebuild_delay``, in steps of the
measured step time, that would have hidden it. No new snapshot is taken while a build is in flight.
"""

from __future__ import annotations

import atexit
import enum
import inspect
import logging
import math
import threading
import time
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from hybridfc.log import log_dist
from hybridfc.parallel.collectives import exchange_or_raise
from hybridfc.parallel.groups import ProcessGroup
from hybridfc.selection.build_steps import BuildSteps, Exchange, run_inline

Builder = Callable[[torch.Tensor], Any]
"""Builds the structure from a snapshot: ``(C_r, d)`` L2-normalised fp32 rows on the CPU; returns
the structure, or build steps (a generator) when it needs exchanges with the other ranks."""

_NOTICEABLE_WAIT_S = 0.05


def snapshot(weight: torch.Tensor) -> torch.Tensor:
    """``(C_r, d)`` rows -> a normalised fp32 copy on the CPU, independent of later updates."""
    return F.normalize(weight.detach().to(device="cpu", dtype=torch.float32), dim=1)


def build_now(builder: Builder, rows: torch.Tensor) -> Any:
    """The structure from ``rows``, built on this thread (exchanges included)."""
    built = builder(rows)
    return run_inline(built) if inspect.isgenerator(built) else built


class State(enum.IntEnum):
    """Where a background build is: what its rank tells the others at a step boundary."""

    COMPUTING = 0
    WAITING = 1   # for the training thread to run an exchange
    DONE = 2


class _Cancelled(Exception):
    """The process is exiting: the build stops at its next exchange."""


class _Build(threading.Thread):
    """One background build: computes, hands each exchange to the training thread, keeps its
    result or its exception."""

    def __init__(self, builder: Builder, rows: torch.Tensor) -> None:
        super().__init__(name="hybridfc-rebuild", daemon=True)
        self.builder, self.rows = builder, rows
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.seconds = 0.0
        self.launched = time.perf_counter()
        self.state = State.COMPUTING
        self.exchanges = 0
        self._request: Optional[Exchange] = None
        self._reply: Any = None
        self._handed_over = threading.Event()
        self._replied = threading.Event()
        self._cancelled = False
        _LIVE_BUILDS.add(self)

    def run(self) -> None:
        start = time.perf_counter()
        try:
            built = self.builder(self.rows)
            self.result = self._drive(built) if inspect.isgenerator(built) else built
        except BaseException as exc:
            self.error = exc
        self.seconds = time.perf_counter() - start
        self.state = State.DONE
        self._handed_over.set()

    def _drive(self, steps: BuildSteps) -> Any:
        try:
            request = next(steps)
            while True:
                request = steps.send(self._hand_over(request))
        except StopIteration as finished:
            return finished.value

    def _hand_over(self, request: Exchange) -> Any:
        """Wait for the training thread to run ``request``; its result."""
        self._request, self.state = request, State.WAITING
        self._handed_over.set()
        self._replied.wait()
        self._replied.clear()
        if self._cancelled:
            raise _Cancelled()
        return self._reply

    def wait_handed_over(self) -> None:
        """Block until the build waits for an exchange or is done."""
        self._handed_over.wait()

    def run_exchange(self) -> None:
        """On the training thread: run the exchange the build waits for and hand back its result."""
        request, self._request = self._request, None
        self._handed_over.clear()
        self.state = State.COMPUTING
        try:
            self._reply = request()
        except BaseException:
            self.cancel()
            raise
        self.exchanges += 1
        self._replied.set()

    def cancel(self) -> None:
        """Stop at the next exchange (the computing under way is finished)."""
        self._cancelled = True
        self._replied.set()


_LIVE_BUILDS: "weakref.WeakSet[_Build]" = weakref.WeakSet()


@atexit.register
def _stop_builds_at_exit() -> None:
    """Builds in flight at exit stop at their next exchange; none is left inside a C++ call."""
    for build in list(_LIVE_BUILDS):
        build.cancel()
        build.join()


class BackgroundRebuild:
    """Keeps the current structure and rebuilds it every ``interval`` steps in the background.

    Args:
        builder: snapshot ``(C_r, d)`` -> structure, or build steps that yield their exchanges
            (:mod:`hybridfc.selection.build_steps`); runs in a thread.
        interval: steps between snapshots (0: build once, never again).
        delay: steps between a snapshot and its swap (1 ≤ delay ≤ interval).
        name: what is rebuilt, for the logs.
        late: ``"postpone"`` or ``"wait"``, what a swap step does with a late build.
        group: the ranks that build together (the training group; its collectives run on the
            training thread, inside :meth:`step_end`).

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
            self.current = build_now(self.builder, snapshot(weight))
            self.built_from_step = step
            self.build_seconds.append(time.perf_counter() - start)
            log_dist(f"{self.name}: first build took {self.build_seconds[-1]:.2f} s")
        return self.current

    def step_end(self, step: int, weight: torch.Tensor) -> None:
        """After optimizer step ``step``: move a build in flight on by an exchange, swap it in when
        due (or overdue and done on every rank), then start one if a snapshot is due."""
        if self._pending is not None:
            due = step >= self._pending_step + self.delay
            started = time.perf_counter()
            done = self._finish() if due and self.late == "wait" else self._advance()
            if due and done:
                self._swap(step, started)
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

    def _states(self) -> list[tuple[State, int]]:
        """Every rank's build state and exchanges run so far; raises on every rank if a build
        failed there, or if the ranks' builds wait for different exchanges."""
        build = self._pending
        state, error = build.state, None   # read once: the thread sets error before DONE
        if state == State.DONE and build.error is not None:
            error = RuntimeError(f"hybridfc: the {self.name} rebuild from step {self._pending_step} failed: "
                                 f"{type(build.error).__name__}: {build.error}")
            error.__cause__ = build.error
        try:
            rows = exchange_or_raise((int(state), build.exchanges), error,
                                     f"the {self.name} rebuild from step {self._pending_step}", self.group)
            if len({exchanges for _, exchanges in rows}) > 1 and all(s == State.WAITING for s, _ in rows):
                raise RuntimeError(f"hybridfc: the {self.name} rebuilds of the ranks wait for different exchanges "
                                   f"(exchanges run so far, by rank: {[exchanges for _, exchanges in rows]})")
        except BaseException:
            self._pending = None
            raise
        return [(State(s), exchanges) for s, exchanges in rows]

    def _advance(self) -> bool:
        """Run the exchange every rank's build waits for, if they all do; True when all are done."""
        states = [state for state, _ in self._states()]
        if all(state == State.WAITING for state in states):
            self._pending.run_exchange()
        return all(state == State.DONE for state in states)

    def _finish(self) -> bool:
        """Run the build to its end on every rank, its remaining exchanges included."""
        while True:
            self._pending.wait_handed_over()
            if self._advance():
                return True

    def _swap(self, step: int, started: float) -> None:
        build = self._pending
        build.join()
        wait = time.perf_counter() - started
        self._pending = None
        self.current, self.built_from_step = build.result, self._pending_step
        late_steps = step - (self._pending_step + self.delay)
        self.waits.append(wait if self.late == "wait" else 0.0)
        self.late_steps.append(late_steps)
        self.build_seconds.append(build.seconds)
        message = (f"{self.name}: swapped in the rebuild from step {self._pending_step} at step {step} "
                   f"(built in {build.seconds:.2f} s, waited {wait:.2f} s, {late_steps} steps late)")
        late = (self.late == "wait" and wait > _NOTICEABLE_WAIT_S) or late_steps > 0
        if late:
            seconds_per_step = (started - build.launched) / max(1, step - self._pending_step)
            needed = max(math.ceil(1.2 * build.seconds / max(seconds_per_step, 1e-9)), build.exchanges + 1)
            message += (f"; a rebuild_delay of about {needed} steps (now {self.delay}) would hide the build "
                        f"(it computes for {build.seconds:.2f} s and runs {build.exchanges} exchanges, one per step)")
        log_dist(message, level=logging.WARNING if late else logging.INFO)

    def pending_snapshot(self) -> Optional[tuple[torch.Tensor, int]]:
        """The snapshot and step of the build in flight, if any (for checkpoints)."""
        return None if self._pending is None else (self._pending.rows, self._pending_step)

    def wait(self) -> None:
        """Run the build in flight (if any) to its end on every rank, without swapping it in."""
        if self._pending is not None:
            self._finish()

    def close(self) -> None:
        """Drop the build in flight (if any): it stops at its next exchange and is joined."""
        build, self._pending = self._pending, None
        if build is not None:
            build.cancel()
            build.join()
