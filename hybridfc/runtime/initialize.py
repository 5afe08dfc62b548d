"""``hybridfc.initialize``: ``deepspeed.initialize`` for a backbone plus a class-parallel head, and
every check that needs the launched job: the same ``"hybridfc"`` section on every rank, a class
for every rank, chunks against the micro-batch, ``grad_topk`` against the ZeRO stage and the
backbone's optimizer. Each raises :class:`~hybridfc.config.ConfigError` on every rank."""

from __future__ import annotations

import argparse
import copy
import logging
from typing import Any, Optional

import deepspeed
import torch
from deepspeed.utils import groups

from hybridfc.compression.error_feedback import TopKGradientReducer
from hybridfc.config import (DTYPES, CommunicationConfig, ConfigError, HybridFCConfig, WarmStartConfig,
                             config_fingerprint, load_ds_config, split_ds_config)
from hybridfc.data.loader import DistributedLoader
from hybridfc.deepspeed_adapter import DeepSpeedAdapter, release_shared_memory
from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.optimizer import build_head_optimizer
from hybridfc.log import log_dist
from hybridfc.parallel.chunks import ChunkLayout
from hybridfc.parallel.collectives import all_gather_vector, barrier, run_on_every_rank
from hybridfc.parallel.groups import ProcessGroup, collective_device, group_rank, group_size
from hybridfc.runtime.engine import HybridEngine
from hybridfc.runtime.lr import backbone_base_lr

WORLD: ProcessGroup = None
"""The checks before DeepSpeed has built its groups run over every rank."""


def check_same_config(cfg: HybridFCConfig, group: ProcessGroup) -> None:
    """Raise :class:`ConfigError` on every rank unless every rank has the same section."""
    mine = torch.tensor([config_fingerprint(cfg), cfg.num_classes, cfg.embedding_size], device=collective_device(group))
    table = all_gather_vector(mine, group)
    if bool((table[:, 0] != table[0, 0]).any()):
        rows = "; ".join(f"rank {r}: num_classes={int(t[1])}, embedding_size={int(t[2])}, fingerprint={int(t[0]):x}"
                         for r, t in enumerate(table))
        raise ConfigError(f'the "hybridfc" config section differs across ranks ({rows})')


def check_enough_classes(cfg: HybridFCConfig, mpu: Any) -> None:
    """Every rank of the head's group needs a class (checked before DeepSpeed builds anything)."""
    ranks = mpu.get_data_parallel_world_size() if mpu is not None else group_size(WORLD)
    if cfg.num_classes < ranks:
        raise ConfigError(f"hybridfc.num_classes: must be at least the number of data-parallel ranks "
                          f"({ranks}) that shard it (got {cfg.num_classes})")


def check_warm_start_has_data(warm_start: WarmStartConfig, training_data: Any) -> None:
    """Imprinting reads the training data: without it the run would fail at its first step (or at
    step ``refresh_interval``), so it fails here."""
    asked = [key for key, on in (("imprint", warm_start.imprint), ("refresh_interval", warm_start.refresh_interval))
             if on]
    if asked and training_data is None:
        raise ConfigError(f"hybridfc.warm_start.{asked[0]}: imprinting embeds the training data, and none was given; "
                          f"pass training_data= to hybridfc.initialize, or turn warm_start off")


def check_chunks(chunks: int, micro_batch: int) -> None:
    """A micro-batch cannot be cut into more chunks than it has samples; chunks take whole tiles
    of rows, so a small micro-batch runs fewer chunks than asked (logged)."""
    if chunks > micro_batch:
        raise ConfigError(f"hybridfc.communication.chunks: {chunks} chunks is more than the "
                          f"{micro_batch} samples of a micro-batch (train_micro_batch_size_per_gpu); "
                          f"use at most {micro_batch}")
    layout = ChunkLayout.of([micro_batch], chunks)
    if layout.chunks < chunks:
        log_dist(f"hybridfc.communication.chunks: a micro-batch of {micro_batch} rows is {layout.chunks} tiles of "
                 f"{layout.tile_rows}, so {layout.chunks} chunks run, not {chunks}", level=logging.WARNING)


def check_grad_topk(backbone: deepspeed.DeepSpeedEngine, communication: CommunicationConfig) -> None:
    """``grad_topk`` takes over the reduction only where the optimizer reads the gradients hybridfc
    reduces: ZeRO-0 with ``param.grad``, ZeRO-1 without offload, overlap or a separate accumulation
    dtype; momentum correction needs a momentum-SGD optimizer with nothing acting outside it."""
    if communication.grad_topk is None:
        return
    stage, optimizer = backbone.zero_optimization_stage(), backbone.optimizer
    problem = None
    if stage > 1:
        problem = (f"ZeRO stage {stage} reduces gradients inside backward and keeps only a partition of them; "
                   f"grad_topk takes ZeRO stages 0 and 1")
    elif backbone.fp16_enabled():
        problem = "fp16 with loss scaling is not supported; use bf16 or fp32"
    elif type(optimizer).__name__ == "BF16_Optimizer" or getattr(optimizer, "use_grad_accum_attribute", False):
        problem = ("a separate gradient accumulation dtype (data_types.grad_accum_dtype) is not supported; leave "
                   "grad_accum_dtype unset")
    elif getattr(optimizer, "cpu_offload", False):
        problem = "ZeRO-1 with optimizer offload (offload_optimizer) is not supported"
    elif getattr(optimizer, "overlap_comm", False):
        problem = "ZeRO-1 with overlap_comm reduces inside backward; set zero_optimization.overlap_comm false"
    if problem is not None:
        raise ConfigError(f"hybridfc.communication.grad_topk: {problem}")
    if communication.grad_topk_momentum_correction:
        _check_momentum_correction(optimizer.param_groups)


