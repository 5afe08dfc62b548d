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


def reference_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin: dict,
                   logit_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Mean margin-softmax cross-entropy: ``embeddings (B, d)``, ``labels (B,)``, ``weight (C, d)``;
    ``logit_offset (C,)`` is added to every logit but the targets'."""
    if margin["type"] == "softmax":
        logits = embeddings @ weight.t()
    else:
        cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
        target = cos.gather(1, labels[:, None]).squeeze(1)
        logits = margin["scale"] * cos.scatter(1, labels[:, None], reference_psi(target, margin)[:, None])
    if logit_offset is not None:
        logits = logits + logit_offset.to(logits.dtype).expand_as(logits).scatter(1, labels[:, None], 0.0)
    return F.cross_entropy(logits, labels)


def reference_grads(embeddings, labels, weight, margin, logit_offset=None):
    """``(loss, dL/dE (B, d), dL/dW (C, d))`` in float64."""
    e = embeddings.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = reference_loss(e, labels, w, margin, logit_offset)
    loss.backward()
    return loss.detach(), e.grad, w.grad


def random_weight(num_classes: int, width: int, seed: int) -> torch.Tensor:
    """Fresh ``N(0, 1)`` class rows ``(C, d)`` in float64, the same in every process for a seed."""
    generator = torch.Generator().manual_seed(2 * seed)
    return torch.randn(num_classes, width, generator=generator, dtype=torch.float64)


def random_batch(num_classes: int, width: int, batch: int, seed: int, weight: torch.Tensor | None = None):
    """Fresh embeddings ``(B, d)`` float64 and labels ``(B,)`` int64, the same in every process.

    With ``weight``, every third row points close to its class row and every third row away
    from it, so the target cosines spread over (-1, 1) and reach the margins' edge regions.
    """
    generator = torch.Generator().manual_seed(2 * seed + 1)
    labels = torch.randint(num_classes, (batch,), generator=generator)
    embeddings = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    if weight is not None:
        centres = 3 * F.normalize(weight[labels], dim=1)
        embeddings[0::3] = centres[0::3] + 0.3 * embeddings[0::3]
        embeddings[1::3] = -centres[1::3] + 0.3 * embeddings[1::3]
    return embeddings, labels


def rank_rows(sizes, rank: int) -> slice:
    """The rows of ``rank`` in a global batch made of local batches of ``sizes`` in rank order."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def reference_grads_over(classes: torch.Tensor, embeddings, labels, weight, margin, logit_offset=None):
    """The margin softmax over the classes ``classes`` (sorted global ids) only: ``(loss, dL/dE
    (B, d), dL/dW (len(classes), d))`` in float64, every label being one of ``classes``;
    ``logit_offset`` ``(len(classes),)`` as in :func:`reference_loss`."""
    targets = torch.searchsorted(classes, labels)
    assert torch.equal(classes[targets.clamp_max(len(classes) - 1)], labels), "a label is not among the classes"
    return reference_grads(embeddings, targets, weight[classes], margin, logit_offset)


def sgd_step(optimizer: torch.optim.SGD, weight: torch.Tensor, lars: float = 0.0) -> None:
    """One ``torch.optim.SGD`` step of ``weight`` (one param group, its gradient set); with ``lars``
    the gradient and the weight decay times LARS's trust ratio ``lars·‖W‖ / (‖g‖ + wd·‖W‖)`` (what
    enters the momentum, ``g + wd·w``, scaled), the group's weight decay put back after."""
    group = optimizer.param_groups[0]
    decay = group["weight_decay"]
    if lars:
        norm = weight.detach().norm()
        trust = float(lars * norm / (weight.grad.norm() + decay * norm))
        weight.grad.mul_(trust)
        group["weight_decay"] = decay * trust
    optimizer.step()
    group["weight_decay"] = decay


TEST_TILE_COLUMNS = 5
"""Columns of a CPU logits tile in the ranks of tests that call :func:`use_small_tiles`: small shards
then span several tiles, with targets on their edges."""

TEST_BATCH_ROWS = 48
"""Rows of a CPU tile in a sweep over the whole batch in those ranks: not a multiple of the chunks'
64-row tiles, so its tiles straddle theirs."""


def use_small_tiles(columns: int = TEST_TILE_COLUMNS) -> None:
    """Make this process's CPU logits tiles ``columns`` wide, and the whole batch's sweeps
    :data:`TEST_BATCH_ROWS` rows tall (call it in a rank, before the head runs)."""
    import hybridfc.head.tiles as tiles

    tiles.CPU_COLUMNS = columns
    tiles.CPU_BATCH_ROWS = TEST_BATCH_ROWS
