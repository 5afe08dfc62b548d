"""``hf``: HF-softmax, the classes nearest to each sample's feature as hard negatives.

>>> head = ClassParallelFC(1_000_000, 512, selection={"type": "hf", "budget": 0.1, "k": 32,
...                                                  "rebuild_interval": 1000})

Each rank keeps an approximate-nearest-neighbour index over its shard's normalised rows
(:class:`~hybridfc.selection.index.ShardIndex`: exact for small shards, an IVF index for
large ones, HNSW on request). Each step the gathered features ``(B, d)`` query it for their ``k``
nearest rows; rank r's candidates are every sample's nearest row, then every sample's second,
and so on. Positives, then candidates (at most ``hard_fraction`` of the room the positives
leave), then uniform random rows fill the budget. The index is rebuilt in the background from
a snapshot every ``rebuild_interval`` steps (:mod:`hybridfc.selection.rebuild`); building it
needs no collective. An approximate index measures its recall@k on
:data:`~hybridfc.selection.index.RECALL_QUERIES` of its own rows as queries (each row left out
of its own list; a trained model's features lie near their class's row) and, with
``min_recall``, widens its search until it reaches it (:meth:`ShardIndex.widen_to_recall`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from hybridfc.config import ConfigError, HFSelectionConfig as HFConfig
from hybridfc.selection.base import ClassSelection, Shard
from hybridfc.selection.index import RECALL_QUERIES, ShardIndex, choose_index_kind, log_recall
from hybridfc.selection.rebuild import BackgroundRebuild


class HFSelection(ClassSelection):
    """Positives, each sample's nearest rows of this shard, then random rows."""

    uses_features = True

    def __init__(self, shard: Shard, cfg: HFConfig, seed: int) -> None:
        super().__init__(shard, cfg.budget, seed, cfg.sampling_correction, cfg.hard_fraction)
        if cfg.k > shard.num_classes:
            raise ConfigError(f"selection.k: {cfg.k} nearest classes per sample is more than the "
                              f"{shard.num_classes} classes")
        self.k = min(cfg.k, shard.num_local)
        self.kind = choose_index_kind(shard.num_local, cfg.index)
        self.min_recall = cfg.min_recall
        self.index = BackgroundRebuild(self._build, cfg.rebuild_interval, cfg.delay(), name="hf index",
                                       late=cfg.late_rebuild, group=shard.group)

    def _build(self, rows: torch.Tensor) -> ShardIndex:
        index = ShardIndex(rows, kind=self.kind, seed=self.seed)
        if index.approximate:
            generator = torch.Generator().manual_seed(self.seed)
            sample = torch.randperm(len(index), generator=generator)[:RECALL_QUERIES].sort().values
            recall = index.widen_to_recall(rows[sample], sample, self.k, self.min_recall)
            log_recall("hf index", index, self.k, recall, sample.numel(), self.min_recall)
        return index

    def candidates(self, labels: torch.Tensor, features: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        index = self.index.ensure_built(weight, step=0)
        if features.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=weight.device)
        queries = F.normalize(features.detach().to(device="cpu", dtype=torch.float32), dim=1)
        _, nearest = index.search(queries, self.k)
        nearest = nearest.t().reshape(-1)
        return nearest[nearest >= 0].to(weight.device)

    def step_end(self, step: int, weight: torch.Tensor) -> None:
        self.index.step_end(step, weight)

    def close(self) -> None:
        self.index.close()

    def state_dict(self) -> dict[str, Any]:
        current = self.index.current
        return {**super().state_dict(), "centres": None if current is None else current.centres,
                "built_from_step": self.index.built_from_step, "pending": self.index.pending_snapshot()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["centres"] is not None:
            self.index.current = self._build(state["centres"])
        self.index.built_from_step = state["built_from_step"]
        if state["pending"] is not None:
            self.index.start(*state["pending"])
