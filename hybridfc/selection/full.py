"""``full``: every class of the shard enters the softmax, the exact class-parallel softmax."""

from typing import Optional

import torch

from hybridfc.selection.base import ClassSelection, Selection, Shard


class FullSelection(ClassSelection):
    """All rows, every step; the head keeps the dense gradient ``weight.grad``."""

    dense = True

    def __init__(self, shard: Shard, seed: int = 0) -> None:
        super().__init__(shard, shard.num_local, seed)

    def select(self, labels: torch.Tensor, features: Optional[torch.Tensor], weight: torch.Tensor, step: int,
               micro: int) -> Selection:
        rows = torch.arange(self.shard.num_local, device=weight.device)
        return Selection(rows, self.shard.local_target(labels))
