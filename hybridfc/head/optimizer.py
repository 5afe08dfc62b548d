"""The head's optimizer: momentum SGD with weight decay on this rank's shard.

Built from the same ``{"type", "params"}`` dict as DeepSpeed's optimizer entry:

>>> opt = build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9,
...                                                             "weight_decay": 5e-4}})
>>> loss = head(embeddings, labels); loss.backward(); opt.step(); opt.zero_grad()

It is ``torch.optim.SGD`` (dampening 0, no Nesterov) on the shard:
``g += wd·w; buf = momentum·buf + g; w -= lr·buf``. With every class in the softmax every row
receives gradient at every step, so every row is updated; the gradient accumulates over
gradient-accumulation micro-batches until ``zero_grad``. ``lr`` is read from
``param_groups`` each step, so torch LR schedulers drive it as usual.

Optional clipping (``gradient_clipping > 0``) scales the gradient in place so that its L2 norm
over *all* shards is at most that value, with one all-reduce of a scalar. The update allocates
nothing of the shard's size. A step is skipped, and counted in
``skipped_steps``, when the head saw non-finite embeddings since ``zero_grad`` or when the
clipped norm is not finite; every rank takes the same decision.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.parallel.groups import group_size


class HeadSGD(torch.optim.Optimizer):
    """Momentum SGD over a :class:`ClassParallelFC` shard, skipping non-finite steps."""

    def __init__(
        self,
        head: ClassParallelFC,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        gradient_clipping: float = 0.0,
    ) -> None:
        if gradient_clipping < 0:
            raise ValueError(f"hybridfc: gradient_clipping must be >= 0 (0 turns it off), got {gradient_clipping}")
        super().__init__([head.weight], dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.head = head
        self.gradient_clipping = gradient_clipping
        self.skipped_steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.head.reset_step_state()

    @torch.no_grad()
    def step(self, closure=None) -> bool:
        """Update the shard; returns whether an update was applied."""
        weight = self.head.weight
        if weight.grad is None:
            return False
        scale = self._clip_scale(weight.grad)
        if not self.head.step_is_finite or scale is None:
            self.skipped_steps += 1
            return False
        group = self.param_groups[0]
        if scale != 1.0:
            weight.grad.mul_(scale)
        if group["momentum"] and "momentum_buffer" not in self.state[weight]:
            self.state[weight]["momentum_buffer"] = torch.zeros_like(weight)
        _sgd_update(weight, weight.grad, self.state[weight].get("momentum_buffer"), group)
        return True

    def _clip_scale(self, grad: torch.Tensor) -> Optional[float]:
        """Factor that brings the global gradient norm under the limit; None if not finite."""
        if self.gradient_clipping <= 0:
            return 1.0
        sq = torch.linalg.vector_norm(grad).double().square()
        if group_size(self.head.group) > 1:
            dist.all_reduce(sq, group=self.head.group)
        norm = float(sq.sqrt())
        if not math.isfinite(norm):
            return None
        return min(1.0, self.gradient_clipping / (norm + 1e-6))


def _sgd_update(weight: torch.Tensor, grad: torch.Tensor, buf: Optional[torch.Tensor], group: dict) -> None:
    """``torch.optim.SGD``'s update of ``weight`` in place, with no temporary of its size."""
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    if momentum:
        buf.mul_(momentum).add_(grad)
        if weight_decay:
            buf.add_(weight, alpha=weight_decay)
        weight.add_(buf, alpha=-lr)
        return
    if weight_decay:
        weight.mul_(1 - lr * weight_decay)
    weight.add_(grad, alpha=-lr)


def build_head_optimizer(head: ClassParallelFC, spec: dict, gradient_clipping: float = 0.0) -> HeadSGD:
    """The head optimizer from a DeepSpeed-shaped entry ``{"type": "sgd", "params": {...}}``."""
    from hybridfc.config import parse_head_optimizer

    cfg = parse_head_optimizer(spec)
    return HeadSGD(head, gradient_clipping=gradient_clipping, **cfg.params.model_dump())
