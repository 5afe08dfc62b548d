"""What hybridfc sends between ranks, per collective kind: calls, bytes on the wire, exposed time.

Every collective of :mod:`hybridfc.parallel.collectives` records itself in the process-wide
:data:`LEDGER`: one call, the bytes this rank sends as the backend really moves them
(:mod:`hybridfc.parallel.wire`), and the seconds the training thread spent blocked in it,
inside a synchronous collective or in ``wait()`` on an asynchronous one. That last figure is
the *exposed* communication: time a step could not hide behind compute. Every collective runs on
a thread of the training step (the training loop's, or autograd's for a backward pass); no
background thread talks to other ranks. On CUDA a collective blocks the host only until it is
enqueued, so there the exposed time is host time, not the stream's.

Readers keep their own place in the ledger:

>>> since_last = StatsCursor()
>>> stats = since_last.take()                  # CommunicationStats since the previous take()
>>> stats["all_gather"].bytes_sent, stats.total.exposed_seconds
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional


@dataclass(frozen=True)
class Traffic:
    """Calls, bytes this rank sent, and seconds the training thread was blocked."""

    calls: int = 0
    bytes_sent: int = 0
    exposed_seconds: float = 0.0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.calls + other.calls, self.bytes_sent + other.bytes_sent,
                       self.exposed_seconds + other.exposed_seconds)

    def __sub__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.calls - other.calls, self.bytes_sent - other.bytes_sent,
                       self.exposed_seconds - other.exposed_seconds)


@dataclass(frozen=True)
class CommunicationStats:
    """Traffic per collective kind (``"all_gather"``, ``"all_reduce"``, ``"all_to_all"``,
    ``"reduce_scatter"``, ``"send"``, ``"barrier"``); kinds never used are absent."""

    by_kind: dict[str, Traffic] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> Traffic:
        return self.by_kind.get(kind, Traffic())

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.by_kind))

    @property
    def total(self) -> Traffic:
        return sum(self.by_kind.values(), Traffic())

    def __sub__(self, earlier: "CommunicationStats") -> "CommunicationStats":
        kinds = {kind: self[kind] - earlier[kind] for kind in self.by_kind}
        return CommunicationStats({kind: t for kind, t in kinds.items() if t != Traffic()})

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {kind: vars(self.by_kind[kind]).copy() for kind in self}

    def summary(self) -> str:
        """One line: total bytes and exposed seconds, then each kind's share."""
        total = self.total
        parts = ", ".join(f"{kind} {t.calls} calls {_decimal_bytes(t.bytes_sent)} {t.exposed_seconds * 1e3:.1f} ms"
                          for kind, t in ((k, self.by_kind[k]) for k in self))
        return (f"{_decimal_bytes(total.bytes_sent)} sent, {total.exposed_seconds:.3f} s exposed"
                + (f" ({parts})" if parts else ""))


def _decimal_bytes(nbytes: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal prefixes, as link speeds are quoted)."""
    for size, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


class Ledger:
    """The running totals of one process, safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_kind: dict[str, Traffic] = {}

    def record(self, kind: str, calls: int = 0, bytes_sent: int = 0, exposed_seconds: float = 0.0) -> None:
        with self._lock:
            self._by_kind[kind] = self._by_kind.get(kind, Traffic()) + Traffic(calls, bytes_sent, exposed_seconds)

    def totals(self) -> CommunicationStats:
        with self._lock:
            return CommunicationStats(dict(self._by_kind))


LEDGER = Ledger()
"""Every collective of this process is recorded here."""


class StatsCursor:
    """A reader's place in a ledger: :meth:`take` returns what was recorded since its last call."""

    def __init__(self, ledger: Optional[Ledger] = None) -> None:
        self.ledger = ledger or LEDGER
        self._seen = self.ledger.totals()

    def take(self) -> CommunicationStats:
        now = self.ledger.totals()
        since, self._seen = now - self._seen, now
        return since
