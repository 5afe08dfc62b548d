"""When the engine imprints the head (``warm_start``): before the first step of a fresh run, after
a load that grew the head (its new rows only), and every ``refresh_interval`` steps; and the
batches it imprints from."""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from hybridfc.config import WarmStartConfig
from hybridfc.data.loader import DistributedLoader
from hybridfc.log import log_dist


class ImprintSchedule:
    """Which classes the next forward imprints (``pending``), and whether a step refreshes them."""

    def __init__(self, cfg: Optional[WarmStartConfig], num_classes: int, fresh: bool) -> None:
        self.enabled = bool(cfg and cfg.imprint)
        self.refresh_interval = cfg.refresh_interval if cfg is not None else 0
        self.pending: Optional[range] = range(num_classes) if self.enabled and fresh else None

    def refresh_due(self, step: int) -> bool:
        return bool(self.refresh_interval) and step % self.refresh_interval == 0

    def after_load(self, grown_from: Optional[int], num_classes: int) -> None:
        """A loaded checkpoint: nothing to imprint, but the new rows where the head grew."""
        self.pending = range(grown_from, num_classes) if grown_from and self.enabled else None
        if grown_from:
            log_dist(f"head grown from {grown_from} to {num_classes} classes: the saved rows keep their values and "
                     f"optimizer state; the new rows start fresh{', imprinted at the first step' if self.enabled else ''}")


def in_order(loader: Optional[DistributedLoader]) -> DistributedLoader:
    """One pass over the training loader's data, this rank's part, in order."""
    if loader is None:
        raise ValueError("engine.imprint(): no training_data was given to hybridfc.initialize; pass the batches")
    return DistributedLoader(loader.dataset, loader.batch_size, rank=loader.rank, world_size=loader.world_size,
                             shuffle=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn)


def of_classes(batches: Iterable, classes: Optional[range], device: torch.device) -> Iterator[tuple]:
    """``(x, y)`` of ``batches`` with ``y`` on ``device``, only the samples of ``classes`` (all
    when None); batches left empty are dropped."""
    for x, y in batches:
        y = y.to(device)
        if classes is not None:
            keep = (y >= classes.start) & (y < classes.stop)
            if not bool(keep.any()):
                continue
            x, y = x[keep.to(x.device)], y[keep]
        yield x, y
