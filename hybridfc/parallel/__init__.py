"""Process groups, the sharding rule and the collectives (as autograd functions)."""

from hybridfc.parallel.groups import group_rank, group_size, is_distributed, shard_range
from hybridfc.parallel.mappings import all_gather_vector, gather_padded, gather_rows, scale_gradient

__all__ = [
    "all_gather_vector",
    "gather_padded",
    "gather_rows",
    "group_rank",
    "group_size",
    "is_distributed",
    "scale_gradient",
    "shard_range",
]
