"""Margins: how the target logit of each sample is formed.

Every margin maps the similarity ``c`` of a sample and a class to the logit ``s·c`` for the
non-target classes and ``s·ψ(c)`` for the target class. :class:`SoftmaxMargin` is the plain
linear classifier (``c = x·w``, no normalisation, ``s = 1``, ``ψ(c) = c``); the angular margins
normalise features and class centres, so ``c = cos θ``:

=========== ============================= ==================================================
type        ψ(cos θ)                      beyond the monotone range
=========== ============================= ==================================================
cosface     cos θ − m                     (always monotone)
arcface     cos(θ + m)                    θ + m > π: cos θ − m·sin m (original ArcFace)
combined    cos(m1·θ + m2) − m3           m1·θ + m2 > π: cos θ − m3 − m2·sin m2
=========== ============================= ==================================================

``combined`` with ``m1 = 1, m3 = 0`` is ``arcface`` and with ``m1 = 1, m2 = 0`` is ``cosface``.
The gradient is the exact derivative ψ'(c) (not a straight-through estimate); where
``|c| → 1`` the factor ``1 / sin θ`` is bounded by flooring ``sin θ`` at 1e-6.

>>> margin = AngularMargin.arcface(scale=64.0, margin=0.5)
>>> psi, dpsi = margin.target_logit(torch.tensor([0.3]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybridfc.config import ParsedMargin, parse_margin

_MIN_SIN = 1e-6


@dataclass(frozen=True)
class SoftmaxMargin:
    """Plain softmax over ``x·Wᵀ``: no normalisation, no scale, no margin."""

    normalize = False
    scale = 1.0

    def target_logit(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ψ(c), ψ'(c))`` of the target similarities ``c`` ``(n,)``."""
        return c, torch.ones_like(c)


@dataclass(frozen=True)
class AngularMargin:
    """``ψ(cos θ) = cos(m1·θ + m2) − m3`` on normalised features and centres, scaled by ``s``."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    normalize = True

    @classmethod
    def arcface(cls, scale: float = 64.0, margin: float = 0.5) -> "AngularMargin":
        return cls(scale=scale, m1=1.0, m2=margin, m3=0.0)

    @classmethod
    def cosface(cls, scale: float = 64.0, margin: float = 0.35) -> "AngularMargin":
        return cls(scale=scale, m1=1.0, m2=0.0, m3=margin)

    def target_logit(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ψ(c), ψ'(c))`` of the target cosines ``c`` ``(n,)``."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return c - self.m3, torch.ones_like(c)
        sin_theta = (1 - c * c).clamp_min(0).sqrt()
        if self.m1 == 1.0:
            psi, dpsi = self._shifted_angle(c, sin_theta)
            in_range = c >= -math.cos(self.m2)
        else:
            psi, dpsi, in_range = self._scaled_angle(c, sin_theta)
        fallback = c - self.m3 - self.m2 * math.sin(self.m2)
        return torch.where(in_range, psi, fallback), torch.where(in_range, dpsi, torch.ones_like(c))

    def _shifted_angle(self, c: torch.Tensor, sin_theta: torch.Tensor):
        """``cos(θ + m2) − m3`` by the angle-sum identity (no arccos)."""
        cos_m, sin_m = math.cos(self.m2), math.sin(self.m2)
        psi = c * cos_m - sin_theta * sin_m - self.m3
        dpsi = cos_m + sin_m * c / sin_theta.clamp_min(_MIN_SIN)
        return psi, dpsi

    def _scaled_angle(self, c: torch.Tensor, sin_theta: torch.Tensor):
        """``cos(m1·θ + m2) − m3`` through θ = arccos(c)."""
        angle = self.m1 * torch.arccos(c.clamp(-1, 1)) + self.m2
        psi = torch.cos(angle) - self.m3
        dpsi = self.m1 * torch.sin(angle) / sin_theta.clamp_min(_MIN_SIN)
        return psi, dpsi, angle <= math.pi


Margin = SoftmaxMargin | AngularMargin


def build_margin(spec: "dict | ParsedMargin | Margin") -> Margin:
    """A margin from its config form, e.g. ``{"type": "arcface", "scale": 64.0, "margin": 0.5}``, or
    from its parsed ds_config section."""
    if isinstance(spec, (SoftmaxMargin, AngularMargin)):
        return spec
    cfg = parse_margin(spec)
    if cfg.type == "softmax":
        return SoftmaxMargin()
    if cfg.type == "arcface":
        return AngularMargin.arcface(cfg.scale, cfg.margin)
    if cfg.type == "cosface":
        return AngularMargin.cosface(cfg.scale, cfg.margin)
    return AngularMargin(scale=cfg.scale, m1=cfg.m1, m2=cfg.m2, m3=cfg.m3)
