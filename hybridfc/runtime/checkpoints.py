"""The engine's checkpoints: DeepSpeed's files and every registered state part in one tag
directory, complete or not at all (the order is in :mod:`hybridfc.runtime`)."""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional, Sequence

import deepspeed

from hybridfc.checkpoint import (CheckpointError, latest_tag, load_parts, publish, reached, read_parts, save_parts,
                                 saved_world_size, staging_tag)
from hybridfc.checkpoint.head import HeadOptimizerState, HeadShard, SelectionState
from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.optimizer import HeadOptimizer
from hybridfc.parallel.collectives import barrier, run_on_every_rank
from hybridfc.parallel.groups import ProcessGroup, group_rank, group_size
from hybridfc.state import StatePart

WORLD: ProcessGroup = None
"""Saving and publishing involve every rank: the world's default group."""


class EngineState:
    """The state parts an engine's checkpoints hold: the head's (rows, optimizer, selection) first,
    then each one :meth:`register` adds."""

    def __init__(self, head: ClassParallelFC, head_optimizer: HeadOptimizer) -> None:
        self.head, self.optimizer = HeadShard(head), HeadOptimizerState(head, head_optimizer)
        self.parts: list[StatePart] = [self.head, self.optimizer, SelectionState(head)]

    def register(self, part: StatePart) -> None:
        """Have checkpoints save, reshard and load ``part`` too (:class:`hybridfc.state.StatePart`)."""
        if any(known.name == part.name for known in self.parts):
            raise ValueError(f"hybridfc: a state part named {part.name!r} is registered already")
        self.parts.append(part)

    def loaded(self, restore_optimizer: bool) -> list[StatePart]:
        """The parts a load restores: all, or all but the head's optimizer."""
        return [part for part in self.parts if restore_optimizer or part is not self.optimizer]


def save(backbone: deepspeed.DeepSpeedEngine, parts: Sequence[StatePart], group: ProcessGroup, save_dir: str,
         tag: Optional[str], client_state: Optional[dict], save_latest: bool, **kwargs: Any) -> bool:
    """Save the parts and DeepSpeed's checkpoint as ``save_dir/tag``; DeepSpeed's return value."""
    tag = str(tag) if tag is not None else f"global_step{backbone.global_steps}"
    staging = os.path.join(save_dir, staging_tag(tag))
    first = backbone.global_rank == 0
    run_on_every_rank(lambda: shutil.rmtree(staging, ignore_errors=True) if first else None,
                      "clearing an interrupted save", WORLD)
    run_on_every_rank(lambda: save_parts(staging, parts, group_rank(group), group_size(group)), "saving the head",
                      group)
    reached("head_written")
    saved = backbone.save_checkpoint(save_dir, tag=staging_tag(tag), client_state=client_state or {},
                                     save_latest=False, **kwargs)
    barrier(WORLD)
    reached("backbone_written")
    run_on_every_rank(lambda: publish(save_dir, tag, save_latest) if first else None, "publishing the checkpoint",
                      WORLD)
    return saved


def load(backbone: deepspeed.DeepSpeedEngine, parts: Sequence[StatePart], group: ProcessGroup, load_dir: str,
         tag: Optional[str], **kwargs: Any) -> tuple[Any, Any]:
    """Load DeepSpeed's checkpoint and the parts from ``load_dir/tag`` (default: ``latest``);
    DeepSpeed's return value, ``(None, None)`` when ``load_dir`` holds no checkpoint. Every part
    is read and checked before anything is loaded."""
    tag = tag if tag is not None else latest_tag(load_dir)
    if tag is None:
        return backbone.load_checkpoint(load_dir, tag=None, **kwargs)
    tag_dir = os.path.join(load_dir, str(tag))
    module_only = kwargs.get("load_module_only", False)

    def read() -> dict[str, Any]:
        check_rank_count(tag_dir, group_size(group), backbone.zero_optimization_stage(), module_only)
        return read_parts(tag_dir, parts, group_rank(group), group_size(group))

    states = run_on_every_rank(read, "reading the head's shard", group)
    loaded = backbone.load_checkpoint(load_dir, tag=tag, **kwargs)
    run_on_every_rank(lambda: load_parts(parts, states), "restoring the head", group)
    return loaded


def check_rank_count(tag_dir: str, ranks: int, stage: int, module_only: bool) -> None:
    """On another number of ranks only where DeepSpeed can follow (ZeRO-0 keeps the optimizer
    state whole; ZeRO 1–3 partition it by rank)."""
    saved = saved_world_size(tag_dir)
    if saved != ranks and stage > 0 and not module_only:
        raise CheckpointError(f"hybridfc: checkpoint {tag_dir} was saved on {saved} ranks, this run has "
                              f"{ranks}: the head can be resharded, but DeepSpeed's ZeRO-{stage} "
                              f"optimizer state is partitioned by rank; convert it with DeepSpeed's universal "
                              f"checkpoint (deepspeed.checkpoint.ds_to_universal), or load the weights only "
                              f"(load_module_only=True)")
