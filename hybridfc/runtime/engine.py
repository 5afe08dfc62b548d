"""``HybridEngine``: the facade over the DeepSpeed engine of the backbone and the class-parallel
head (the order of a step and of a save: :mod:`hybridfc.runtime`)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

import deepspeed
import torch
from torch import nn

from hybridfc.compression.error_feedback import TopKGradientReducer
from hybridfc.config import EvaluationConfig, ScheduleConfig, WarmStartConfig
from hybridfc.deepspeed_adapter import DeepSpeedAdapter
from hybridfc.eval.topk import held_out_accuracy
from hybridfc.head.class_parallel_fc import ClassParallelFC
from hybridfc.head.imprint import imprint
from hybridfc.head.optimizer import HeadOptimizer
from hybridfc.log import log_dist
from hybridfc.parallel.accounting import CommunicationStats, StatsCursor
from hybridfc.runtime import checkpoints
from hybridfc.runtime.checkpoints import EngineState, StatePart
from hybridfc.runtime.data import DataPosition, DistributedLoader
from hybridfc.runtime.lr import LrMultiplier
from hybridfc.runtime.warm_start import ImprintSchedule, in_order, of_classes
from hybridfc.step import TrainingStep

FORWARDED = frozenset({
    "device", "local_rank", "global_rank", "world_size", "module", "optimizer", "lr_scheduler", "get_lr",
    "global_steps", "global_samples", "skipped_steps", "was_step_applied", "is_gradient_accumulation_boundary",
    "gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "train_batch_size", "steps_per_print",
    "zero_optimization_stage", "fp16_enabled", "bfloat16_enabled", "gradient_clipping", "get_global_grad_norm",
    "monitor", "training_dataloader", "config",
})
"""DeepSpeed engine attributes that ``HybridEngine`` passes through: they describe the run as a whole;
what holds or changes state is the facade's own, for backbone and head together."""


