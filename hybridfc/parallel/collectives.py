"""Every exchange between ranks in hybridfc: collectives over an explicit group, sync or async.

Nothing outside :mod:`hybridfc.parallel` calls ``torch.distributed``. Each function here takes
``group`` (``None``: the default group; a program without ``torch.distributed`` is one rank)
and, where overlap is useful, ``async_op``: ``True`` returns a :class:`Pending` whose
``wait()`` returns what the synchronous call would have. With one rank nothing is sent and the
result is ready at once.

Each call is recorded in :data:`~hybridfc.parallel.accounting.LEDGER`: the bytes this rank
sends as the backend moves them (:mod:`hybridfc.parallel.wire`) and the time the caller was
blocked. Where backends differ, the layer picks the cheaper collective: a reduce-scatter is an
all-to-all and a local sum in rank order on gloo (gloo's own reduce-scatter sends as much as
an all-reduce), NCCL's reduce-scatter elsewhere.

=============================  ===============================================================
function                       what every rank gets
=============================  ===============================================================
:func:`all_reduce`             the elementwise sum / max / min, in place
:func:`all_gather`             ``(N·n, ...)``: every rank's ``(n, ...)`` in rank order
:func:`gather_padded`          ``(Σ sizes, ...)``: uneven row counts, padded on the wire
:func:`reduce_scatter_padded`  its own rows of the sum over ranks of a ``(Σ sizes, ...)`` tensor
:func:`all_gather_vector`      ``(N, k)``: one small vector per rank
:func:`sparse_sum`             the dense sum of every rank's ``k`` (index, value) pairs
:func:`ring_shift`             the tensors of rank ``r − 1`` (point to point)
:func:`barrier`                nothing; returns when every rank has called it
:func:`exchange_or_raise`      a small integer table, or an error on every rank if any failed
=============================  ===============================================================
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from hybridfc.parallel import wire
from hybridfc.parallel.accounting import LEDGER
from hybridfc.parallel.groups import ProcessGroup, backend_of, collective_device, group_rank, group_size

T = TypeVar("T")

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""Gather equal tensors into one: ``all_gather_single`` where torch has it (2.13 deprecates
``all_gather_into_tensor`` with a FutureWarning on every call), its older name elsewhere."""


class Pending(Generic[T]):
    """A collective in flight. :meth:`wait` blocks until it is done (timed as exposed
    communication) and returns its result; later calls return the same result."""

    def __init__(self, kind: str, works: Sequence[Any], finish: Callable[[], T],
                 blocked_since: Optional[float] = None) -> None:
        self.kind, self._works, self._finish = kind, works, finish
        self._blocked_since = blocked_since
        self._result: Optional[T] = None
        self._done = False

    @classmethod
    def ready(cls, result: T) -> "Pending[T]":
        return cls("", (), lambda: result)

    def wait(self) -> T:
        if not self._done:
            start = time.perf_counter() if self._blocked_since is None else self._blocked_since
            for work in self._works:
                work.wait()
            if self._works:
                LEDGER.record(self.kind, exposed_seconds=time.perf_counter() - start)
            self._result, self._done = self._finish(), True
        return self._result


def _run(kind: str, bytes_sent: int, launch: Callable[[], Sequence[Any]], finish: Callable[[], T],
         async_op: bool) -> "T | Pending[T]":
    """Record the call, launch its work, and wait for it unless ``async_op``."""
    LEDGER.record(kind, calls=1, bytes_sent=bytes_sent)
    if async_op:
        return Pending(kind, launch(), finish)
    start = time.perf_counter()
    return Pending(kind, launch(), finish, blocked_since=start).wait()


def _ready(result: T, async_op: bool) -> "T | Pending[T]":
    return Pending.ready(result) if async_op else result


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup = None,
               async_op: bool = False) -> "torch.Tensor | Pending[torch.Tensor]":
    """Reduce ``tensor`` over the ranks in place (``op``: ``"sum"``, ``"max"`` or ``"min"``)."""
    world_size = group_size(group)
    if world_size == 1:
        return _ready(tensor, async_op)
    return _run("all_reduce", wire.all_reduce_bytes(_nbytes(tensor), world_size),
                lambda: [dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group, async_op=True)],
                lambda: tensor, async_op)


