"""Everything between ranks: process groups, the sharding rule, the collectives (plain and as
autograd functions) and the accounting of what they send. No other part of hybridfc calls
``torch.distributed``.

================  ==============================================================
module            what it holds
================  ==============================================================
``groups``        group size and rank, backend, the sharding rule
``collectives``   sync and async collectives, raising on every rank
``chunks``        the local batch in chunks: their layout, their exchanges in flight
``mappings``      the head's gradient mapping (``scale_gradient``)
``accounting``    calls, bytes and exposed seconds per collective kind
``wire``          the bytes each collective puts on the wire (shared with ``hybridfc plan``)
================  ==============================================================
"""

from hybridfc.parallel.accounting import LEDGER, CommunicationStats, StatsCursor, Traffic
from hybridfc.parallel.chunks import ChunkedGather, ChunkLayout, scatter_chunk
from hybridfc.parallel.collectives import (Pending, RankError, all_gather, all_gather_vector, all_reduce, barrier,
                                           exchange_or_raise, gather_padded, reduce_scatter_padded, ring_shift,
                                           run_on_every_rank, sparse_sum)
from hybridfc.parallel.groups import backend_of, collective_device, group_rank, group_size, is_distributed, shard_range
from hybridfc.parallel.mappings import scale_gradient

__all__ = [
    "LEDGER",
    "ChunkLayout",
    "ChunkedGather",
    "CommunicationStats",
    "Pending",
    "RankError",
    "StatsCursor",
    "Traffic",
    "all_gather",
    "all_gather_vector",
    "all_reduce",
    "backend_of",
    "barrier",
    "collective_device",
    "exchange_or_raise",
    "gather_padded",
    "group_rank",
    "group_size",
    "is_distributed",
    "reduce_scatter_padded",
    "ring_shift",
    "run_on_every_rank",
    "scale_gradient",
    "scatter_chunk",
    "shard_range",
    "sparse_sum",
]
