"""A build written as steps: computing in between, exchanges with the other ranks handed out.

A builder that needs collectives is a generator: it computes, ``yield``s each exchange it needs
as an :data:`Exchange` (a function of no arguments that runs the collectives and returns what
they gathered), gets that result back from the ``yield``, and ``return``s the structure. Whoever
drives it decides where the exchanges run: :func:`run_inline` right away, on the calling thread;
a background rebuild (:mod:`hybridfc.selection.rebuild`) on the training thread at step
boundaries, so that no collective ever runs on a background thread.

>>> def steps(rows):
...     total = yield lambda: all_reduce(rows.sum(0), "sum", group)
...     return total / world_size
>>> run_inline(steps(rows))
"""

from __future__ import annotations

from typing import Any, Callable, Generator

Exchange = Callable[[], Any]
"""The collectives a build needs next; their result is sent back into the build."""

BuildSteps = Generator[Exchange, Any, Any]
"""A build as a generator of exchanges; its return value is the structure built."""


def run_inline(steps: BuildSteps) -> Any:
    """Drive a build to its end on this thread, running each exchange as it comes."""
    try:
        exchange = next(steps)
        while True:
            exchange = steps.send(exchange())
    except StopIteration as finished:
        return finished.value
