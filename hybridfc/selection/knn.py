"""``knn``: KNN softmax, the classes nearest to the batch's labels as hard negatives.

>>> head = ClassParallelFC(1_000_000, 512, selection={"type": "knn", "budget": 0.1, "k": 32,
...                                                  "rebuild_interval": 1000})

A class-to-class graph holds the ``k`` nearest classes of every class by the cosine of their
rows, over *all* classes (neighbours may live in other shards), stored sharded by owner: rank r
keeps the lists of its own classes, ``(C_r, k)`` global ids, int32 below 2^31 classes (a
replicated graph at 10^8 classes and k = 32 would take 12.8 GB per rank). Each step:

1. the owners look up the lists of the global batch's labels, ``(B, k)``, and one MAX
   all-reduce gives every rank all of them (rows of labels a rank does not own are -1);
2. rank r's candidates are the entries that fall in its shard, nearest first: every label's
   first neighbour, then every label's second, and so on;
3. positives, then candidates (at most ``hard_fraction`` of the room the positives leave),
   then uniform random rows fill the budget (:class:`~hybridfc.selection.base.ClassSelection`).

The graph is built before the first step and rebuilt in the background every
``rebuild_interval`` steps (:mod:`hybridfc.selection.rebuild`): the thread searches, the training
thread runs the ring exchange at step boundaries (:func:`~hybridfc.selection.graph.knn_graph_steps`). An approximate graph
logs its measured recall@k at each build and, with ``min_recall``, searches each shard more
widely until it reaches it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from hybridfc.config import ConfigError, KNNSelectionConfig as KNNConfig
from hybridfc.parallel.collectives import all_reduce
from hybridfc.selection.base import ClassSelection, Shard
from hybridfc.selection.build_steps import BuildSteps
from hybridfc.selection.graph import knn_graph_steps
from hybridfc.selection.rebuild import BackgroundRebuild


class KNNSelection(ClassSelection):
    """Positives, the graph neighbours of the batch's labels in this shard, then random rows."""

    def __init__(self, shard: Shard, cfg: KNNConfig, seed: int) -> None:
        super().__init__(shard, cfg.budget, seed, cfg.sampling_correction, cfg.hard_fraction)
        if cfg.k > shard.num_classes - 1:
            raise ConfigError(f"selection.k: {cfg.k} neighbours is more than the {shard.num_classes - 1} "
                              f"other classes of {shard.num_classes}")
        self.k, self.kind, self.min_recall = cfg.k, cfg.index, cfg.min_recall
        self.graph = BackgroundRebuild(self._build, cfg.rebuild_interval, cfg.delay(), name="knn graph",
                                       late=cfg.late_rebuild, group=shard.group)

    def _build(self, rows: torch.Tensor) -> BuildSteps:
        """Build steps of the ``(C_r, k)`` neighbour ids, kept as int32 when the class ids fit (half
        the memory)."""
        graph = yield from knn_graph_steps(rows, self.shard.class_start, self.shard.num_classes, self.k,
                                           group=self.shard.group, kind=self.kind, seed=self.seed,
                                           min_recall=self.min_recall)
        return graph.to(torch.int32) if self.shard.num_classes <= torch.iinfo(torch.int32).max else graph

    def candidates(self, labels: torch.Tensor, features: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        neighbours = self._lookup(labels, self.graph.ensure_built(weight, step=0))
        in_shard = neighbours.t().reshape(-1) - self.shard.class_start
        return in_shard[(in_shard >= 0) & (in_shard < self.shard.num_local)]

    def _lookup(self, labels: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        """``(B, k)`` neighbour lists of the global batch's labels, from their owners.

        ``graph`` stays where it was built (the CPU); only the ``(B, k)`` lists move."""
        target = self.shard.local_target(labels.cpu())
        owned = target >= 0
        neighbours = torch.full((labels.numel(), self.k), -1, dtype=torch.int64)
        neighbours[owned] = graph[target[owned]].to(torch.int64)
        return all_reduce(neighbours.to(labels.device), "max", self.shard.group)

    def step_end(self, step: int, weight: torch.Tensor) -> None:
        self.graph.step_end(step, weight)

    def close(self) -> None:
        self.graph.close()

    def state_dict(self) -> dict[str, Any]:
        pending = self.graph.pending_snapshot()
        return {**super().state_dict(), "graph": self.graph.current, "built_from_step": self.graph.built_from_step,
                "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.graph.current, self.graph.built_from_step = state["graph"], state["built_from_step"]
        if state["pending"] is not None:
            self.graph.start(*state["pending"])
