"""What hybridfc needs of a DeepSpeed engine beyond its public API, in one place.

DeepSpeed (0.19) has no hook to veto a step. Its engine calls its optimizer's ``step()``, zeroes
the gradients, then reads the optimizer's ``overflow`` attribute: True counts the step in
``skipped_steps``, leaves the lr schedule alone and makes ``was_step_applied()`` False. The fp16
optimizers, the bf16 optimizer and the ZeRO optimizers set ``overflow`` themselves from the
gradients they hold (a non-finite gradient on one rank is non-finite on every rank after the
reduction); a plain torch optimizer (ZeRO-0 in fp32) has no such check and would apply a NaN.
:meth:`DeepSpeedAdapter.skip_next_step` closes that gap: it wraps such an optimizer's ``step`` so
that hybridfc can skip it, and reports the skip through ``overflow`` as DeepSpeed expects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from torch import nn


class _SkippableStep:
    """Replaces a plain optimizer's ``step``: skips it on request, and says so in ``overflow``."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.original: Callable[..., Any] = optimizer.step
        self.skip = False
        optimizer.overflow = False
        optimizer.step = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        skip, self.skip = self.skip, False
        self.optimizer.overflow = skip
        return None if skip else self.original(*args, **kwargs)


class DeepSpeedAdapter:
    """The DeepSpeed engine of the backbone, as hybridfc's step uses it.

    Attributes:
        engine: the ``deepspeed.DeepSpeedEngine``.
        module: the backbone module it wraps.
        fp16: whether the engine scales the loss (fp16 with a loss scaler).
    """

    def __init__(self, engine: deepspeed.DeepSpeedEngine) -> None:
        self.engine = engine
        self.module: nn.Module = engine.module
        self.fp16 = bool(engine.fp16_enabled())
        optimizer = engine.optimizer
        self._skippable = None
        if optimizer is not None and not hasattr(optimizer, "overflow"):
            self._skippable = _SkippableStep(optimizer)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the backbone computes in."""
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        return torch.float16 if self.fp16 else torch.float32

    def loss_scale(self) -> float:
        """The factor DeepSpeed multiplies the loss by before backward (1 without fp16)."""
        return float(self.engine._get_optimizer_loss_scale() or 1.0) if self.fp16 else 1.0

    def release_shared_memory(self) -> None:
        """Unlink this rank's ``/dev/shm`` buffer of DeepSpeed's CPU all-reduce op (66 MB), which
        DeepSpeed leaves behind after every CPU run. Only once no rank will use it again."""
        name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                f"{os.environ.get('MASTER_PORT')}_{self.engine.global_rank}")
        Path("/dev/shm", name).unlink(missing_ok=True)

    def skip_next_step(self) -> None:
        """Make the engine's next optimizer step a skipped one. Engines whose optimizer checks its
        gradients find the same non-finite values themselves and skip without being told."""
        if self._skippable is not None:
            self._skippable.skip = True
