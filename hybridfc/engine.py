"""``hybridfc.initialize``: ``deepspeed.initialize`` for a backbone plus a class-parallel head.

The backbone is wrapped by the DeepSpeed engine as usual (ZeRO 0–3, bf16/fp16, DeepSpeed's
optimizers, schedulers and checkpoints). The head lives *outside* that engine, with its own
optimizer: DeepSpeed would broadcast a parameter from rank 0 and average its gradient, which
is wrong for rows that differ on every rank. :class:`HybridEngine` holds both and drives them
together, so a DeepSpeed training loop stays as it was:

>>> engine, optimizer, loader, scheduler = hybridfc.initialize(args=args, model=backbone,
...     model_parameters=backbone.parameters(), training_data=dataset)
>>> for x, y in loader:
...     loss = engine(x, y)          # backbone -> head -> loss (mean over the global batch)
...     engine.backward(loss)
...     engine.step()

How the head follows the backbone:

* gradient accumulation: the head steps at DeepSpeed's accumulation boundaries, on the
  gradient accumulated over the micro-batches (DeepSpeed divides each loss by their count);
* one step for both: at each boundary :mod:`hybridfc.step` unscales the head's gradient, agrees
  with the other ranks on whether anything was non-finite, and applies or skips backbone and head
  together; one step counter (``global_steps``), one skip count (``skipped_steps``), each skip
  logged with its cause, the run stopped after ``max_consecutive_skips`` in a row;
* learning rate: the head's lr is its configured lr times the ratio of the backbone's current
  lr to the backbone's configured lr, so DeepSpeed's warm-up and decay schedules apply to both;
  both are multiplied by ``lr_scale``: ``schedule.batch_scaling``'s factor for the global batch
  times ``schedule.plateau``'s, lowered when the held-out metric of :meth:`evaluate` stops
  improving (:mod:`hybridfc.schedule`) and saved in checkpoints;
* checkpoints: ``save_checkpoint`` / ``load_checkpoint`` store the head's shards and optimizer
  state inside DeepSpeed's checkpoint tag directory (see :mod:`hybridfc.checkpoint`), with the
  loader's position and each rank's random generators, complete or not at all; a checkpoint of
  fewer classes grows the head (the new rows imprinted with ``warm_start.imprint``);
* warm start: with ``warm_start.imprint`` the first forward of a fresh run (no checkpoint loaded)
  sets every class row to the mean normalised embedding of its training samples (:meth:`imprint`),
  and ``warm_start.refresh_interval`` does it again every that many steps;
* the backbone's gradients: DeepSpeed's reduction, or with ``communication.grad_topk`` each rank's
  top-k entries with error feedback (:mod:`hybridfc.compression`), the residuals saved in checkpoints;
* communication: ``communication_stats()`` returns what hybridfc sent since its previous call
  (:mod:`hybridfc.parallel.accounting`), and every ``steps_per_print`` steps one log line sums it up.

``state_dict``, ``load_state_dict``, ``parameters``, ``zero_grad``, ``train`` and ``eval`` cover
backbone and head together; the DeepSpeed attributes that describe the run (``global_steps``,
``device``, ``get_lr``… :data:`FORWARDED`) pass through; anything else is ``engine.backbone``'s.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
from typing import Any, Iterable, Iterator, Optional, Sequence

import deepspeed
import torch
from deepspeed.utils import groups
from torch import nn

from hybridfc.checkpoint import (CheckpointError, apply_head, publish, reached, read_head, rng_states, save_head,
                                 saved_world_size, set_rng_states, staging_tag)
from hybridfc.compression.error_feedback import VALUE_DTYPES, TopKGradientReducer
from hybridfc.config import (CommunicationConfig, ConfigError, EvaluationConfig, HybridFCConfig, ScheduleConfig,
                             WarmStartConfig, config_fingerprint, load_ds_config, split_ds_config)
from hybridfc.data.loader import DistributedLoader
from hybridfc.deepspeed_adapter import DeepSpeedAdapter, release_shared_memory
from hybridfc.eval.topk import accuracies, topk_correct
from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.imprint import imprint
from hybridfc.head.optimizer import HeadOptimizer, build_head_optimizer
from hybridfc.log import log_dist
from hybridfc.parallel.accounting import CommunicationStats, StatsCursor
from hybridfc.parallel.chunks import TILE_ROWS, ChunkLayout
from hybridfc.parallel.collectives import all_gather_vector, barrier, run_on_every_rank
from hybridfc.parallel.groups import ProcessGroup, collective_device, group_rank, group_size
from hybridfc.schedule import PlateauLR
from hybridfc.step import TrainingStep


FORWARDED = frozenset({
    "device", "local_rank", "global_rank", "world_size", "module", "optimizer", "lr_scheduler", "get_lr",
    "global_steps", "global_samples", "skipped_steps", "was_step_applied", "is_gradient_accumulation_boundary",
    "gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "train_batch_size", "steps_per_print",
    "zero_optimization_stage", "fp16_enabled", "bfloat16_enabled", "gradient_clipping", "get_global_grad_norm",
    "monitor", "training_dataloader", "config",
})
"""DeepSpeed engine attributes that ``HybridEngine`` passes through: they describe the run as a
whole. Everything that holds or changes state exists on the facade itself for backbone and head
together (forward, backward, step, zero_grad, train, eval, parameters, state_dict, checkpoints)."""


class HybridEngine:
    """A DeepSpeed engine for the backbone and a :class:`ClassParallelFC` head, driven as one.

    Attributes:
        backbone: the ``deepspeed.DeepSpeedEngine`` wrapping the backbone.
        head: the class-parallel head (this rank's shard).
        head_optimizer: the head's optimizer.
        loader: the training loader :func:`initialize` made (None without ``training_data``); its
            position in the epoch is saved and restored with the checkpoints, with this rank's
            random generators, so a resumed run continues the same sample sequence.
        last_evaluation, last_evaluated_step: the latest :meth:`evaluate` result and its step.

    The DeepSpeed attributes in :data:`FORWARDED` are reached through the facade
    (``engine.global_steps``); any other is an ``AttributeError`` that points to ``engine.backbone``.
    """

    def __init__(self, backbone: deepspeed.DeepSpeedEngine, head: ClassParallelFC, head_optimizer: HeadOptimizer,
                 backbone_base_lr: Optional[float], evaluation: Optional[EvaluationConfig] = None,
                 max_consecutive_skips: int = 10, loader: Optional[DistributedLoader] = None,
                 communication: Optional[CommunicationConfig] = None,
                 warm_start: Optional[WarmStartConfig] = None, schedule: Optional[ScheduleConfig] = None) -> None:
        self.backbone = backbone
        self.loader = loader
        self.head = head
        self.head_optimizer = head_optimizer
        self.evaluation = evaluation or EvaluationConfig()
        self.last_evaluation: dict[int, float] = {}
        self.last_evaluated_step = -1
        self._adapter = DeepSpeedAdapter(backbone)
        self.gradient_reducer = self._gradient_reducer(communication or CommunicationConfig())
        self._step = TrainingStep(self._adapter, head, head_optimizer, max_consecutive_skips, self.gradient_reducer)
        self._backbone_base_lr = backbone_base_lr
        self._loss_scale = 1.0
        self._communication = StatsCursor()
        self._communication_logged = StatsCursor()
        self._logged_step = backbone.global_steps
        self._imprints = bool(warm_start and warm_start.imprint)
        self._imprint_pending: Optional[range] = (range(head.num_classes) if self._imprints
                                                  and backbone.global_steps == 0 else None)
        self._refresh_interval = warm_start.refresh_interval if warm_start is not None else 0
        schedule = schedule or ScheduleConfig()
        plateau = schedule.plateau
        self.plateau = None if plateau is None else PlateauLR("max", plateau.factor, plateau.patience,
                                                              plateau.threshold, plateau.min_factor)
        self._plateau_step = -1
        self._data_at_step: Optional[dict[str, Any]] = None
        self.batch_factor = self._batch_factor(schedule)
        head_optimizer.check_peak_lr(head_optimizer.param_groups[0]["lr"] * self.batch_factor)

    def _gradient_reducer(self, communication: CommunicationConfig) -> Optional[TopKGradientReducer]:
        """The top-k reduction of the backbone's gradients, where ``grad_topk`` asks for it."""
        if communication.grad_topk is None:
            return None
        momentum = self._adapter.take_over_reduction(communication.grad_topk_momentum_correction)
        numel = self._adapter.gradient_numel()
        reducer = TopKGradientReducer(numel, communication.grad_topk, communication.grad_topk_warmup_steps,
                                      VALUE_DTYPES[communication.grad_topk_value_dtype], momentum, self.head.group,
                                      self.backbone.device)
        log_dist(f"backbone gradients: top {communication.grad_topk:g} of {numel} entries per rank and step "
                 f"({reducer.pairs()} pairs now, {communication.grad_topk_value_dtype} values, warm-up "
                 f"{communication.grad_topk_warmup_steps} steps), error feedback; DeepSpeed's reduction is off")
        return reducer

    def __getattr__(self, name: str) -> Any:
        if name in FORWARDED:
            return getattr(self.__dict__["backbone"], name)
        raise AttributeError(f"HybridEngine has no attribute {name!r}; the DeepSpeed engine of the backbone is "
                             f"engine.backbone, the head engine.head")

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs, labels)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of this micro-batch (mean over the global batch): ``inputs (b, …)``, ``labels (b,)``.
        The first call of a run with ``warm_start.imprint`` imprints the head first (after a
        checkpoint that grew the head, its new rows)."""
        if self._imprint_pending is not None:
            self.imprint(classes=self._imprint_pending)
        return self.head(self.embed(inputs), labels.to(self.head.weight.device))

    def imprint(self, batches: Optional[Iterable] = None, classes: Optional[range] = None) -> int:
        """Warm start: every class row with samples in ``batches`` (this rank's ``(x, y)``; default:
        one pass over the training data given to :func:`initialize`, in order) becomes the mean
        L2-normalised embedding of them under the current backbone, in eval mode
        (:func:`hybridfc.head.imprint.imprint`); on every rank. ``classes``: only the samples, and
        rows, of these classes (default: all). Returns the rows imprinted."""
        self._imprint_pending = None
        if batches is None:
            if self.loader is None:
                raise ValueError("engine.imprint(): no training_data was given to hybridfc.initialize; pass the batches")
            loader = self.loader
            batches = DistributedLoader(loader.dataset, loader.batch_size, rank=loader.rank,
                                        world_size=loader.world_size, shuffle=False, num_workers=loader.num_workers,
                                        collate_fn=loader.collate_fn)
        was_training = self.backbone.training
        self.eval()
        try:
            count = imprint(self.head, self.embed, _of_classes(batches, classes, self.head.weight.device))
        finally:
            self.train(was_training)
        log_dist(f"warm start: {count} of {self.head.num_classes} class rows imprinted from the backbone's embeddings")
        return count

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """The backbone's embeddings ``(b, d)`` of ``inputs``, cast to the engine's dtype and device."""
        inputs = inputs.to(self.backbone.device)
        if inputs.is_floating_point():
            inputs = inputs.to(self._adapter.compute_dtype())
        return self.backbone(inputs)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """DeepSpeed's backward; gradients reach the backbone and the head alike."""
        self._loss_scale = self._adapter.loss_scale()
        return self.backbone.backward(loss, **kwargs)

    def step(self) -> None:
        """DeepSpeed's step; at an accumulation boundary the step of backbone and head together,
        applied or skipped on every rank alike (:mod:`hybridfc.step`)."""
        if not self.backbone.is_gradient_accumulation_boundary():
            self.backbone.step()
        else:
            self._step.finish(self._loss_scale, self._lr_factor() * self.lr_scale)
            if self._refresh_interval and self.backbone.global_steps % self._refresh_interval == 0:
                self.imprint()
                self.head_optimizer.forget_momentum()
            self._log_communication()
        self._data_at_step = self._data_position()

    def _data_position(self) -> dict[str, Any]:
        """Where this rank's data stands: its random generators and the loader's position. A
        checkpoint keeps them as of the last :meth:`step`, so a loop that has already taken the
        next batch when it saves resumes at that batch, not after it."""
        return {"rng": rng_states(), "loader": None if self.loader is None else self.loader.state_dict()}

    def zero_grad(self) -> None:
        """Drop the gradients of backbone and head."""
        self.backbone.zero_grad()
        self.head_optimizer.zero_grad()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's parameters, then the head's shard."""
        yield from self.backbone.module.parameters()
        yield from self.head.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``backbone.<name>`` and ``head.weight`` (this rank's shard)."""
        for name, parameter in self.backbone.module.named_parameters():
            yield f"backbone.{name}", parameter
        for name, parameter in self.head.named_parameters():
            yield f"head.{name}", parameter

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"backbone": the backbone module's state (ZeRO-3 partitions gathered), "head": this
        rank's shard}``, copies (a later step does not change them). For a checkpoint that resumes
        training (optimizer states, step counters, the selection) use :meth:`save_checkpoint`."""
        module = self.backbone.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()),
                                               enabled=self.backbone.zero_optimization_stage() == 3):
            backbone = {name: value.detach().clone() for name, value in module.state_dict().items()}
        head = {name: value.detach().clone() for name, value in self.head.state_dict().items()}
        return {"backbone": backbone, "head": head}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load what :meth:`state_dict` returned (on every rank, with the same world size)."""
        module = self.backbone.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0,
                                               enabled=self.backbone.zero_optimization_stage() == 3):
            module.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])

    def close(self) -> None:
        """End the run: background rebuilds stop (what they were computing is dropped). A script
        may also end without it; its exit stays clean."""
        self.head.close()

    def _read_head(self, tag_dir: str, module_only: bool) -> dict[str, Any]:
        """The head's part of a checkpoint; on another number of ranks only where DeepSpeed can
        follow (ZeRO-0 keeps the optimizer state whole; ZeRO 1–3 partition it by rank)."""
        saved, stage = saved_world_size(tag_dir), self.backbone.zero_optimization_stage()
        if saved != self.head.world_size and stage > 0 and not module_only:
            raise CheckpointError(f"hybridfc: checkpoint {tag_dir} was saved on {saved} ranks, this run has "
                                  f"{self.head.world_size}: the head can be resharded, but DeepSpeed's ZeRO-{stage} "
                                  f"optimizer state is partitioned by rank; convert it with DeepSpeed's universal "
                                  f"checkpoint (deepspeed.checkpoint.ds_to_universal), or load the weights only "
                                  f"(load_module_only=True)")
        return read_head(self.head, tag_dir)

    def _batch_factor(self, schedule: ScheduleConfig) -> float:
        """``schedule.batch_scaling``'s lr multiplier for DeepSpeed's global batch, put on the
        backbone's optimizer now (1 without it)."""
        if schedule.batch_scaling is None:
            return 1.0
        global_batch = self.backbone.train_batch_size()
        factor = schedule.batch_scaling.factor(global_batch)
        self._adapter.scale_lr(factor)
        log_dist(f"lr of backbone and head x {factor:g} for the global batch of {global_batch} "
                 f"({schedule.batch_scaling.rule} scaling from {schedule.batch_scaling.reference_batch})")
        return factor

    @property
    def lr_scale(self) -> float:
        """The multiplier hybridfc puts on the lr of backbone and head, on top of DeepSpeed's
        scheduler: ``schedule.batch_scaling``'s times ``schedule.plateau``'s (1 without them)."""
        return self.batch_factor * (1.0 if self.plateau is None else self.plateau.scale)

    def _observe_plateau(self) -> None:
        """Feed the held-out metric (the first of ``evaluation.top_k``) to the plateau rule, once
        per optimizer step; on a drop, scale the backbone's lr too."""
        metric = self.last_evaluation.get(self.evaluation.top_k[0])
        step = self.backbone.global_steps
        if self.plateau is None or metric is None or step == self._plateau_step:
            return
        self._plateau_step = step
        if self.plateau.step(metric):
            self._adapter.scale_lr(self.lr_scale)
            log_dist(f"step {self.backbone.global_steps}: held-out metric at a plateau (best {self.plateau.best:.4f}): "
                     f"lr multiplier now {self.plateau.scale:g}")

    def _lr_factor(self) -> float:
        if not self._backbone_base_lr:
            return 1.0
        return self.backbone.get_lr()[0] / self._backbone_base_lr

    def communication_stats(self) -> CommunicationStats:
        """What hybridfc sent to other ranks since the previous call: calls, bytes and exposed
        seconds per collective kind (:mod:`hybridfc.parallel.accounting`). DeepSpeed's own
        reduction of the backbone's gradients is not in it; with ``grad_topk`` hybridfc's is
        (``sparse_all_reduce``, or ``all_reduce`` where it sends dense)."""
        return self._communication.take()

    def _log_communication(self) -> None:
        """One line every ``steps_per_print`` optimizer steps."""
        step, interval = self.backbone.global_steps, self.backbone.steps_per_print()
        if not interval or step % interval:
            return
        stats = self._communication_logged.take()
        log_dist(f"step {step}: hybridfc communication over {step - self._logged_step} steps: {stats.summary()}")
        self._logged_step = step

    def evaluation_due(self) -> bool:
        """True once per ``evaluation.interval`` optimizer steps (call it after ``step()``)."""
        step = self.backbone.global_steps
        interval = self.evaluation.interval
        return interval > 0 and step > 0 and step % interval == 0 and step != self.last_evaluated_step

    @torch.no_grad()
    def evaluate(self, loader: Iterable, ks: Optional[Sequence[int]] = None) -> dict[int, float]:
        """Top-k accuracy ``{k: fraction}`` over a held-out loader, every rank its own part.

        ``ks`` defaults to the config's ``evaluation.top_k``. Scores are those of the head
        without margin, merged over the shards by :func:`hybridfc.eval.topk_correct`.
        """
        ks = list(ks or self.evaluation.top_k)
        was_training = self.backbone.training
        self.eval()
        counts = torch.zeros(1 + len(ks), dtype=torch.float64, device=self.head.weight.device)
        for inputs, labels in loader:
            counts += topk_correct(self.head, self.embed(inputs), labels, ks)
        self.train(was_training)
        self.last_evaluation = accuracies(counts, ks)
        self.last_evaluated_step = self.backbone.global_steps
        summary = ", ".join(f"top-{k} {acc:.4f}" for k, acc in self.last_evaluation.items())
        log_dist(f"step {self.backbone.global_steps}: held-out {summary} on {int(counts[0])} samples")
        self._observe_plateau()
        return self.last_evaluation

    def train(self, mode: bool = True) -> "HybridEngine":
        self.backbone.train(mode)
        self.head.train(mode)
        return self

    def eval(self) -> "HybridEngine":
        return self.train(False)

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, **kwargs: Any) -> bool:
        """Save the backbone (DeepSpeed) and the head's shards as ``save_dir/tag``, complete or not
        at all: written under ``<tag>.partial``, renamed when every rank is done, ``latest`` moved
        last (:func:`hybridfc.checkpoint.publish`)."""
        tag = str(tag) if tag is not None else f"global_step{self.backbone.global_steps}"
        staging = os.path.join(save_dir, staging_tag(tag))
        first = self.backbone.global_rank == 0
        run_on_every_rank(lambda: shutil.rmtree(staging, ignore_errors=True) if first else None,
                          "clearing an interrupted save")
        run_state = self._run_state()
        run_on_every_rank(lambda: save_head(self.head, self.head_optimizer, staging, run_state), "saving the head",
                          self.head.group)
        reached("head_written")
        saved = self.backbone.save_checkpoint(save_dir, tag=staging_tag(tag), client_state=client_state or {},
                                              save_latest=False, **kwargs)
        barrier()
        reached("backbone_written")
        run_on_every_rank(lambda: publish(save_dir, tag, save_latest) if first else None, "publishing the checkpoint")
        return saved

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **kwargs: Any):
        """Load the backbone (DeepSpeed) and the head's shards; DeepSpeed's return value.

        ``(None, None)`` when ``load_dir`` holds no checkpoint (as DeepSpeed does).
        """
        tag = tag if tag is not None else _latest_tag(load_dir)
        if tag is None:
            return self.backbone.load_checkpoint(load_dir, tag=None, **kwargs)
        tag_dir = os.path.join(load_dir, str(tag))
        state = run_on_every_rank(lambda: self._read_head(tag_dir, kwargs.get("load_module_only", False)),
                                  "reading the head's shard", self.head.group)
        load_path, client_state = self.backbone.load_checkpoint(load_dir, tag=tag, **kwargs)
        restore_optimizer = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        run_state = run_on_every_rank(
            lambda: apply_head(self.head, self.head_optimizer if restore_optimizer else None, state),
            "restoring the head", self.head.group)
        self._logged_step = self.backbone.global_steps
        grown_from = state.get("grown_from")
        self._imprint_pending = range(grown_from, self.head.num_classes) if grown_from and self._imprints else None
        if grown_from:
            log_dist(f"head grown from {grown_from} to {self.head.num_classes} classes: the saved rows keep their "
                     f"values and optimizer state; the new rows start fresh"
                     f"{', imprinted at the first step' if self._imprints else ''}")
        self._restore_run_state(run_state or {})
        self._data_at_step = None
        return load_path, client_state

    def _run_state(self) -> dict[str, Any]:
        """What this rank saves beside its head shard to resume exactly: its random generators and the
        loader's position as of the last :meth:`step`, the grad_topk residual and the plateau rule
        (None where absent)."""
        return {**(self._data_at_step or self._data_position()),
                "grad_topk": None if self.gradient_reducer is None else self.gradient_reducer.state_dict(),
                "plateau": None if self.plateau is None else self.plateau.state_dict()}

    def _restore_run_state(self, run_state: dict[str, Any]) -> None:
        """Put back what :meth:`_run_state` saved, each part this run has and the checkpoint holds."""
        if run_state.get("rng") is not None:
            set_rng_states(run_state["rng"])
        loader = run_state.get("loader")
        if self.loader is not None and loader is not None:
            if loader["num_samples"] == len(self.loader.dataset):
                self.loader.load_state_dict(loader)
            else:   # the data grew with the head: its next epoch starts afresh
                self.loader.set_epoch(loader["epoch"] + 1)
                log_dist(f"the training data has {len(self.loader.dataset)} samples, the checkpoint's loader had "
                         f"{loader['num_samples']}: training goes on from epoch {loader['epoch'] + 1}'s start")
        if self.gradient_reducer is not None and run_state.get("grad_topk") is not None:
            self.gradient_reducer.load_state_dict(run_state["grad_topk"])
        if self.plateau is not None and run_state.get("plateau") is not None:
            self.plateau.load_state_dict(run_state["plateau"])
            self._adapter.scale_lr(self.lr_scale)


