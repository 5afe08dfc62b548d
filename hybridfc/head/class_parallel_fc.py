"""``ClassParallelFC``: a margin-softmax classifier whose class rows are sharded over ranks.

Usable with plain ``torch.distributed`` (any training loop) or through :func:`hybridfc.initialize`.

>>> import torch.distributed as dist, hybridfc
>>> dist.init_process_group("gloo")                  # or nccl; one process per device
>>> head = hybridfc.ClassParallelFC(1_000_000, 512, margin={"type": "arcface", "scale": 64.0, "margin": 0.5},
...                                 selection={"type": "knn", "budget": 0.1, "k": 32, "rebuild_interval": 1000})
>>> head_opt = hybridfc.build_head_optimizer(head, {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9}})
>>> loss = head(backbone(x), y)                      # x: this rank's batch, y: (b,) int64 global labels
>>> loss.backward(); head_opt.step(); head_opt.zero_grad()

Sharding: rank r of ``group`` owns the contiguous rows ``[class_start, class_start + num_local)``;
the ``num_classes % world_size`` leftover rows go to the lowest ranks. Row c's initial value is
drawn from ``seed`` and c alone, so runs and checkpoints compare across world sizes.

One forward pass, N ranks, local batch ``b_r``, global batch ``B = Σ b_r``:

1. every rank checks its inputs on the device; the verdicts travel with the batch sizes (one
   all-gather, read once on the host), so a bad input raises
   :class:`~hybridfc.head.validation.InputError` on every rank;
2. features ``(b_r, d)``, in at least fp32, and labels are all-gathered into ``(B, d)`` and
   ``(B,)``; so the backward reduce-scatter sums the ranks' feature gradients in fp32 too;
3. the selection picks this rank's active rows ``A_r`` (every row for ``full``; see
   :mod:`hybridfc.selection`), always including the batch's positives in the shard;
4. each rank computes the logits of its active rows ``(B, |A_r|)`` in fp32 and the ranks agree
   on the softmax (:func:`~hybridfc.head.cross_entropy.margin_cross_entropy`);
5. the loss returned is the mean over the global batch, the same scalar on every rank.

Sparse updates: with any selection but ``full``, no dense gradient over the shard is made. The
active rows are copied out of the shard; their gradient is kept with the rows touched since the
last ``zero_grad`` (summed over gradient-accumulation micro-batches), and the head optimizer
updates those rows only (:meth:`gradient`). With ``full``, ``weight.grad`` is the dense
gradient as for any module.

Storage: ``storage_dtype`` (fp32, bf16, fp16) is the dtype of the shard and of its optimizer
state; logits, softmax and the active rows' gradients are fp32 whatever it is.

Gradient convention: ``weight.grad`` is exactly ∂L/∂W (this rank's rows) of the global-mean loss
L. The gradient that reaches rank r's embeddings is ``N · ∂L/∂e_r``: a data-parallel backbone
*averages* its gradients over the N ranks, so it then receives exactly ∂L/∂θ (insightface's
convention).

Non-finite embeddings on any rank (e.g. fp16 overflow), or a non-finite loss, mark the step as
non-finite on every rank: the head optimizer skips its update, and ``non_finite_batches``
counts such batches.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridfc.config import (DTYPES, LOGITS_CHOICES, CommunicationConfig, ConfigError, ParsedMargin,
                             ParsedSelection, parse_communication, resolve_logits)
from hybridfc.head.cross_entropy import LogitsWorkspace, margin_cross_entropy, unshared
from hybridfc.head.margins import AngularMargin, Margin, build_margin
from hybridfc.head.validation import check_inputs, raise_if_any_bad
from hybridfc.log import log_dist
from hybridfc.parallel.accounting import CommunicationStats, StatsCursor
from hybridfc.parallel.chunks import ChunkedGather, ChunkLayout
from hybridfc.parallel.collectives import all_gather_vector, gather_padded
from hybridfc.parallel.groups import ProcessGroup, collective_device, group_rank, group_size, shard_range
from hybridfc.parallel.mappings import scale_gradient
from hybridfc.selection import Selection, Shard, build_selection

_INIT_BLOCK_ROWS = 4096


def storage_dtype_of(dtype: "str | torch.dtype") -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` (or the torch dtype itself) -> the torch dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"hybridfc: storage_dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"hybridfc: storage_dtype must be torch.float32, bfloat16 or float16 (got {dtype})")
    return dtype


def init_class_rows(start: int, count: int, width: int, seed: int, std: float) -> torch.Tensor:
    """Rows ``[start, start + count)`` of a ``N(0, std²)`` matrix whose values depend on ``seed``
    and the row index only (drawn in fixed blocks of rows), ``(count, width)`` fp32."""
    first, last = start // _INIT_BLOCK_ROWS, (start + count - 1) // _INIT_BLOCK_ROWS
    blocks = [
        np.random.default_rng([seed, block]).standard_normal((_INIT_BLOCK_ROWS, width), dtype=np.float32)
        for block in range(first, last + 1)
    ]
    offset = start - first * _INIT_BLOCK_ROWS
    return torch.from_numpy(np.concatenate(blocks)[offset : offset + count] * np.float32(std))


class ClassParallelFC(nn.Module):
    """Margin-softmax classification layer sharded over the class dimension.

    Args:
        num_classes: C, the number of classes over all ranks (at least the group's size).
        embedding_size: d, the width of the features.
        margin: a margin config dict (``{"type": "arcface", "scale": 64.0, "margin": 0.5}``;
            also ``"softmax"``, ``"cosface"``, ``"combined"``), its parsed ds_config section, or a
            margin object.
            Default: ArcFace, s = 64, m = 0.5.
        group: the process group that shares the classes (default: the world).
        seed: seed of the weight initialisation.
        init_std: standard deviation of the initial rows.
        device: where the shard lives.
        selection: which rows enter each step's softmax: ``{"type": "full"}`` (default),
            ``{"type": "partial", "budget": 0.1}``, ``{"type": "knn", "budget": 0.1, "k": 32,
            "rebuild_interval": 1000}`` or ``{"type": "hf", ...}`` (:mod:`hybridfc.selection`), or
            its parsed ds_config section.
        storage_dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (or the torch dtype) of the shard.
        communication: ``{"chunks": K}`` (default 1; or the parsed section): the local batch's
            feature exchange in K chunks, overlapped with the head's compute
            (:mod:`hybridfc.head.cross_entropy`).
        logits: what a step keeps of its ``(B, C_r)`` logits for the backward pass: ``"store"``
            (one fp32 buffer), ``"recompute"`` (a tile; the backward computes them again, a
            fourth GEMM) or ``"auto"``: ``store`` while the buffer fits ``logits_budget_mb``.
        logits_budget_mb: the largest logits buffer ``auto`` stores, in MiB.

    Attributes:
        weight: ``(num_local, d)`` this rank's rows.
        class_start, num_local: the first global class id of the shard and its row count.
        selection: the :class:`~hybridfc.selection.ClassSelection` in use.
        last_selection: the latest forward's active set (None for ``full``), for inspection.
        steps: optimizer steps so far (:meth:`finish_step`).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: "dict | ParsedMargin | Margin | None" = None,
        group: ProcessGroup = None,
        seed: int = 0,
        init_std: float = 0.01,
        device: Optional[torch.device] = None,
        selection: "dict | ParsedSelection | None" = None,
        storage_dtype: "str | torch.dtype" = torch.float32,
        communication: "dict | CommunicationConfig | None" = None,
        logits: str = "auto",
        logits_budget_mb: float = 1024,
    ) -> None:
        super().__init__()
        self.group = group
        self.world_size, self.rank = group_size(group), group_rank(group)
        if num_classes < self.world_size:
            raise ValueError(
                f"hybridfc: num_classes={num_classes} is smaller than the {self.world_size} ranks "
                "that shard it; every rank needs at least one class"
            )
        if embedding_size < 1:
            raise ValueError(f"hybridfc: embedding_size must be >= 1, got {embedding_size}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin = AngularMargin.arcface() if margin is None else build_margin(margin)
        self.class_start, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        rows = init_class_rows(self.class_start, self.num_local, embedding_size, seed, init_std)
        self.weight = nn.Parameter(rows.to(device=device, dtype=storage_dtype_of(storage_dtype)))
        shard = Shard(num_classes, self.class_start, self.num_local, self.rank, self.world_size, group)
        self.selection = build_selection(selection or {"type": "full"}, shard, seed)
        self.chunks = _chunks_of(communication)
        self.logits, self.logits_budget_mb = _logits_mode_of(logits, logits_budget_mb)
        self.non_finite_batches = 0
        self.non_finite_inputs: set[int] = set()
        self.non_finite_loss = False
        self.steps = 0
        self.last_selection: Optional[Selection] = None
        self._micro_batches = 0
        self._touched: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._workspace = LogitsWorkspace()
        self._communication = StatsCursor()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the global batch: ``embeddings (b, d)``, ``labels (b,)`` -> scalar."""
        sizes, bad_ranks = self._exchange_sizes(embeddings, labels)
        embeddings = embeddings.to(device=self.weight.device,
                                   dtype=torch.promote_types(embeddings.dtype, torch.float32))
        all_labels = gather_padded(labels.to(device=self.weight.device, dtype=torch.int64), sizes, self.group)
        layout = ChunkLayout.of(sizes, self.chunks)
        if self.selection.uses_features:
            gathered = ChunkedGather(embeddings.detach(), layout, self.rank, self.group)
            selection = self._select(all_labels, gathered.wait_all())
        else:
            selection = self._select(all_labels, None)
            gathered = ChunkedGather(embeddings.detach(), layout, self.rank, self.group)
        if self.selection.dense:
            weight = self.weight.to(embeddings.dtype)
        else:
            weight = self._active_rows(selection.rows, embeddings.dtype)
        losses = margin_cross_entropy(scale_gradient(embeddings, self.world_size), gathered, weight, selection.target,
                                      self.margin, self.rank, self.group, self._workspace, selection.logit_offset,
                                      self.logits_mode(sum(sizes), weight.shape[0], embeddings.element_size()))
        loss = losses.mean()
        loss_is_finite = bool(torch.isfinite(loss))
        if bad_ranks or not loss_is_finite:
            self._count_non_finite(bad_ranks, loss_is_finite)
        return loss

    def logits_mode(self, batch: int, rows: int, value_bytes: int = 4) -> str:
        """``"store"`` or ``"recompute"`` for a step of ``batch`` samples over ``rows`` rows of the
        shard, its logits ``value_bytes`` wide."""
        return resolve_logits(self.logits, batch, rows, self.logits_budget_mb, value_bytes)

    def _select(self, labels: torch.Tensor, features: Optional[torch.Tensor]) -> Selection:
        """This micro-batch's active rows for the gathered ``labels (B,)`` (and raw ``features (B, d)``
        for a selection that looks at them)."""
        selection = self.selection.select(labels, features, self.weight, self.steps, self._micro_batches)
        self._micro_batches += 1
        self.last_selection = None if self.selection.dense else selection
        return selection

    def _active_rows(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A leaf copy of ``weight[rows]`` whose gradient is added to the touched rows; for a step
        that will be backpropagated, in the workspace's buffer, handed back once the gradient is in
        (a fresh copy of that size costs its page faults every step). The gradient is taken from the
        leaf once autograd has put it there: autograd hands a leaf the gradient itself only when
        nothing else holds it (else a copy), and the leaf keeps none, so zero_grad can recycle it."""
        weight = self.weight.detach()
        if not torch.is_grad_enabled():
            return weight.index_select(0, rows).to(dtype)
        if weight.dtype == dtype:
            buffer = self._workspace.take_rows(rows.numel(), weight)
            active = torch.index_select(weight, 0, rows, out=buffer).detach()
        else:
            buffer, active = None, weight.index_select(0, rows).to(dtype)
        active.requires_grad_(True)

        def take_gradient(leaf: torch.Tensor) -> None:
            gradient, leaf.grad = leaf.grad, None
            self._add_row_gradient(rows, gradient, buffer)

        active.register_post_accumulate_grad_hook(take_gradient)
        return active

    def _add_row_gradient(self, rows: torch.Tensor, grad: torch.Tensor, buffer: Optional[torch.Tensor]) -> None:
        """Keep ``grad`` of ``rows``; rows touched by several micro-batches are summed. The active
        rows' ``buffer`` goes back to the workspace: the backward pass no longer reads it."""
        if buffer is not None:
            self._workspace.give_back_rows(buffer)
        if self._touched is None:
            self._touched = (rows, grad)
            return
        kept_rows, kept_grad = self._touched
        union, where = torch.unique(torch.cat([kept_rows, rows]), sorted=True, return_inverse=True)
        total = grad.new_zeros(union.numel(), grad.shape[1])
        total.index_add_(0, where[: kept_rows.numel()], kept_grad)
        total.index_add_(0, where[kept_rows.numel():], grad)
        self._touched = (union, total)

    def gradient(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(rows, grad)`` since the last ``zero_grad``: the touched local rows ``(T,)`` and their
        gradient ``(T, d)`` fp32, or ``(None, weight.grad)`` when every row is computed (``full``)."""
        if self.selection.dense:
            return None, self.weight.grad
        return self._touched if self._touched is not None else (None, None)

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Features on the shard's device, in at least fp32, normalised when the margin is angular."""
        features = features.to(device=self.weight.device, dtype=torch.promote_types(features.dtype, torch.float32))
        return F.normalize(features, dim=1) if self.margin.normalize else features

    def _exchange_sizes(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]]:
        """All-gather every rank's batch size and input verdict; raise on any bad input. Returns
        the batch sizes and the ranks whose embeddings are not finite."""
        verdict = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        verdicts = all_gather_vector(verdict.to(collective_device(self.group)), self.group).cpu()
        raise_if_any_bad(verdicts, self.num_classes, self.embedding_size)
        return verdicts[:, 0].tolist(), torch.nonzero(verdicts[:, 3]).squeeze(1).tolist()

    def _count_non_finite(self, bad_ranks: list[int], loss_is_finite: bool) -> None:
        """Every rank calls this for the same batch: the step will be skipped."""
        self.non_finite_inputs.update(bad_ranks)
        self.non_finite_loss |= not loss_is_finite
        self.non_finite_batches += 1
        what = f"non-finite embeddings on rank(s) {bad_ranks}" if bad_ranks else "a non-finite loss"
        log_dist(f"{what}: this step will be skipped ({self.non_finite_batches} non-finite batches so far)",
                 level=logging.WARNING)

    @property
    def step_is_finite(self) -> bool:
        """No rank saw non-finite embeddings, and the loss was finite, since the last reset."""
        return not self.non_finite_inputs and not self.non_finite_loss

    def reset_step_state(self) -> None:
        """Start a new optimizer step (called by the head optimizer's ``zero_grad``)."""
        self.non_finite_inputs, self.non_finite_loss = set(), False
        touched, self._touched = self._touched, None
        if touched is not None:
            gradient = touched[1]
            del touched
            if unshared(gradient):   # the active rows' gradient: its memory serves the next step
                self._workspace.recycle_gradient(gradient)
        self._micro_batches = 0

    def recycle_gradient(self, gradient: torch.Tensor) -> None:
        """Take back a dense weight gradient that nothing reads any more: the next backward pass
        writes into it instead of allocating (and page-faulting) ``(C_r, d)`` afresh. Only a
        gradient of the dtype the loss computes (a bf16/fp16 shard's is cast from it) is kept."""
        if gradient.dtype == torch.promote_types(self.weight.dtype, torch.float32):
            self._workspace.recycle_gradient(gradient)

    def finish_step(self) -> None:
        """Count an optimizer step (applied or skipped; called by the head optimizer's ``step``);
        selections that rebuild a structure from the rows schedule it here."""
        self.steps += 1
        self.selection.step_end(self.steps, self.weight)

    def close(self) -> None:
        """Stop the selection's background rebuild, if one is in flight (the run is ending)."""
        self.selection.close()

    def communication_stats(self) -> CommunicationStats:
        """What this process sent to other ranks since the previous call (or since the head was
        made): calls, bytes and exposed seconds per collective kind
        (:mod:`hybridfc.parallel.accounting`). Counts every collective of hybridfc in this
        process: the head's, its selection's and, under :func:`hybridfc.initialize`, the engine's."""
        return self._communication.take()

    @torch.no_grad()
    def local_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores of this rank's classes, ``(n, d)`` -> ``(n, num_local)`` fp32, no margin:
        cosines for angular margins, ``x·Wᵀ`` for softmax."""
        features = self._prepare(embeddings)
        weight = self.weight.to(features.dtype)
        if self.margin.normalize:
            weight = F.normalize(weight, dim=1)
        return features @ weight.t()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"shard=[{self.class_start}, {self.class_start + self.num_local}) of rank "
            f"{self.rank}/{self.world_size}, margin={self.margin}"
        )


def _logits_mode_of(logits: str, budget_mb: float) -> tuple[str, float]:
    """The validated ``logits`` mode and its budget."""
    if logits not in LOGITS_CHOICES:
        raise ConfigError(f"logits: must be one of {', '.join(LOGITS_CHOICES)} (got {logits!r})")
    if not budget_mb > 0:
        raise ConfigError(f"logits_budget_mb: must be a positive number of MiB (got {budget_mb!r})")
    return logits, float(budget_mb)


def _chunks_of(communication: "dict | CommunicationConfig | None") -> int:
    """The head's one communication setting. ``grad_topk`` compresses a backbone's gradients under
    :func:`hybridfc.initialize`; a head alone has no backbone, so it is refused rather than ignored."""
    section = parse_communication(communication or {})
    if section.grad_topk is not None:
        raise ConfigError("communication.grad_topk: compresses the backbone's gradients, which a ClassParallelFC "
                          "alone does not have; set it in the ds_config's hybridfc.communication section, used by "
                          "hybridfc.initialize")
    return section.chunks

