"""What hybridfc needs of a DeepSpeed engine beyond its public API, in one place.

DeepSpeed (0.19) has no hook to veto a step. Its engine calls its optimizer's ``step()``, zeroes
the gradients, then reads the optimizer's ``overflow`` attribute: True counts the step in
``skipped_steps``, leaves the lr schedule alone and makes ``was_step_applied()`` False. The fp16
optimizers, the bf16 optimizer and the ZeRO optimizers set ``overflow`` themselves from the
gradients they hold (a non-finite gradient on one rank is non-finite on every rank after the
reduction); a plain torch optimizer (ZeRO-0 in fp32) has no such check and would apply a NaN.
:meth:`DeepSpeedAdapter.skip_next_step` closes that gap: it wraps such an optimizer's ``step`` so
that hybridfc can skip it, and reports the skip through ``overflow`` as DeepSpeed expects.

Nor a hook to scale the lr on top of its scheduler: :meth:`DeepSpeedAdapter.scale_lr` wraps the
optimizer's ``step`` so that the scale applies to the step alone, and the scheduler, which runs
after it, sees the lr it set.

DeepSpeed has no hook to replace its gradient reduction either. The engine reduces the
backbone's gradients at the end of backward only while ``enable_backward_allreduce`` is true
(as 1-bit Adam used it): :meth:`DeepSpeedAdapter.take_over_reduction` switches it off, and at
each accumulation boundary hybridfc reduces ``param.grad`` itself. At ZeRO-0 the optimizer reads
``param.grad``; at ZeRO-1 :meth:`DeepSpeedAdapter.gradients_reduced` has the ZeRO optimizer cut its
partition out of the reduced gradients, with no communication (as its own epilogue does, then
its ``finalize_gradient_accumulation_boundary``). ZeRO 2 and 3 reduce inside backward hooks and keep
only a partition of the gradient: they cannot be taken over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from torch import nn

from hybridfc.log import log_dist


def release_shared_memory(global_rank: int) -> None:
    """Unlink this rank's ``/dev/shm`` buffer of DeepSpeed's CPU all-reduce op (66 MB), which
    DeepSpeed never unlinks: every CPU run would leave one per rank until the machine reboots.

    Call it once every rank has finished ``deepspeed.init_distributed`` (after a collective): each
    rank maps every other rank's buffer there, and a mapping outlives the name, so the op works on
    and the memory is freed when the last process using it ends, however it ends (even killed)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{global_rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


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


class _ScaledLrStep:
    """Wraps an optimizer's ``step``: every group's lr is multiplied by ``scale`` for the step
    alone, and put back before DeepSpeed's scheduler runs (which then never sees the scale)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.original: Callable[..., Any] = optimizer.step
        self.scale = 1.0
        optimizer.step = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        groups = self.optimizer.param_groups
        unscaled = [group["lr"] for group in groups]
        for group, lr in zip(groups, unscaled):
            group["lr"] = lr * self.scale
        try:
            return self.original(*args, **kwargs)
        finally:
            for group, lr in zip(groups, unscaled):
                group["lr"] = lr


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
        self._scaled: "_ScaledLrStep | None" = None

    def compute_dtype(self) -> torch.dtype:
        """The dtype the backbone computes in."""
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        return torch.float16 if self.fp16 else torch.float32

    def loss_scale(self) -> float:
        """The factor DeepSpeed multiplies the loss by before backward (1 without fp16)."""
        return float(self.engine._get_optimizer_loss_scale() or 1.0) if self.fp16 else 1.0

    def scale_lr(self, scale: float) -> None:
        """Multiply the lr of the backbone's optimizer steps from now on by ``scale`` (on top of
        what DeepSpeed's scheduler sets)."""
        if self._scaled is None:
            self._scaled = _ScaledLrStep(self.engine.optimizer)
        self._scaled.scale = scale

    def skip_next_step(self) -> None:
        """Make the engine's next optimizer step a skipped one. Engines whose optimizer checks its
        gradients find the same non-finite values themselves and skip without being told."""
        if self._skippable is not None:
            self._skippable.skip = True

    def take_over_reduction(self, momentum_correction: bool) -> float:
        """Stop DeepSpeed from reducing the backbone's gradients (:meth:`gradients` are then this
        rank's own until hybridfc reduces them); with ``momentum_correction`` the optimizer's
        momentum is taken out of it and returned, to be applied before compression (else 0).
        Whether this engine allows it is checked at :func:`hybridfc.initialize`
        (:func:`hybridfc.runtime.initialize.check_grad_topk`)."""
        self.engine.enable_backward_allreduce = False
        if not momentum_correction:
            return 0.0
        groups = self.engine.optimizer.param_groups
        momentum = float(groups[0]["momentum"])
        for group in groups:
            group["momentum"] = 0.0
        log_dist(f"grad_topk momentum correction: momentum {momentum} applied before compression, the backbone's "
                 f"optimizer runs without it")
        return momentum

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the backbone module's state (ZeRO-3 partitions gathered)."""
        module = self.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()),
                                               enabled=self.engine.zero_optimization_stage() == 3):
            return {name: value.detach().clone() for name, value in module.state_dict().items()}

    def load_module_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`module_state_dict` returned (ZeRO-3: from rank 0's, into the partitions)."""
        module = self.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0,
                                               enabled=self.engine.zero_optimization_stage() == 3):
            module.load_state_dict(state)

    def gradients(self) -> list[torch.Tensor]:
        """This rank's gradient tensors of the backbone, in parameter order (zeros where backward
        made none, so that every rank has the same entries)."""
        grads = []
        for parameter in self.module.parameters():
            if not parameter.requires_grad or parameter.numel() == 0:
                continue
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
        return grads

    def gradient_numel(self) -> int:
        """The entries of :meth:`gradients`."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def gradients_reduced(self) -> None:
        """Tell the optimizer that :meth:`gradients` hold the reduced gradients. ZeRO-1 takes its
        partition of them as its own reduction's epilogue would (DeepSpeed 0.19: the gradients of
        the parameters in its partition, then their flat partition)."""
        if self.engine.zero_optimization_stage() != 1:
            return
        optimizer = self.engine.optimizer
        for group, parameters in enumerate(optimizer.params_in_partition):
            optimizer.all_grad_tensors[group] = optimizer.get_all_grad_tensors(
                parameters, dtype=optimizer.gradient_accumulation_dtype)
        optimizer.finalize_gradient_accumulation_boundary()