def _check_momentum_correction(param_groups: list[dict]) -> None:
    momenta = {group.get("momentum", 0.0) for group in param_groups}
    if len(momenta) != 1 or not next(iter(momenta)):
        raise ConfigError(f"hybridfc.communication.grad_topk_momentum_correction: needs a momentum-SGD backbone "
                          f"optimizer with one momentum > 0 (its param groups have momentum {sorted(momenta)})")
    outside = sorted({key for group in param_groups for key in ("weight_decay", "dampening", "nesterov")
                      if group.get(key)})
    if outside:
        raise ConfigError(f"hybridfc.communication.grad_topk_momentum_correction: the backbone optimizer's "
                          f"{', '.join(outside)} would act outside the momentum hybridfc applies before "
                          f"compression; set them to 0 / false, or turn momentum correction off")


def gradient_reducer(adapter: DeepSpeedAdapter, communication: CommunicationConfig,
                     group: ProcessGroup) -> Optional[TopKGradientReducer]:
    """The top-k reduction of the backbone's gradients, where ``grad_topk`` asks for it (DeepSpeed's
    own reduction is then switched off)."""
    if communication.grad_topk is None:
        return None
    momentum = adapter.take_over_reduction(communication.grad_topk_momentum_correction)
    numel = adapter.gradient_numel()
    reducer = TopKGradientReducer(numel, communication.grad_topk, communication.grad_topk_warmup_steps,
                                  DTYPES[communication.grad_topk_value_dtype], momentum, group, adapter.engine.device)
    log_dist(f"backbone gradients: top {communication.grad_topk:g} of {numel} entries per rank and step "
             f"({reducer.pairs()} pairs now, {communication.grad_topk_value_dtype} values, warm-up "
             f"{communication.grad_topk_warmup_steps} steps), error feedback; DeepSpeed's reduction is off")
    return reducer


def read_ds_config(args: Optional[argparse.Namespace], config: Any, config_params: Any) -> dict:
    """The one ds_config given (``--deepspeed_config``, ``config`` or ``config_params``), read."""
    given = [c for c in (config, config_params, getattr(args, "deepspeed_config", None)) if c is not None]
    if not given:
        raise ConfigError("no DeepSpeed config: pass --deepspeed_config FILE, or config= to hybridfc.initialize")
    if len(given) > 1:
        raise ConfigError("a DeepSpeed config was given more than once (args.deepspeed_config, config, config_params): "
                          "give exactly one")
    return load_ds_config(given[0])


def _start_deepspeed(args: Optional[argparse.Namespace], ds_config: dict, dist_init_required: Optional[bool],
                     **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` (the ds_config without the ``"hybridfc"`` section); DeepSpeed's
    ``/dev/shm`` buffer unlinked once every rank has mapped it (:func:`release_shared_memory`)."""
    ds_args = copy.copy(args)
    if ds_args is not None and hasattr(ds_args, "deepspeed_config"):
        ds_args.deepspeed_config = None
    started = deepspeed.initialize(args=ds_args, dist_init_required=dist_init_required, config=ds_config, **kwargs)
    barrier(WORLD)                              # DeepSpeed may have made the buffer only now
    release_shared_memory(group_rank(WORLD))
    return started


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
    ds_config, cfg = split_ds_config(read_ds_config(args, config, config_params))
    check_warm_start_has_data(cfg.warm_start, training_data)
    if dist_init_required is not False:
        deepspeed.init_distributed(dist_backend=getattr(args, "dist_backend", None))
    barrier(WORLD)                              # every rank is past init_distributed: see release_shared_memory
    release_shared_memory(group_rank(WORLD))
    check_same_config(cfg, WORLD)
    check_enough_classes(cfg, mpu)
    backbone, ds_optimizer, _, ds_scheduler = _start_deepspeed(
        args, ds_config, dist_init_required, model=model, optimizer=optimizer, model_parameters=model_parameters,
        lr_scheduler=lr_scheduler, mpu=mpu, collate_fn=collate_fn, **kwargs)
    check_chunks(cfg.communication.chunks, backbone.train_micro_batch_size_per_gpu())
    group = groups._get_data_parallel_group()
    run_on_every_rank(lambda: check_grad_topk(backbone, cfg.communication), "checking grad_topk", group)
    head = ClassParallelFC(cfg.num_classes, cfg.embedding_size, margin=cfg.margin, group=group, seed=cfg.seed,
                           device=backbone.device, selection=cfg.selection, storage_dtype=cfg.storage_dtype,
                           communication={"chunks": cfg.communication.chunks}, logits=cfg.logits,
                           logits_budget_mb=cfg.logits_budget_mb)
    loader = None
    if training_data is not None:
        loader = DistributedLoader(training_data, backbone.train_micro_batch_size_per_gpu(), rank=group_rank(group),
                                   world_size=group_size(group), collate_fn=collate_fn, seed=cfg.seed)
    adapter = DeepSpeedAdapter(backbone)
    engine = HybridEngine(backbone, head, build_head_optimizer(head, cfg.optimizer, cfg.gradient_clipping),
                          backbone_base_lr(ds_config, optimizer), cfg.evaluation, cfg.max_consecutive_skips, loader,
                          gradient_reducer(adapter, cfg.communication, group), cfg.warm_start, cfg.schedule, adapter)
    ranks = group_size(group)
    log_dist(f"hybridfc head: {cfg.num_classes} classes x {cfg.embedding_size} over {ranks} rank{'s' * (ranks > 1)} "
             f"({head.num_local} rows on rank 0), margin {cfg.margin.model_dump()}, "
             f"selection {cfg.selection.model_dump()}, {head.selection.budget} active rows per step")
    return engine, ds_optimizer, loader, ds_scheduler
