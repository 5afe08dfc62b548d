"""Float64 single-process references: the full softmax over all classes on the whole batch.

Written with plain autograd ops (arccos/cos/where), independently of the head's fused kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_psi(cos: torch.Tensor, margin: dict) -> torch.Tensor:
    """Target logit before scaling, from the margin's config dict, by the textbook formulas."""
    kind = margin["type"]
    if kind == "cosface":
        return cos - margin["margin"]
    if kind == "arcface":
        m1, m2, m3 = 1.0, margin["margin"], 0.0
    else:
        m1, m2, m3 = margin["m1"], margin["m2"], margin["m3"]
    theta = torch.arccos(cos.clamp(-1, 1))
    angle = m1 * theta + m2
    return torch.where(angle <= math.pi, torch.cos(angle) - m3, cos - m3 - m2 * math.sin(m2))


def reference_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin: dict) -> torch.Tensor:
    """Mean margin-softmax cross-entropy: ``embeddings (B, d)``, ``labels (B,)``, ``weight (C, d)``."""
    if margin["type"] == "softmax":
        return F.cross_entropy(embeddings @ weight.t(), labels)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
    target = cos.gather(1, labels[:, None]).squeeze(1)
    logits = cos.scatter(1, labels[:, None], reference_psi(target, margin)[:, None])
    return F.cross_entropy(margin["scale"] * logits, labels)


def reference_grads(embeddings, labels, weight, margin):
    """``(loss, dL/dE (B, d), dL/dW (C, d))`` in float64."""
    e = embeddings.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = reference_loss(e, labels, w, margin)
    loss.backward()
    return loss.detach(), e.grad, w.grad
