"""The head's optimizers: momentum SGD and Adam(W) on this rank's shard, dense or row-sparse.

Built from the same ``{"type", "params"}`` dict as DeepSpeed's optimizer entry:

>>> opt = build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9,
...                                                             "weight_decay": 5e-4}})
>>> loss = head(embeddings, labels); loss.backward(); opt.step(); opt.zero_grad()

Types: ``sgd`` (torch.optim.SGD: dampening 0, no Nesterov; ``g += wd·w; buf = m·buf + g;
w -= lr·buf``), ``adam`` (torch.optim.Adam, L2 decay added to the gradient) and ``adamw``
(decoupled decay). The gradient accumulates over gradient-accumulation micro-batches until
``zero_grad``; ``lr`` is read from ``param_groups`` each step, so torch LR schedulers drive it.

What gets updated follows the head's selection (:meth:`ClassParallelFC.gradient`):

* ``full``: every row, in place, with no temporary of the shard's size for SGD;
* any other selection: only the rows touched since ``zero_grad``. Their rows and optimizer
  state are gathered, updated in fp32 and written back a block of at most 1 MiB at a time;
  every other row, its momentum, its Adam moments and its weight decay stay exactly as they
  were, and the cost scales with the active set, not with the shard.

  SGD runs a step clock over the rows (:mod:`hybridfc.head.row_clock`): when a row is next
  selected, its momentum first decays by ``momentum`` per step it missed and the row shrinks
  by the weight decay of those steps (at the rate dense momentum SGD settles to), while the
  steps that miss it leave it and its state untouched. Without the decay a push received
  hundreds of steps ago is re-applied at full strength; without the shrink a rarely selected
  row keeps a large norm and so a small angular step; both cost the sparse selections
  accuracy (``benchmarks/RESULTS.md``). Adam keeps a step count per row, so each row's bias
  correction counts the steps that row was updated (lazy Adam).

State tensors have the shard's storage dtype. Optional clipping (``gradient_clipping > 0``)
scales the gradient so that its L2 norm over *all* shards is at most that value, with one
all-reduce of a scalar. SGD's ``lars_coefficient`` η (0: off) makes the head layer-wise adaptive
(LARS, as You et al. and PaddlePaddle's ``LarsMomentum``): what enters the momentum each step,
``g + wd·w``, is multiplied by the trust ratio ``η·‖W‖ / (‖g‖ + wd·‖W‖)``, the norms taken over the
*whole* sharded head (its two squares summed over the shards in one all-reduce; the clipped
gradient's norm); a zero gradient gives the ratio's limit η/wd, a zero weight the ratio 1. A step
is skipped, and counted in ``skipped_steps``, when the head saw non-finite embeddings or loss
since ``zero_grad`` or when the norm is not finite; every rank takes the same decision. Every step, applied or skipped, advances the head's step count
(:meth:`ClassParallelFC.finish_step`), which schedules the selection's rebuilds. Under
:func:`hybridfc.initialize` the engine decides for backbone and head together and calls
:meth:`update` (with the norm it agreed on) or :meth:`skip` (:mod:`hybridfc.step`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from hybridfc.config import ParsedHeadOptimizer, parse_head_optimizer
from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.cross_entropy import unshared
from hybridfc.head.row_clock import RowClock, decay_rate
from hybridfc.parallel.collectives import all_reduce
from hybridfc.parallel.groups import collective_device

_BLOCK_BYTES = 1 << 20

ROW_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "row_last_step", "row_steps")
"""The optimizer state entries that hold one value (or row) per class row of the shard; the
others (a row clock's step count and log-shrink history) are the same on every rank."""


class HeadOptimizer(torch.optim.Optimizer):
    """Base of the head optimizers: clipping over all shards, skipped steps, dense or sparse rows.

    Subclasses name their state tensors (``STATE``, each shaped like the shard), implement
    :meth:`_update` on a block of rows and may count per-row numbers once per step in
    :meth:`_row_factors`.
    """

    STATE: tuple[str, ...] = ()

    def __init__(self, head: ClassParallelFC, defaults: dict, gradient_clipping: float = 0.0,
                 lars_coefficient: float = 0.0) -> None:
        if gradient_clipping < 0:
            raise ValueError(f"hybridfc: gradient_clipping must be >= 0 (0 turns it off), got {gradient_clipping}")
        if lars_coefficient < 0:
            raise ValueError(f"hybridfc: lars_coefficient must be >= 0 (0 turns LARS off), got {lars_coefficient}")
        super().__init__([head.weight], defaults)
        self.head = head
        self.gradient_clipping = gradient_clipping
        self.lars_coefficient = lars_coefficient
        self.skipped_steps = 0
        self.trust_ratio = 1.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients. With ``set_to_none``, a dense fp32 gradient that nothing else refers
        to (no other reference, no view) goes back to the head, which writes the next step's
        gradient into its memory."""
        gradient = self.head.weight.grad
        super().zero_grad(set_to_none)
        if set_to_none and gradient is not None and unshared(gradient):
            self.head.recycle_gradient(gradient)
        self.head.reset_step_state()

    def check_peak_lr(self, lr: float) -> None:
        """Raise if ``lr``, the highest lr the run will set, could not be applied (nothing to check here)."""

    @property
    def needs_weight_norm(self) -> bool:
        """Whether :meth:`update` needs the head's weight norm over all shards (LARS)."""
        return self.lars_coefficient > 0

    @torch.no_grad()
    def step(self, closure=None) -> bool:
        """With clipping or LARS on, agree with the other shards on the norms of gradient and
        weight (one all-reduce of their squares); then :meth:`update`. Returns whether an update
        was applied."""
        if self.gradient_clipping <= 0 and not self.needs_weight_norm:
            return self.update(0.0)
        squares = torch.tensor(self.local_square_norms(), dtype=torch.float64,
                               device=collective_device(self.head.group))
        norms = all_reduce(squares, "sum", self.head.group).sqrt().tolist()
        return self.update(*norms)

    @torch.no_grad()
    def update(self, global_norm: float, weight_norm: Optional[float] = None) -> bool:
        """Update the shard, its gradient clipped to ``gradient_clipping`` given its L2 norm over all
        shards (and with LARS, gradient and weight decay scaled by the trust ratio from it and
        ``weight_norm``, the weight's norm over all shards); skip when the head saw non-finite input or loss, or the
        norm is not finite. Either way the head counts one more step. Returns whether an update
        was applied."""
        rows, grad = self.head.gradient()
        if grad is None:
            self.head.finish_step()
            return False
        if not self.head.step_is_finite or not math.isfinite(global_norm):
            self.skip()
            return False
        scale = min(1.0, self.gradient_clipping / (global_norm + 1e-6)) if self.gradient_clipping > 0 else 1.0
        self.trust_ratio = self._trust_ratio(global_norm * scale, weight_norm)
        if scale * self.trust_ratio != 1.0:
            grad.mul_(scale * self.trust_ratio)
        state = self._state()
        with self._weight_decay_times(self.trust_ratio):
            if rows is None:
                self._update(self.head.weight, grad, state, self._row_factors(None))
            else:
                self._update_rows(rows, grad, state)
        self.head.finish_step()
        return True

    def _trust_ratio(self, gradient_norm: float, weight_norm: Optional[float]) -> float:
        """LARS's ``η·‖W‖ / (‖g‖ + wd·‖W‖)`` over the whole head (η/wd for a zero gradient; 1 without
        LARS, for a zero weight, or when both ``‖g‖`` and ``wd`` are 0)."""
        if not self.needs_weight_norm:
            return 1.0
        if weight_norm is None:
            raise ValueError("hybridfc: the head's lars_coefficient needs the weight norm over all shards: "
                             "call step(), or update(gradient_norm, weight_norm)")
        weight_decay = self.param_groups[0]["weight_decay"]
        if weight_norm == 0 or gradient_norm + weight_decay * weight_norm == 0:
            return 1.0
        return self.lars_coefficient * weight_norm / (gradient_norm + weight_decay * weight_norm)

    @contextlib.contextmanager
    def _weight_decay_times(self, factor: float) -> Iterator[None]:
        """The param groups' weight decay multiplied by ``factor`` inside the block."""
        decays = [group["weight_decay"] for group in self.param_groups]
        for group in self.param_groups:
            group["weight_decay"] *= factor
        try:
            yield
        finally:
            for group, decay in zip(self.param_groups, decays):
                group["weight_decay"] = decay

    def skip(self) -> None:
        """Count a skipped step: no row changes, the head's step count advances."""
        self.skipped_steps += 1
        self.head.finish_step()

    @torch.no_grad()
    def local_square_norm(self) -> float:
        """Squared L2 norm of this shard's gradient since ``zero_grad`` (0 without one)."""
        _, grad = self.head.gradient()
        return 0.0 if grad is None else float(torch.linalg.vector_norm(grad.double()).square())

    @torch.no_grad()
    def local_weight_square_norm(self) -> float:
        """Squared L2 norm of this shard's rows."""
        return float(torch.linalg.vector_norm(self.head.weight, dtype=torch.float64).square())

    def local_square_norms(self) -> list[float]:
        """What :meth:`update` needs summed over the shards: this shard's squared gradient norm and,
        with LARS, its squared weight norm."""
        squares = [self.local_square_norm()]
        if self.needs_weight_norm:
            squares.append(self.local_weight_square_norm())
        return squares

    def forget_momentum(self) -> None:
        """Zero the first-moment state (SGD's momentum, Adam's ``exp_avg``) of every row of the
        shard, imprinted or not: after the rows were set anew (a warm-start refresh), the old
        direction no longer applies."""
        state = self.state.get(self.head.weight, {})
        for name in ("momentum_buffer", "exp_avg"):
            if name in state:
                state[name].zero_()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded state to the parameter's dtype; every state tensor keeps the dtype
        it was saved with (int64 step counts, the fp64 log-shrink history)."""
        super().load_state_dict(state_dict)
        state = self.state[self.head.weight]
        for name, value in state_dict["state"].get(0, {}).items():
            if isinstance(value, torch.Tensor):
                state[name] = value.to(self.head.weight.device)

    def _state(self) -> dict[str, torch.Tensor]:
        weight = self.head.weight
        state = self.state[weight]
        for name in self.STATE:
            if name not in state:
                state[name] = torch.zeros_like(weight)
        return state

    def _update_rows(self, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Gather ``rows`` of the shard and of its state, update them in fp32 and write them back,
        in blocks of at most 1 MiB (the update is elementwise: the blocks change nothing but the
        memory it takes)."""
        weight = self.head.weight
        factors = self._row_factors(rows)
        block_rows = max(1, _BLOCK_BYTES // (4 * weight.shape[1]))
        for begin in range(0, rows.numel(), block_rows):
            part = slice(begin, begin + block_rows)
            ids = rows[part]
            block = weight.index_select(0, ids).float()
            block_state = {name: state[name].index_select(0, ids).float() for name in self.STATE}
            self._update(block, grad[part].float(), block_state, None if factors is None else factors[part])
            weight.index_copy_(0, ids, block.to(weight.dtype))
            for name in self.STATE:
                state[name].index_copy_(0, ids, block_state[name].to(state[name].dtype))

    def _row_factors(self, rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-row numbers the update of ``rows`` (None: the whole shard) needs, ``(n, 1)``
        fp64, counted once per applied step; None when it needs none."""
        return None

    def _update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                factors: Optional[torch.Tensor]) -> None:
        """Update ``weight`` and ``state`` (rows of the shard, or all of it) in place; ``factors``
        are the rows' part of :meth:`_row_factors`."""
        raise NotImplementedError


class HeadSGD(HeadOptimizer):
    """Momentum SGD over a :class:`ClassParallelFC` shard (torch.optim.SGD's update)."""

    def __init__(self, head: ClassParallelFC, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 gradient_clipping: float = 0.0, lars_coefficient: float = 0.0) -> None:
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), gradient_clipping,
                         lars_coefficient)
        self.STATE = ("momentum_buffer",) if momentum else ()
        self.check_peak_lr(lr)

    def check_peak_lr(self, lr: float) -> None:
        """Refuse, before the run, an lr at which LARS could make the row clock's decay flip the
        rows' sign: LARS scales the weight decay up to ``lars_coefficient``, so sparse steps need
        ``lr * lars_coefficient / (1 - momentum) < 1`` (nothing to check without LARS, weight decay
        or sparse steps)."""
        group = self.param_groups[0]
        if not (self.needs_weight_norm and group["weight_decay"]) or self.head.selection.dense:
            return
        rate = decay_rate(lr, group["momentum"], self.lars_coefficient)
        if rate >= 1:
            raise ValueError(f"hybridfc: the head's lr * lars_coefficient / (1 - momentum) = {rate:g} must be below "
                             f"1 (lr={lr:g}, lars_coefficient={self.lars_coefficient:g}, "
                             f"momentum={group['momentum']:g}): LARS scales the weight decay up to "
                             "lars_coefficient, which would then flip the rows' sign")

    def _update(self, weight, grad, state, factors) -> None:
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if factors is not None:
            weight.mul_(factors[:, :1].to(weight.dtype))
        if momentum:
            buf = state["momentum_buffer"]
            buf.mul_(momentum if factors is None else factors[:, 1:].to(buf.dtype)).add_(grad)
            if weight_decay:
                buf.add_(weight, alpha=weight_decay)
            weight.add_(buf, alpha=-lr)
            return
        if weight_decay:
            weight.mul_(1 - lr * weight_decay)
        weight.add_(grad, alpha=-lr)

    def _row_factors(self, rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Sparse steps: each row's shrink and momentum decay over the steps it missed since its
        last update (:class:`~hybridfc.head.row_clock.RowClock`), ``(n, 2)`` fp64."""
        group = self.param_groups[0]
        if rows is None or not (group["momentum"] or group["weight_decay"]):
            return None
        state = self.state[self.head.weight]
        clock = RowClock.from_state(state) if "row_last_step" in state else \
            RowClock.create(self.head.num_local, rows.device)
        factors = clock.tick(rows, group["lr"], group["momentum"], group["weight_decay"])
        state.update(clock.to_state())
        return torch.cat(factors, dim=1)


class HeadAdam(HeadOptimizer):
    """Adam (``decoupled=False``) or AdamW (``decoupled=True``) with a step count per row."""

    STATE = ("exp_avg", "exp_avg_sq")

    def __init__(self, head: ClassParallelFC, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False,
                 gradient_clipping: float = 0.0) -> None:
        super().__init__(head, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         gradient_clipping)
        self.decoupled = decoupled

    def _row_factors(self, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Count one more step for ``rows`` (None: all); ``(n, 1)`` fp64 counts after it."""
        state = self.state[self.head.weight]
        if "row_steps" not in state:
            state["row_steps"] = torch.zeros(self.head.num_local, dtype=torch.int64, device=self.head.weight.device)
        steps = state["row_steps"]
        if rows is None:
            steps += 1
            return steps.double().unsqueeze(1)
        steps[rows] += 1
        return steps[rows].double().unsqueeze(1)

    def _update(self, weight, grad, state, steps) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if weight_decay and self.decoupled:
            weight.mul_(1 - lr * weight_decay)
        elif weight_decay:
            grad = grad.add(weight, alpha=weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = (lr / (1 - beta1 ** steps)).to(weight.dtype)
        bias2_sqrt = (1 - beta2 ** steps).sqrt().to(weight.dtype)
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
        weight.sub_(exp_avg / denom * step_size)


def build_head_optimizer(head: ClassParallelFC, spec: "dict | ParsedHeadOptimizer",
                         gradient_clipping: float = 0.0) -> HeadOptimizer:
    """The head optimizer from a DeepSpeed-shaped entry ``{"type": "sgd" | "adam" | "adamw", "params": {...}}``
    or its parsed ds_config section."""
    cfg = parse_head_optimizer(spec)
    params = cfg.params.model_dump()
    if cfg.type == "sgd":
        return HeadSGD(head, gradient_clipping=gradient_clipping, **params)
    return HeadAdam(head, decoupled=cfg.type == "adamw", gradient_clipping=gradient_clipping, **params)
