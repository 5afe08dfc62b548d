"""Class selection: which rows of each shard enter a step's softmax.

``full`` takes every row; ``partial`` (PartialFC) the positives plus random rows; ``knn`` (KNN
softmax) the graph neighbours of the batch's labels; ``hf`` (HF-softmax) the nearest rows of each
sample's feature. All keep every positive and a fixed budget of rows per rank.

>>> selection = build_selection({"type": "knn", "budget": 0.1, "k": 32}, shard, seed=0)
>>> active = selection.select(labels, features, weight, step, micro)   # active.rows: (A,)
"""

from __future__ import annotations

from typing import Any

from hybridfc.config import (
    FullSelectionConfig as FullConfig,
    HFSelectionConfig as HFConfig,
    KNNSelectionConfig as KNNConfig,
    ParsedSelection,
    PartialSelectionConfig as PartialConfig,
    parse_selection,
)
from hybridfc.selection.base import ClassSelection, Selection, Shard, budget_rows
from hybridfc.selection.full import FullSelection
from hybridfc.selection.hf import HFSelection
from hybridfc.selection.knn import KNNSelection
from hybridfc.selection.partial import PartialSelection

__all__ = ["ClassSelection", "FullSelection", "HFSelection", "KNNSelection", "PartialSelection", "Selection",
           "Shard", "budget_rows", "build_selection"]


def build_selection(spec: "dict[str, Any] | ParsedSelection", shard: Shard, seed: int = 0) -> ClassSelection:
    """The selection described by a ``{"type": ...}`` dict (or a parsed config) on ``shard``."""
    cfg = parse_selection(spec)
    if isinstance(cfg, FullConfig):
        return FullSelection(shard, seed)
    if isinstance(cfg, PartialConfig):
        return PartialSelection(shard, cfg.budget, seed, cfg.sampling_correction)
    if isinstance(cfg, KNNConfig):
        return KNNSelection(shard, cfg, seed)
    if isinstance(cfg, HFConfig):
        return HFSelection(shard, cfg, seed)
    raise TypeError(f"hybridfc: not a selection config: {cfg!r}")
