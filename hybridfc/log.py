"""Rank-aware logging: ``log_dist("message", ranks=[0])`` logs only on the ranks listed."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

from hybridfc.parallel.groups import group_rank

logger = logging.getLogger("hybridfc")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(asctime)s] [hybridfc] [%(levelname)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_dist(message: str, ranks: Optional[Iterable[int]] = (0,), level: int = logging.INFO) -> None:
    """Log ``message`` on the given global ranks (all ranks when ``ranks`` is None)."""
    rank = group_rank()
    if ranks is None or rank in set(ranks):
        logger.log(level, f"[rank {rank}] {message}")
