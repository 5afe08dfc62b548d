"""The backbone's gradient averaged over ranks from its top-k entries, with error feedback.

Each rank adds its gradient to its *residual* (what it has not sent yet), sends the ``k``
entries of the residual with the largest magnitude as (int32 index, value) pairs in one
all-gather, and keeps the rest, quantisation error of the values included, for its next step.
Every rank sums the pairs in rank order and divides by the number of ranks, so every rank
applies the same bits. Over any number of steps, the sum of the applied gradients plus the mean
of the ranks' residuals is the sum of the dense averaged gradients.

The share of entries sent starts at 1 and decays to ``grad_topk`` over
``grad_topk_warmup_steps`` (:func:`~hybridfc.compression.topk.density_at`); where pairs would
cost more bytes than a dense ring all-reduce (a density of 8 / ((4 + v) · N) and above, v the
value's bytes, N the ranks), the residual is all-reduced whole and emptied; so is it on one rank,
which sends nothing either way.

With ``momentum`` (Deep Gradient Compression's momentum correction) the momentum is applied here,
before compression: ``u ← m·u + g``, ``residual ← residual + u``, and the entries sent as pairs
are cleared in ``u`` too (momentum factor masking; a dense exchange keeps ``u``: it is then
momentum SGD); the backbone's optimizer runs without momentum.

>>> reducer = TopKGradientReducer(numel, density=0.01, group=group)
>>> reducer.reduce(gradients)        # in place: every rank's tensors hold the same average
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from hybridfc.compression.topk import density_at, largest_magnitudes
from hybridfc.parallel.collectives import all_reduce, sparse_sum
from hybridfc.parallel.groups import ProcessGroup, group_size
from hybridfc.parallel.wire import sparse_pays
from hybridfc.state import SavedStates


class TopKGradientReducer:
    """Averages a list of gradient tensors over ranks by sending their top-k (module docstring).

    Args:
        numel: the entries of all the gradients together (the same on every rank).
        density: the share of entries sent once warmed up, in (0, 1].
        warmup_steps: steps over which the share decays from 1 to ``density`` (0: none).
        value_dtype: the values' dtype on the wire (the config's names: :data:`hybridfc.config.DTYPES`).
        momentum: the momentum of momentum correction (0: off).
        group: the data-parallel group.
        device, dtype: of the residual (the gradients' device; float32, float64 for tests).

    Attributes:
        residual: ``(numel,)``, what this rank has not sent (unscaled).
        velocity: ``(numel,)``, the momentum of momentum correction, or None.
        steps: the exchanges done, which set the warm-up's density.
    """

    def __init__(self, numel: int, density: float, warmup_steps: int = 0, value_dtype: torch.dtype = torch.float32,
                 momentum: float = 0.0, group: ProcessGroup = None, device: "torch.device | str" = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if numel >= 2**31:
            raise ValueError(f"grad_topk sends int32 indices: {numel} gradient entries are too many")
        self.numel, self.density, self.warmup_steps = numel, density, warmup_steps
        self.value_dtype, self.momentum, self.group = value_dtype, momentum, group
        self.residual = torch.zeros(numel, dtype=dtype, device=device)
        self.velocity = torch.zeros_like(self.residual) if momentum else None
        self.steps = 0
        self._workspace = torch.empty_like(self.residual)

    def pairs(self) -> int:
        """The pairs the next exchange sends (``numel`` when it goes dense)."""
        k = max(1, round(density_at(self.steps, self.density, self.warmup_steps) * self.numel))
        value_bytes = self.value_dtype.itemsize
        return k if sparse_pays(k, self.numel, value_bytes, group_size(self.group)) else self.numel

    def reduce(self, gradients: Sequence[torch.Tensor]) -> None:
        """Replace ``gradients`` (this rank's, in the same order on every rank) by their average
        over ranks as sent this step; what was not sent stays in :attr:`residual`."""
        self._accumulate(gradients)
        k = self.pairs()
        if k == self.numel:
            average = all_reduce(self._workspace.copy_(self.residual), group=self.group)
            self.residual.zero_()
        else:
            indices = largest_magnitudes(self.residual, k, self._workspace)
            values = _to_wire(self.residual[indices], self.value_dtype)
            self.residual[indices] -= values.to(self.residual.dtype)
            self._mask_momentum(indices)
            average = sparse_sum(indices.to(torch.int32), values, self.numel, self.group, self.residual.dtype,
                                 out=self._workspace)
        average.mul_(1.0 / group_size(self.group))
        self._write_back(average, gradients)
        self.steps += 1

    def _write_back(self, average: torch.Tensor, gradients: Sequence[torch.Tensor]) -> None:
        """Copy the average into ``gradients``; what rounding to a lower-precision gradient dtype
        takes off goes into the residual (the same on every rank), so nothing is lost."""
        offset = 0
        for gradient in gradients:
            piece = average[offset: offset + gradient.numel()].view_as(gradient)
            gradient.copy_(piece)
            if gradient.dtype != piece.dtype:
                self.residual[offset: offset + gradient.numel()] += (piece - gradient.to(piece.dtype)).reshape(-1)
            offset += gradient.numel()

    def _accumulate(self, gradients: Sequence[torch.Tensor]) -> None:
        """``residual += g`` (with momentum: ``u = m·u + g``, ``residual += u``)."""
        target = self.residual
        if self.velocity is not None:
            self.velocity.mul_(self.momentum)
            target = self.velocity
        offset = 0
        for gradient in gradients:
            target[offset: offset + gradient.numel()] += gradient.reshape(-1)
            offset += gradient.numel()
        if self.velocity is not None:
            self.residual += self.velocity

    def _mask_momentum(self, indices: torch.Tensor) -> None:
        """Entries sent leave the momentum of momentum correction too (DGC's factor masking)."""
        if self.velocity is not None:
            self.velocity[indices] = 0

    @staticmethod
    def poison(gradients: Sequence[torch.Tensor]) -> None:
        """A step that is skipped: every rank's gradients become NaN, as a dense all-reduce of a
        non-finite gradient makes them, so the optimizer's own checks skip it; the residual stays."""
        for gradient in gradients:
            gradient.fill_(float("nan"))

    name = "grad_topk"
    """Its state part's name (:mod:`hybridfc.state`): the residual, the momentum and the step count."""

    def state_dict(self) -> dict[str, Any]:
        return {"residual": self.residual.clone(), "velocity": None if self.velocity is None else self.velocity.clone(),
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residual: torch.Tensor = state["residual"]
        if residual.numel() != self.numel:
            raise ValueError(f"the saved grad_topk residual has {residual.numel()} entries, this backbone's "
                             f"gradient {self.numel}")
        self.residual.copy_(residual)
        if self.velocity is not None and state.get("velocity") is not None:
            self.velocity.copy_(state["velocity"])
        self.steps = int(state["steps"])

    @staticmethod
    def merge(saved: SavedStates) -> Optional[dict[str, Any]]:
        """This rank's own state on as many ranks; on another number every rank starts from the mean
        of the saved residuals (and momenta), which keeps what the ranks still owed the average."""
        if saved.same_layout or not len(saved):
            return saved.own()
        states = list(saved)
        if any(state is None for state in states):
            return None
        mean = {name: None if states[0][name] is None else torch.stack([s[name] for s in states]).mean(0)
                for name in ("residual", "velocity")}
        return {**mean, "steps": states[0]["steps"]}


def _to_wire(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in the wire's ``dtype``, clamped to its finite range (what is beyond stays in the
    residual instead of turning into an infinity there)."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(values.dtype).max:
        values = values.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return values.to(dtype)