class HybridEngine:
    """A DeepSpeed engine for the backbone and a :class:`ClassParallelFC` head, driven as one.

    Attributes:
        backbone: the ``deepspeed.DeepSpeedEngine`` wrapping the backbone.
        head, head_optimizer: the class-parallel head (this rank's shard) and its optimizer.
        loader: the training loader :func:`hybridfc.initialize` made (None without ``training_data``).
        gradient_reducer: ``grad_topk``'s reduction of the backbone's gradients, or None.
        last_evaluation, last_evaluated_step: the latest :meth:`evaluate` result and its step.

    The DeepSpeed attributes in :data:`FORWARDED` are reached through the facade
    (``engine.global_steps``); any other is an ``AttributeError`` that points to ``engine.backbone``.
    """

    def __init__(self, backbone: deepspeed.DeepSpeedEngine, head: ClassParallelFC, head_optimizer: HeadOptimizer,
                 backbone_base_lr: Optional[float], evaluation: Optional[EvaluationConfig] = None,
                 max_consecutive_skips: int = 10, loader: Optional[DistributedLoader] = None,
                 gradient_reducer: Optional[TopKGradientReducer] = None, warm_start: Optional[WarmStartConfig] = None,
                 schedule: Optional[ScheduleConfig] = None, adapter: Optional[DeepSpeedAdapter] = None) -> None:
        self.backbone, self.head, self.head_optimizer, self.loader = backbone, head, head_optimizer, loader
        self.gradient_reducer = gradient_reducer
        self.evaluation = evaluation or EvaluationConfig()
        self.last_evaluation: dict[int, float] = {}
        self.last_evaluated_step = -1
        self._adapter = adapter or DeepSpeedAdapter(backbone)   # one per engine: it wraps the optimizer's step
        self._step = TrainingStep(self._adapter, head, head_optimizer, max_consecutive_skips, gradient_reducer)
        self._lr = LrMultiplier(self._adapter, schedule or ScheduleConfig(), backbone_base_lr)
        self._imprints = ImprintSchedule(warm_start, head.num_classes, fresh=backbone.global_steps == 0)
        self._data = DataPosition(loader)
        self._loss_scale = 1.0
        self._communication, self._communication_logged = StatsCursor(), StatsCursor()
        self._logged_step = backbone.global_steps
        self._state = EngineState(head, head_optimizer)
        for part in [gradient_reducer, self._lr if self._lr.plateau else None, *self._data.parts()]:
            if part is not None:
                self.register_state(part)
        head_optimizer.check_peak_lr(head_optimizer.param_groups[0]["lr"] * self._lr.batch_factor)

    @property
    def state_parts(self) -> list[StatePart]:
        """What a checkpoint holds (:mod:`hybridfc.state`), in order."""
        return list(self._state.parts)

    def register_state(self, part: StatePart) -> None:
        """Have checkpoints save, reshard and load ``part`` too (:class:`hybridfc.state.StatePart`)."""
        self._state.register(part)

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
        if self._imprints.pending is not None:
            self.imprint(classes=self._imprints.pending)
        return self.head(self.embed(inputs), labels.to(self.head.weight.device))

    def imprint(self, batches: Optional[Iterable] = None, classes: Optional[range] = None) -> int:
        """Warm start: every class row with samples in ``batches`` (this rank's ``(x, y)``; default:
        one pass over the training data given to :func:`hybridfc.initialize`, in order) becomes the
        mean L2-normalised embedding of them under the current backbone, in eval mode
        (:func:`hybridfc.head.imprint.imprint`); on every rank. ``classes``: only the samples, and
        rows, of these classes (default: all). Returns the rows imprinted."""
        self._imprints.pending = None
        batches = in_order(self.loader) if batches is None else batches
        was_training = self.backbone.training
        self.eval()
        try:
            count = imprint(self.head, self.embed, of_classes(batches, classes, self.head.weight.device))
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
            self._step.finish(self._loss_scale, self._lr.head_factor())
            if self._imprints.refresh_due(self.backbone.global_steps):
                self.imprint()
                self.head_optimizer.forget_momentum()
            self._log_communication()
        self._data.mark()

    @property
    def lr_scale(self) -> float:
        """The multiplier hybridfc puts on the lr of backbone and head, on top of DeepSpeed's
        scheduler: ``schedule.batch_scaling``'s times ``schedule.plateau``'s (1 without them)."""
        return self._lr.scale

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
        for prefix, module in (("backbone", self.backbone.module), ("head", self.head)):
            for name, parameter in module.named_parameters():
                yield f"{prefix}.{name}", parameter

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"backbone": the backbone module's state (ZeRO-3 partitions gathered), "head": this
        rank's shard}``, copies (a later step does not change them). For a checkpoint that resumes
        training (optimizer states, step counters, the selection) use :meth:`save_checkpoint`."""
        head = {name: value.detach().clone() for name, value in self.head.state_dict().items()}
        return {"backbone": self._adapter.module_state_dict(), "head": head}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load what :meth:`state_dict` returned (on every rank, with the same world size)."""
        self._adapter.load_module_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])

    def close(self) -> None:
        """End the run: background rebuilds stop (what they were computing is dropped). A script
        may also end without it; its exit stays clean."""
        self.head.close()

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
        step, interval = self.backbone.global_steps, self.evaluation.interval
        return interval > 0 and step > 0 and step % interval == 0 and step != self.last_evaluated_step

    @torch.no_grad()
    def evaluate(self, loader: Iterable, ks: Optional[Sequence[int]] = None) -> dict[int, float]:
        """Top-k accuracy ``{k: fraction}`` over a held-out loader, every rank its own part (``ks``:
        default ``evaluation.top_k``), of the head without margin over the shards; logged, and fed
        to the plateau rule."""
        was_training = self.backbone.training
        self.eval()
        self.last_evaluation = held_out_accuracy(self.head, self.embed, loader, list(ks or self.evaluation.top_k),
                                                 f"step {self.backbone.global_steps}")
        self.train(was_training)
        self.last_evaluated_step = self.backbone.global_steps
        self._lr.observe(self.last_evaluation.get(self.evaluation.top_k[0]), self.backbone.global_steps)
        return self.last_evaluation

    def train(self, mode: bool = True) -> "HybridEngine":
        self.backbone.train(mode)
        self.head.train(mode)
        return self

    def eval(self) -> "HybridEngine":
        return self.train(False)

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, **kwargs: Any) -> bool:
        """Save the backbone (DeepSpeed) and every state part as ``save_dir/tag``, complete or not at
        all (:mod:`hybridfc.checkpoint.publish`)."""
        return checkpoints.save(self.backbone, self._state.parts, self.head.group, save_dir, tag, client_state,
                                save_latest, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **kwargs: Any):
        """Load the backbone (DeepSpeed) and every state part; DeepSpeed's return value, ``(None,
        None)`` when ``load_dir`` holds no checkpoint. ``load_optimizer_states=False`` or
        ``load_module_only=True`` leave the head's optimizer as it is."""
        restore_optimizer = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        parts = self._state.loaded(restore_optimizer)
        loaded = checkpoints.load(self.backbone, parts, self.head.group, load_dir, tag, **kwargs)
        if loaded[0] is not None:
            self._logged_step = self.backbone.global_steps
            self._imprints.after_load(self._state.head.grown_from, self.head.num_classes)
            self._data.forget()
        return loaded
