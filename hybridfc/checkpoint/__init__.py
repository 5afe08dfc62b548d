"""Checkpoints: every state part of a run (:mod:`hybridfc.state`) beside DeepSpeed's files.

Layout: DeepSpeed writes ``<save_dir>/<tag>/…`` and ``<save_dir>/latest``; each rank writes one
file per state part into the same tag directory, ``hybridfc_<part>_rank<r:05d>_of_<N:05d>.pt``:
``head`` (its rows and the shard's description), ``optimizer``, ``selection``, and under
:func:`hybridfc.initialize` the engine's parts (``grad_topk``, ``plateau``, ``loader``, ``rng``).

==============  ===============================================================================
module          what it holds
==============  ===============================================================================
``publish``     complete or invisible: staging, fsync, rename (an existing tag swapped), ``latest``
``format``      the files: names, reading and writing, the head shard's description checked
``store``       saving every registered part, reading and merging each for this rank, loading
``head``        the head's parts (rows, optimizer, selection); the head saved and loaded alone
``reshard``     rows cut by ownership for another number of ranks or more classes
``legacy``      checkpoints of layout 1 (everything inside the head shard file), read as parts
``rng``         each process's random generators
``export``      the class rows as one matrix (``hybridfc export``) and back into a head
==============  ===============================================================================
"""

from typing import Callable, Optional

from hybridfc.checkpoint.export import export_centres, load_centres, tag_directory
from hybridfc.checkpoint.format import CheckpointError, part_file, saved_world_size, shard_file
from hybridfc.checkpoint.head import apply_head, head_parts, load_head, read_head, save_head
from hybridfc.checkpoint.publish import latest_tag, publish, reached, staging_tag
from hybridfc.checkpoint.rng import rng_states, set_rng_states
from hybridfc.checkpoint.store import load_parts, read_parts, save_parts

SAVE_STAGE_HOOK: Optional[Callable[[str], None]] = None
"""Called with each stage a save reaches (``"head_written"``, ``"backbone_written"``,
``"renamed"``, ``"latest_written"``): fault injection for tests."""

__all__ = ["SAVE_STAGE_HOOK", "CheckpointError", "apply_head", "export_centres", "head_parts", "latest_tag",
           "load_centres", "load_head", "load_parts", "part_file", "publish", "reached", "read_head", "read_parts",
           "rng_states", "save_head", "save_parts", "saved_world_size", "set_rng_states", "shard_file", "staging_tag",
           "tag_directory"]
