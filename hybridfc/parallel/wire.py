"""Bytes one rank puts on the wire for each collective: the one model that the communication
layer's accounting (:mod:`hybridfc.parallel.accounting`) and ``hybridfc plan`` share.

Payload bytes only: TCP/IP framing adds a few percent on a real link (``benchmarks/netlink.py``
measures it). ``world_size`` is N; every figure is what one rank *sends* (it receives as much).

==================  =========================  ================================================
collective          bytes sent per rank        how the backend moves it
==================  =========================  ================================================
all-reduce          ⌈2(N−1)/N · S⌉             ring: a reduce-scatter pass, then an all-gather
                                               pass (gloo and NCCL); S = the tensor's bytes
all-gather          (N−1) · s                  ring: every rank's ``s`` bytes travel N−1 hops
all-to-all          (N−1)/N · S                each chunk straight to its owner; S = the input
reduce-scatter      gloo: as an all-reduce     gloo reduces the whole tensor everywhere and
                    NCCL: (N−1)/N · S          keeps a slice; NCCL's ring sends each chunk once
scatter-sum         (N−1)/N · S                what the layer runs for a reduce-scatter: an
                                               all-to-all and a local sum on gloo, NCCL's
                                               reduce-scatter otherwise
sparse all-reduce   (N−1) · k · (4 + v)        an all-gather of k (int32 index, value) pairs
                                               of v bytes each: R·N·(4+v)/8 times a ring
                                               all-reduce of n = k/R fp32 values
send                S                          point to point
==================  =========================  ================================================

Measured through a veth link on 2 gloo ranks with a 4 MB tensor: all-reduce, reduce-scatter
4.2 MB; all-gather, all-to-all 2.1 MB: hence :func:`scatter_sum_bytes` and never gloo's
reduce-scatter.
"""

from __future__ import annotations


def all_reduce_bytes(nbytes: int, world_size: int) -> int:
    """A ring all-reduce of ``nbytes`` (the whole tensor)."""
    return -(-2 * (world_size - 1) * nbytes // world_size)


def all_gather_bytes(local_nbytes: int, world_size: int) -> int:
    """An all-gather where every rank contributes ``local_nbytes``."""
    return (world_size - 1) * local_nbytes


def all_to_all_bytes(nbytes: int, world_size: int) -> int:
    """An all-to-all of an ``nbytes`` input split into ``world_size`` equal chunks."""
    return (world_size - 1) * nbytes // world_size


def reduce_scatter_bytes(nbytes: int, world_size: int, backend: str) -> int:
    """The backend's own reduce-scatter of an ``nbytes`` input."""
    if backend == "gloo":
        return all_reduce_bytes(nbytes, world_size)
    return all_to_all_bytes(nbytes, world_size)


def scatter_sum_bytes(nbytes: int, world_size: int) -> int:
    """The layer's reduce-scatter of an ``nbytes`` input (all-to-all + local sum on gloo)."""
    return all_to_all_bytes(nbytes, world_size)


def sparse_all_reduce_bytes(pairs: int, value_bytes: int, world_size: int) -> int:
    """An all-gather of ``pairs`` (int32 index, value of ``value_bytes``) per rank."""
    return all_gather_bytes(pairs * (4 + value_bytes), world_size)


def sparse_pays(pairs: int, numel: int, value_bytes: int, world_size: int) -> bool:
    """Whether sending ``pairs`` of ``numel`` fp32 values as pairs costs fewer bytes than a ring
    all-reduce of all of them (it stops paying at a density of 8 / ((4 + v) · N))."""
    return sparse_all_reduce_bytes(pairs, value_bytes, world_size) < all_reduce_bytes(4 * numel, world_size)