def _of_classes(batches: Iterable, classes: Optional[range], device: torch.device) -> Iterator[tuple]:
    """``(x, y)`` of ``batches`` with ``y`` on ``device``, only the samples of ``classes`` (all
    when None); batches left empty are dropped."""
    for x, y in batches:
        y = y.to(device)
        if classes is not None:
            keep = (y >= classes.start) & (y < classes.stop)
            if not bool(keep.any()):
                continue
            x, y = x[keep.to(x.device)], y[keep]
        yield x, y


def _latest_tag(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _check_same_config(cfg: HybridFCConfig, group: ProcessGroup) -> None:
    """Raise :class:`ConfigError` on every rank unless every rank has the same section."""
    mine = torch.tensor([config_fingerprint(cfg), cfg.num_classes, cfg.embedding_size], device=collective_device(group))
    table = all_gather_vector(mine, group)
    if bool((table[:, 0] != table[0, 0]).any()):
        rows = "; ".join(f"rank {r}: num_classes={int(t[1])}, embedding_size={int(t[2])}, fingerprint={int(t[0]):x}"
                         for r, t in enumerate(table))
        raise ConfigError(f'the "hybridfc" config section differs across ranks ({rows})')


def _check_enough_classes(cfg: HybridFCConfig, mpu: Any) -> None:
    """Every rank of the head's group needs a class (checked before DeepSpeed builds anything)."""
    ranks = mpu.get_data_parallel_world_size() if mpu is not None else group_size(None)
    if cfg.num_classes < ranks:
        raise ConfigError(f"hybridfc.num_classes: must be at least the number of data-parallel ranks "
                          f"({ranks}) that shard it (got {cfg.num_classes})")


def _check_warm_start_has_data(warm_start: WarmStartConfig, training_data: Any) -> None:
    """Imprinting reads the training data: without it the run would fail at its first step (or at
    step ``refresh_interval``), so it fails here."""
    asked = [key for key, on in (("imprint", warm_start.imprint), ("refresh_interval", warm_start.refresh_interval))
             if on]
    if asked and training_data is None:
        raise ConfigError(f"hybridfc.warm_start.{asked[0]}: imprinting embeds the training data, and none was given; "
                          f"pass training_data= to hybridfc.initialize, or turn warm_start off")


def check_chunks(cfg: HybridFCConfig, micro_batch: int) -> None:
    """A micro-batch cannot be cut into more chunks than it has samples; chunks take whole tiles
    of rows, so a small micro-batch runs fewer chunks than asked (logged)."""
    chunks = cfg.communication.chunks
    if chunks > micro_batch:
        raise ConfigError(f"hybridfc.communication.chunks: {chunks} chunks is more than the "
                          f"{micro_batch} samples of a micro-batch (train_micro_batch_size_per_gpu); "
                          f"use at most {micro_batch}")
    runs = ChunkLayout.of([micro_batch], chunks).chunks
    if runs < chunks:
        log_dist(f"hybridfc.communication.chunks: a micro-batch of {micro_batch} rows is {runs} tiles of "
                 f"{TILE_ROWS}, so {runs} chunks run, not {chunks}", level=logging.WARNING)


def _read_ds_config(args: Optional[argparse.Namespace], config: Any, config_params: Any) -> dict:
    given = [c for c in (config, config_params, getattr(args, "deepspeed_config", None)) if c is not None]
    if not given:
        raise ConfigError("no DeepSpeed config: pass --deepspeed_config FILE, or config= to hybridfc.initialize")
    if len(given) > 1:
        raise ConfigError("a DeepSpeed config was given more than once (args.deepspeed_config, config, config_params): "
                          "give exactly one")
    return load_ds_config(given[0])


def _backbone_base_lr(ds_config: dict, optimizer: Any) -> Optional[float]:
    lr = ds_config.get("optimizer", {}).get("params", {}).get("lr")
    if lr is None and optimizer is not None and hasattr(optimizer, "param_groups"):
        lr = optimizer.param_groups[0]["lr"]
    if lr is None:
        log_dist("the backbone's configured lr is unknown (no optimizer.params.lr in the ds_config): "
                 "the head keeps its own lr and does not follow the backbone's schedule", level=logging.WARNING)
    return lr


def initialize(args: Optional[argparse.Namespace] = None, model: Optional[torch.nn.Module] = None,
               optimizer: Any = None, model_parameters: Any = None, training_data: Any = None,
               lr_scheduler: Any = None, mpu: Any = None, dist_init_required: Optional[bool] = None,
               collate_fn: Any = None, config: Any = None, config_params: Any = None, **kwargs: Any):
    """Drop-in ``deepspeed.initialize``: same arguments, same 4-tuple.

    Returns ``(engine, optimizer, loader, lr_scheduler)``: a :class:`HybridEngine`, the
    backbone's DeepSpeed optimizer, hybridfc's :class:`DistributedLoader` over
    ``training_data`` (None without it), and DeepSpeed's scheduler. The ds_config needs a
    ``"hybridfc"`` section (see :mod:`hybridfc.config`); the head is sharded over DeepSpeed's
    data-parallel group.
    """
    ds_config, cfg = split_ds_config(_read_ds_config(args, config, config_params))
    _check_warm_start_has_data(cfg.warm_start, training_data)
    if dist_init_required is not False:
        deepspeed.init_distributed(dist_backend=getattr(args, "dist_backend", None))
    barrier()                                   # every rank is past init_distributed: see release_shared_memory
    release_shared_memory(group_rank(None))
    _check_same_config(cfg, None)
    _check_enough_classes(cfg, mpu)
    ds_args = copy.copy(args)
    if ds_args is not None and hasattr(ds_args, "deepspeed_config"):
        ds_args.deepspeed_config = None
    backbone, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        args=ds_args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=ds_config, **kwargs)
    barrier()                                   # DeepSpeed may have made the buffer only now
    release_shared_memory(group_rank(None))
    check_chunks(cfg, backbone.train_micro_batch_size_per_gpu())
    group = groups._get_data_parallel_group()
    head = ClassParallelFC(cfg.num_classes, cfg.embedding_size, margin=cfg.margin, group=group, seed=cfg.seed,
                           device=backbone.device, selection=cfg.selection, storage_dtype=cfg.storage_dtype,
                           communication={"chunks": cfg.communication.chunks})
    head_optimizer = build_head_optimizer(head, cfg.optimizer, cfg.gradient_clipping)
    loader = None
    if training_data is not None:
        loader = DistributedLoader(training_data, backbone.train_micro_batch_size_per_gpu(), rank=group_rank(group),
                                   world_size=group_size(group), collate_fn=collate_fn, seed=cfg.seed)
    engine = HybridEngine(backbone, head, head_optimizer, _backbone_base_lr(ds_config, optimizer), cfg.evaluation,
                          cfg.max_consecutive_skips, loader, cfg.communication, cfg.warm_start, cfg.schedule)
    ranks = group_size(group)
    log_dist(f"hybridfc head: {cfg.num_classes} classes x {cfg.embedding_size} over {ranks} rank{'s' * (ranks > 1)} "
             f"({head.num_local} rows on rank 0), margin {cfg.margin.model_dump()}, "
             f"selection {cfg.selection.model_dump()}, {head.selection.budget} active rows per step")
    return engine, ds_optimizer, loader, ds_scheduler
