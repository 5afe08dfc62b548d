"""The learning rate hybridfc puts on backbone and head, on top of DeepSpeed's scheduler.

The head's lr is its configured lr times the ratio of the backbone's current lr to the
backbone's configured lr (so DeepSpeed's warm-up and decay apply to both), and both are
multiplied by ``scale``: ``schedule.batch_scaling``'s factor for the global batch times
``schedule.plateau``'s, lowered when the held-out metric stops improving. The plateau rule's state
is a state part (``plateau``: rank 0's on another number of ranks)."""

from __future__ import annotations

import logging
from typing import Any, Optional

from hybridfc.config import ScheduleConfig
from hybridfc.deepspeed_adapter import DeepSpeedAdapter
from hybridfc.log import log_dist
from hybridfc.schedule import PlateauLR
from hybridfc.state import SavedStates


class LrMultiplier:
    """``schedule``'s multipliers of the lr, put on the backbone's optimizer; the plateau's state part."""

    name = "plateau"

    def __init__(self, adapter: DeepSpeedAdapter, schedule: ScheduleConfig, backbone_base_lr: Optional[float]) -> None:
        self._adapter, self._backbone_base_lr = adapter, backbone_base_lr
        plateau = schedule.plateau
        self.plateau = None if plateau is None else PlateauLR("max", plateau.factor, plateau.patience,
                                                              plateau.threshold, plateau.min_factor)
        self._plateau_step = -1
        self.batch_factor = 1.0
        if schedule.batch_scaling is not None:
            global_batch = adapter.engine.train_batch_size()
            self.batch_factor = schedule.batch_scaling.factor(global_batch)
            adapter.scale_lr(self.batch_factor)
            log_dist(f"lr of backbone and head x {self.batch_factor:g} for the global batch of {global_batch} "
                     f"({schedule.batch_scaling.rule} scaling from {schedule.batch_scaling.reference_batch})")

    @property
    def scale(self) -> float:
        """``schedule.batch_scaling``'s factor times ``schedule.plateau``'s (1 without them)."""
        return self.batch_factor * (1.0 if self.plateau is None else self.plateau.scale)

    def head_factor(self) -> float:
        """What the head's configured lr is multiplied by now: the backbone's schedule, times :attr:`scale`."""
        ratio = self._adapter.engine.get_lr()[0] / self._backbone_base_lr if self._backbone_base_lr else 1.0
        return ratio * self.scale

    def observe(self, metric: Optional[float], step: int) -> None:
        """Feed the held-out metric to the plateau rule, once per optimizer step; on a drop, scale
        the backbone's lr too."""
        if self.plateau is None or metric is None or step == self._plateau_step:
            return
        self._plateau_step = step
        if self.plateau.step(metric):
            self._adapter.scale_lr(self.scale)
            log_dist(f"step {step}: held-out metric at a plateau (best {self.plateau.best:.4f}): "
                     f"lr multiplier now {self.plateau.scale:g}")

    def state_dict(self) -> dict[str, Any]:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state)
        self._adapter.scale_lr(self.scale)

    def merge(self, saved: SavedStates) -> Optional[dict[str, Any]]:
        return saved.first()


def backbone_base_lr(ds_config: dict, optimizer: Any) -> Optional[float]:
    """The backbone's configured lr: the ds_config's, else the client optimizer's (None: unknown)."""
    lr = ds_config.get("optimizer", {}).get("params", {}).get("lr")
    if lr is None and optimizer is not None and hasattr(optimizer, "param_groups"):
        lr = optimizer.param_groups[0]["lr"]
    if lr is None:
        log_dist("the backbone's configured lr is unknown (no optimizer.params.lr in the ds_config): "
                 "the head keeps its own lr and does not follow the backbone's schedule", level=logging.WARNING)
    return lr
