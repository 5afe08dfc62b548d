"""``partial``: PartialFC's sampling, the positives plus uniformly random negatives.

>>> head = ClassParallelFC(1_000_000, 512, selection={"type": "partial", "budget": 0.1})

Every step each rank keeps its positives and fills the rest of its ``budget`` with rows drawn
uniformly without replacement from the rest of its shard (insightface's PartialFC, PLSC).
"""

from hybridfc.selection.base import ClassSelection


class PartialSelection(ClassSelection):
    """Positives plus uniform random negatives; the base class's random fill is all it needs."""
