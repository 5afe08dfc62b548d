"""One owner of the optimizer step, for the backbone and the head together.

At every gradient-accumulation boundary :meth:`TrainingStep.finish` runs on every rank:

1. **unscale**: the head's gradient is divided by the fp16 loss scale DeepSpeed multiplied in;
2. **agree**: one all-gather of two numbers per rank: whether every backbone gradient that rank's
   backward produced was finite (read by :class:`GradientWatch` before any reduction), and the
   squared norm of its shard of the head's gradient (with LARS a third: its shard's squared
   weight norm);
3. **decide**: the step is skipped when some rank's embeddings or the loss were not finite (the
   head saw it in its forward pass, on every rank alike), a backbone gradient was not finite on
   some rank (fp32 and bf16; under fp16 that is an overflow, which DeepSpeed's loss scale
   handles), or the head's gradient norm is not finite;
4. **reduce** (with ``grad_topk``, :mod:`hybridfc.compression`): the backbone's gradients are
   averaged from each rank's top-k entries, the rest kept in the rank's residual; a step to be
   skipped leaves the residual as it was and makes the gradients NaN on every rank;
5. **step**: DeepSpeed's step, told to skip where it would not find out by itself
   (:meth:`DeepSpeedAdapter.skip_next_step`: a plain optimizer, ZeRO-0 in fp32); the fp16, bf16
   and ZeRO optimizers find the same non-finite gradients in their own overflow checks (on by
   default in DeepSpeed 0.19). A skipped step is counted in DeepSpeed's ``skipped_steps``, leaves
   the lr schedule where it was and makes ``was_step_applied()`` False. Then the head's: an update
   clipped with the agreed norm, or a skip. Should DeepSpeed apply a step hybridfc found
   non-finite (its overflow checks switched off, or a non-finite head gradient alone, possible
   with an fp16-stored head under fp16), the run stops with :class:`NonFiniteError` rather than
   train on with backbone and head out of step;
6. **reset**: the head's gradient and step state, the watch.

``global_steps`` counts every attempted step, and so does ``head.steps`` (the selection's
schedule); ``skipped_steps`` and ``head_optimizer.skipped_steps`` count the skipped ones, each
logged with its cause. After ``max_consecutive_skips`` skips in a row (fp16 overflows that lowered
the loss scale do not count: that is the scale finding its level) the run stops with
:class:`NonFiniteError` on every rank, naming the steps and the cause.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hybridfc.compression.error_feedback import TopKGradientReducer
from hybridfc.deepspeed_adapter import DeepSpeedAdapter
from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.optimizer import HeadOptimizer
from hybridfc.log import log_dist
from hybridfc.parallel.collectives import all_gather_vector
from hybridfc.parallel.groups import collective_device


class NonFiniteError(RuntimeError):
    """Too many steps in a row were skipped for non-finite values."""


class GradientWatch:
    """Whether every gradient backward produced for a module's parameters was finite.

    A hook per parameter reads the gradient as backward makes it, before DeepSpeed reduces or
    partitions it, so a rank learns about its own batch; the flag stays on the device until
    :meth:`take`.
    """

    def __init__(self, module: nn.Module) -> None:
        self._bad: Optional[torch.Tensor] = None
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.register_hook(self._check)

    def _check(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self._bad = bad if self._bad is None else self._bad | bad

    def take(self) -> bool:
        """True if a gradient since the last call was not finite."""
        bad, self._bad = self._bad, None
        return bad is not None and bool(bad)


@dataclass(frozen=True)
class Verdict:
    """What the ranks agreed on about one step."""

    input_ranks: list[int]
    loss: bool
    gradient_ranks: list[int]
    head_norm: float
    head_weight_norm: Optional[float]

    def cause(self) -> Optional[str]:
        """Why the step must be skipped, or None."""
        causes = []
        if self.input_ranks:
            causes.append(f"non-finite input on rank(s) {self.input_ranks}")
        elif self.loss:
            causes.append("a non-finite loss")
        if self.gradient_ranks:
            causes.append(f"non-finite backbone gradients on rank(s) {self.gradient_ranks}")
        if not math.isfinite(self.head_norm):
            causes.append("a non-finite head gradient")
        return "; ".join(causes) or None


class TrainingStep:
    """Decides and takes each optimizer step for backbone and head (module docstring)."""

    def __init__(self, backbone: DeepSpeedAdapter, head: ClassParallelFC, head_optimizer: HeadOptimizer,
                 max_consecutive_skips: int, reducer: Optional[TopKGradientReducer] = None) -> None:
        self.backbone, self.head, self.head_optimizer = backbone, head, head_optimizer
        self.reducer = reducer
        self.max_consecutive_skips = max_consecutive_skips
        self.watch = None if backbone.fp16 else GradientWatch(backbone.module)
        self.consecutive_skips = 0
        self._first_skipped_step = 0
        self._head_base_lr = head_optimizer.param_groups[0]["lr"]

    def finish(self, loss_scale: float, lr_factor: float) -> bool:
        """The step at an accumulation boundary; returns whether it was applied."""
        self._unscale_head_gradient(loss_scale)
        verdict = self._agree()
        cause = verdict.cause()
        scale_before = self.backbone.loss_scale()
        if self.reducer is not None:
            self._reduce_backbone_gradients(applies=cause is None)
        if cause is not None:
            self.backbone.skip_next_step()
        self.backbone.engine.step()
        applied = self.backbone.engine.was_step_applied()
        if applied and cause is not None:
            raise NonFiniteError(f"hybridfc: DeepSpeed applied step {self.backbone.engine.global_steps} although "
                                 f"it saw {cause}; this DeepSpeed configuration cannot be told to skip a step")
        if applied:
            for group in self.head_optimizer.param_groups:
                group["lr"] = self._head_base_lr * lr_factor
            self.head_optimizer.update(verdict.head_norm, verdict.head_weight_norm)
        else:
            self.head_optimizer.skip()
        self.head_optimizer.zero_grad()
        if applied:
            self.consecutive_skips = 0
        else:
            overflow_lowered_scale = cause is None and self.backbone.loss_scale() < scale_before
            self._skipped(cause or self._deepspeed_cause(scale_before), counts=not overflow_lowered_scale)
        return applied

    def _reduce_backbone_gradients(self, applies: bool) -> None:
        gradients = self.backbone.gradients()
        if applies:
            self.reducer.reduce(gradients)
        else:
            self.reducer.poison(gradients)
        self.backbone.gradients_reduced()

    def _unscale_head_gradient(self, loss_scale: float) -> None:
        _, grad = self.head.gradient()
        if loss_scale != 1.0 and grad is not None:
            grad.div_(loss_scale)

    def _agree(self) -> Verdict:
        """One all-gather: each rank's backbone-gradient flag, head-gradient square norm and, for
        LARS, head-weight square norm."""
        optimizer = self.head_optimizer
        mine = [float(self.watch is not None and self.watch.take()), *optimizer.local_square_norms()]
        group = self.head.group
        table = all_gather_vector(torch.tensor(mine, dtype=torch.float64, device=collective_device(group)), group)
        gradient_ranks = torch.nonzero(table[:, 0]).squeeze(1).tolist()
        weight_norm = math.sqrt(float(table[:, 2].sum())) if optimizer.needs_weight_norm else None
        return Verdict(sorted(self.head.non_finite_inputs), self.head.non_finite_loss, gradient_ranks,
                       math.sqrt(float(table[:, 1].sum())), weight_norm)

    def _deepspeed_cause(self, scale_before: float) -> str:
        if self.backbone.fp16:
            return f"fp16 overflow (loss scale {scale_before:g} -> {self.backbone.loss_scale():g})"
        return "DeepSpeed found non-finite gradients"

    def _skipped(self, cause: str, counts: bool) -> None:
        """Log the skip; stop the run after too many in a row that ``count``."""
        engine = self.backbone.engine
        step = engine.global_steps
        log_dist(f"step {step}: skipped for {cause} ({engine.skipped_steps} steps skipped so far)",
                 level=logging.WARNING)
        if not counts:
            return
        self.consecutive_skips += 1
        if self.consecutive_skips == 1:
            self._first_skipped_step = step
        if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteError(f"hybridfc: {self.consecutive_skips} steps in a row skipped (steps "
                                 f"{self._first_skipped_step} to {step}), the last for {cause}; stopping "
                                 f"(hybridfc.max_consecutive_skips = {self.max_consecutive_skips})")