def all_gather(tensor: torch.Tensor, group: ProcessGroup = None,
               async_op: bool = False) -> "torch.Tensor | Pending[torch.Tensor]":
    """``(n, ...)`` of the same shape on every rank -> ``(N·n, ...)`` in rank order."""
    world_size = group_size(group)
    if world_size == 1:
        return _ready(tensor, async_op)
    send = tensor.contiguous()
    out = send.new_empty((world_size * send.shape[0], *send.shape[1:]))
    return _run("all_gather", wire.all_gather_bytes(_nbytes(send), world_size),
                lambda: [_all_gather_single(out, send, group=group, async_op=True)],
                lambda: out, async_op)


def all_gather_vector(values: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """One small vector per rank: ``(k,)`` -> ``(N, k)``, a new tensor."""
    return all_gather(values.reshape(-1).clone(), group).view(group_size(group), -1)


def sparse_sum(indices: torch.Tensor, values: torch.Tensor, numel: int, group: ProcessGroup = None,
               dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A sparse all-reduce: every rank's pairs ``indices (k,)`` (int32, distinct within a rank),
    ``values (k,)``, the same ``k`` on every rank, summed into a dense ``(numel,)`` of ``dtype``
    (into ``out``, when given, whose values are overwritten).

    One all-gather of the pairs; each rank's values are added in rank order, so every rank gets
    the same bits (one rank alone: its pairs scattered into zeros).
    """
    world_size = group_size(group)
    if world_size == 1:
        gathered_indices, gathered_values = indices.unsqueeze(0), values.unsqueeze(0)
    else:
        flat_indices, flat_values = indices.new_empty(world_size * indices.numel()), values.new_empty(
            world_size * values.numel())
        _run("sparse_all_reduce", wire.all_gather_bytes(_nbytes(indices) + _nbytes(values), world_size),
             lambda: [_all_gather_single(flat_indices, indices.contiguous(), group=group, async_op=True),
                      _all_gather_single(flat_values, values.contiguous(), group=group, async_op=True)],
             lambda: None, async_op=False)
        gathered_indices, gathered_values = flat_indices.view(world_size, -1), flat_values.view(world_size, -1)
    total = out.zero_() if out is not None else torch.zeros(numel, dtype=dtype, device=values.device)
    for rank_indices, rank_values in zip(gathered_indices, gathered_values):
        total.index_add_(0, rank_indices, rank_values.to(dtype))
    return total


def _valid_rows(sizes: Sequence[int], padded: int, device: torch.device) -> torch.Tensor:
    """Indices of the real rows inside the ``(N · padded)`` rows of a padded exchange."""
    return torch.cat([torch.arange(n, device=device) + r * padded for r, n in enumerate(sizes)])


def _is_even(sizes: Sequence[int]) -> bool:
    return min(sizes) == max(sizes)


def gather_padded(x: torch.Tensor, sizes: Sequence[int], group: ProcessGroup = None,
                  async_op: bool = False) -> "torch.Tensor | Pending[torch.Tensor]":
    """Rows of uneven count from every rank: ``(b_r, ...)`` -> ``(Σ sizes, ...)`` in rank order.

    ``sizes[r]`` is rank r's row count, known to every rank beforehand; each rank sends
    ``max(sizes)`` rows (zero padded) and the padding is dropped on arrival.
    """
    if len(sizes) == 1:
        return _ready(x, async_op)
    padded_rows = max(sizes)
    send = x.new_zeros((padded_rows, *x.shape[1:]))
    send[: x.shape[0]] = x
    gathered = all_gather(send, group, async_op=async_op)

    def unpad(out: torch.Tensor) -> torch.Tensor:
        return out if _is_even(sizes) else out[_valid_rows(sizes, padded_rows, x.device)]

    return Pending("all_gather", [], lambda: unpad(gathered.wait())) if async_op else unpad(gathered)


def reduce_scatter_padded(grad: torch.Tensor, sizes: Sequence[int], group: ProcessGroup = None,
                          async_op: bool = False) -> "torch.Tensor | Pending[torch.Tensor]":
    """Sum ``(Σ sizes, ...)`` over the ranks and keep this rank's rows: ``-> (b_r, ...)``.

    On gloo an all-to-all hands every rank the ``N`` contributions to its rows, summed here in
    rank order; elsewhere the backend's reduce-scatter.
    """
    world_size = len(sizes)
    if world_size == 1:
        return _ready(grad, async_op)
    padded_rows, rank = max(sizes), group_rank(group)
    if _is_even(sizes):
        send = grad.contiguous()
    else:
        send = grad.new_zeros((world_size * padded_rows, *grad.shape[1:]))
        send[_valid_rows(sizes, padded_rows, grad.device)] = grad
    nbytes = wire.scatter_sum_bytes(_nbytes(send), world_size)
    if backend_of(group) == "gloo":
        received = torch.empty_like(send)
        return _run("all_to_all", nbytes,
                    lambda: [dist.all_to_all_single(received, send, group=group, async_op=True)],
                    lambda: _sum_in_rank_order(received.view(world_size, padded_rows, *grad.shape[1:]))[
                        : sizes[rank]], async_op)
    out = grad.new_empty((padded_rows, *grad.shape[1:]))
    return _run("reduce_scatter", nbytes,
                lambda: [dist.reduce_scatter_tensor(out, send, group=group, async_op=True)],
                lambda: out[: sizes[rank]], async_op)


def _sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` -> ``(...)``: ``parts[0] + parts[1] + …``, one fixed order on every run."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def ring_shift(tensors: Sequence[torch.Tensor], group: ProcessGroup = None) -> list[torch.Tensor]:
    """Send each tensor to group rank ``r + 1``; receive the same shapes from ``r − 1``."""
    world_size, rank = group_size(group), group_rank(group)
    if world_size == 1:
        return list(tensors)
    received = [t.new_empty(t.shape) for t in tensors]
    sends = [t.contiguous() for t in tensors]

    def launch() -> list[Any]:
        ops = [dist.P2POp(dist.isend, t, group=group, tag=tag, group_peer=(rank + 1) % world_size)
               for tag, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, r, group=group, tag=tag, group_peer=(rank - 1) % world_size)
                for tag, r in enumerate(received)]
        return dist.batch_isend_irecv(ops)

    return _run("send", sum(_nbytes(t) for t in sends), launch, lambda: received, async_op=False)


def barrier(group: ProcessGroup = None) -> None:
    """Return once every rank of ``group`` has called it."""
    if group_size(group) > 1:
        _run("barrier", 0, lambda: [dist.barrier(group=group, async_op=True)], lambda: None, async_op=False)


class RankError(RuntimeError):
    """Another rank of the group failed; that rank raised the error that says why."""


def exchange_or_raise(values: Sequence[int], error: Optional[BaseException], what: str,
                      group: ProcessGroup = None) -> list[list[int]]:
    """All-gather this rank's small integer ``values`` with whether it failed (``error``).

    If any rank failed, every rank raises: the failed ones their own ``error``, the others a
    :class:`RankError` naming the failed ranks and ``what`` they were doing. Otherwise returns
    the ``(N, len(values))`` table as lists, the same on every rank.
    """
    mine = torch.tensor([int(error is not None), *values], dtype=torch.int64, device=collective_device(group))
    table = all_gather_vector(mine, group).tolist()
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(table) if row[0]]
    if failed:
        raise RankError(f"hybridfc: {what} failed on rank(s) {failed} (see the error there)")
    return [row[1:] for row in table]


def run_on_every_rank(fn: Callable[[], T], what: str, group: ProcessGroup = None) -> T:
    """``fn()`` on every rank; if it raised on any, raise on every rank (:func:`exchange_or_raise`)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    exchange_or_raise((), error, what, group)
    return result
