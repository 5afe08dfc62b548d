"""``PlateauLR``: an lr multiplier that drops when a held-out metric stops improving.

>>> plateau = PlateauLR(mode="max", factor=0.1, patience=2)
>>> for epoch in range(epochs):
...     train_one_epoch(lr=base_lr * plateau.scale)
...     if plateau.step(evaluate()):                # e.g. held-out accuracy in [0, 1]
...         log_dist(f"plateau: lr multiplier now {plateau.scale}")

An evaluation improves when it beats the best so far by more than ``threshold``, an *absolute*
margin (``metric > best + threshold`` for ``max``, ``metric < best - threshold`` for ``min``);
the first evaluation always improves. After ``patience`` evaluations in a row without
improvement, ``scale`` is multiplied by ``factor``, never below ``min_factor`` (a product within
rounding of ``min_factor`` is set to it), and the count starts again. Once ``scale`` is at
``min_factor``, further plateaus change nothing.
"""

from __future__ import annotations

import math
from typing import Any, Literal

Mode = Literal["max", "min"]


class PlateauLR:
    """Multiplier of the learning rate, lowered on a plateau of a metric.

    Args:
        mode: ``"max"`` when a larger metric is better (accuracy), ``"min"`` otherwise (loss).
        factor: what ``scale`` is multiplied by on a plateau, in ``(0, 1)``.
        patience: evaluations in a row without improvement that make a plateau, at least 1.
        threshold: the absolute margin by which a metric must beat the best to improve, ``>= 0``.
        min_factor: the lowest ``scale``, in ``(0, 1]``.

    Attributes:
        scale: the current multiplier (1.0 at the start).
        best: the best metric so far (``-inf`` / ``inf`` before the first evaluation).
        bad_evaluations: evaluations in a row without improvement since the last improvement or drop.
        drops: how many times ``scale`` was lowered.
    """

    def __init__(self, mode: Mode = "max", factor: float = 0.1, patience: int = 2, threshold: float = 1e-4,
                 min_factor: float = 1e-3) -> None:
        _check_arguments(mode, factor, patience, threshold, min_factor)
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.min_factor = threshold, min_factor
        self.scale = 1.0
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_evaluations = 0
        self.drops = 0

    def step(self, metric: float) -> bool:
        """Record one evaluation's ``metric``; True when this call lowered ``scale``."""
        if not math.isfinite(metric):
            raise ValueError(f"hybridfc: PlateauLR metric must be finite (got {metric})")
        if self._improves(metric):
            self.best, self.bad_evaluations = metric, 0
            return False
        self.bad_evaluations += 1
        if self.bad_evaluations < self.patience:
            return False
        self.bad_evaluations = 0
        return self._lower()

    def _improves(self, metric: float) -> bool:
        if self.mode == "max":
            return metric > self.best + self.threshold
        return metric < self.best - self.threshold

    def _lower(self) -> bool:
        """``scale`` <- ``max(scale · factor, min_factor)``; True when that lowered it."""
        if self.scale <= self.min_factor:
            return False
        lowered = self.scale * self.factor
        if lowered < self.min_factor or math.isclose(lowered, self.min_factor):
            lowered = self.min_factor
        self.scale = lowered
        self.drops += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to continue exactly where this object is."""
        return {"best": self.best, "bad_evaluations": self.bad_evaluations, "scale": self.scale,
                "drops": self.drops}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (the constructor's arguments are not part of it)."""
        self.best, self.bad_evaluations = float(state["best"]), int(state["bad_evaluations"])
        self.scale, self.drops = float(state["scale"]), int(state["drops"])


def _check_arguments(mode: str, factor: float, patience: int, threshold: float, min_factor: float) -> None:
    """Raise ``ValueError`` naming the first argument out of its range."""
    if mode not in ("max", "min"):
        raise ValueError(f"hybridfc: PlateauLR mode must be 'max' or 'min' (got {mode!r})")
    if not 0 < factor < 1:
        raise ValueError(f"hybridfc: PlateauLR factor must be in (0, 1) (got {factor})")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"hybridfc: PlateauLR patience must be an integer >= 1 (got {patience!r})")
    if not 0 <= threshold < math.inf:
        raise ValueError(f"hybridfc: PlateauLR threshold must be finite and >= 0 (got {threshold})")
    if not 0 < min_factor <= 1:
        raise ValueError(f"hybridfc: PlateauLR min_factor must be in (0, 1] (got {min_factor})")
