"""Process groups and the class-dimension sharding rule.

Every collective in hybridfc takes an explicit process group. ``None`` means the default
(world) group, and a program that never initialised ``torch.distributed`` is treated as a
single process, so that the head also runs in a plain one-process script.

Sharding: ``num_classes`` rows are split into contiguous shards, one per rank of the group;
the ``num_classes % world_size`` leftover rows go to the lowest ranks (one each), as in
insightface's PartialFC.

>>> shard_range(10, world_size=4, rank=0), shard_range(10, world_size=4, rank=3)
((0, 3), (8, 2))
"""

from __future__ import annotations

from typing import Optional

import torch
import torch._dynamo  # noqa: F401  (imports torch.distributed.nn.functional: see below)
import torch.distributed as dist

from hybridfc.parallel.teardown import release_stale_group_references

# torch._dynamo imports torch/distributed/nn/functional.py, whose collectives default their group
# argument to group.WORLD as it is when that module is imported: after init_process_group, the live
# default group. Those 10 references kept the group (and its gloo threads) alive past
# destroy_process_group() and the interpreter's exit, which then aborted now and then ("terminate
# called without an active exception"). Every training script imports dynamo (torch.optim does, with
# the first optimizer), often after init_process_group; hybridfc itself may be imported late. So the
# defaults are put back to None (the default group, as with an early import) here, and again at exit
# for modules imported later (hybridfc.parallel.teardown), whatever the import order.
release_stale_group_references()

ProcessGroup = Optional[dist.ProcessGroup]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def group_size(group: ProcessGroup = None) -> int:
    """Number of ranks in ``group`` (1 without ``torch.distributed``)."""
    return dist.get_world_size(group) if is_distributed() else 1


def group_rank(group: ProcessGroup = None) -> int:
    """This process's rank inside ``group`` (0 without ``torch.distributed``)."""
    return dist.get_rank(group) if is_distributed() else 0


def backend_of(group: ProcessGroup = None) -> str:
    """``"nccl"``, ``"gloo"`` or another backend's name, of ``group`` (``"none"`` without
    ``torch.distributed``)."""
    if not is_distributed():
        return "none"
    name = str(dist.get_backend(group)).lower()
    return next((known for known in ("nccl", "gloo") if known in name), name)


def collective_device(group: ProcessGroup = None) -> torch.device:
    """Where small tensors for collectives on ``group`` live: CUDA for NCCL (it moves only CUDA
    tensors), the CPU otherwise."""
    if backend_of(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``'s contiguous shard of ``num_classes`` rows."""
    base, leftover = divmod(num_classes, world_size)
    start = rank * base + min(rank, leftover)
    return start, base + (1 if rank < leftover else 0)

