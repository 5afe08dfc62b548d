"""The ``"hybridfc"`` section of a DeepSpeed config: schema, loading and error messages.

hybridfc is tuned in a top-level ``"hybridfc"`` section of the DeepSpeed ds_config JSON.
DeepSpeed keeps unknown top-level keys, so the section sits beside DeepSpeed's own ones.
Every key, with its default where it has one (``num_classes`` and ``embedding_size`` are
required)::

    "hybridfc": {
      "num_classes": 1000000,
      "embedding_size": 512,
      "seed": 0,
      "margin": {"type": "arcface", "scale": 64.0, "margin": 0.5},
      "selection": {"type": "full"},
      "storage_dtype": "fp32",
      "logits": "auto",
      "logits_budget_mb": 1024,
      "optimizer": {"type": "sgd",
                    "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "lars_coefficient": 0.0}},
      "gradient_clipping": 0.0,
      "evaluation": {"interval": 0, "top_k": [1]},
      "warm_start": {"imprint": false, "refresh_interval": 0},
      "schedule": {"plateau": null, "batch_scaling": null},
      "communication": {"chunks": 1, "grad_topk": null, "grad_topk_warmup_steps": 250,
                        "grad_topk_value_dtype": "bf16", "grad_topk_momentum_correction": false},
      "max_consecutive_skips": 10
    }

``margin`` is one of::

    {"type": "softmax"}
    {"type": "cosface",  "scale": 64.0, "margin": 0.35}
    {"type": "arcface",  "scale": 64.0, "margin": 0.5}
    {"type": "combined", "scale": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}

``selection`` (which rows of each shard enter a step's softmax) is one of::

    {"type": "full"}
    {"type": "partial", "budget": 0.1, "sampling_correction": true}
    {"type": "knn", "budget": 0.1, "k": 32, "rebuild_interval": 1000, "rebuild_delay": null,
     "late_rebuild": "postpone", "index": "auto", "hard_fraction": 0.5, "min_recall": null,
     "sampling_correction": true}
    {"type": "hf",  "budget": 0.1, "k": 32, "rebuild_interval": 1000, "rebuild_delay": null,
     "late_rebuild": "postpone", "index": "auto", "hard_fraction": 0.5, "min_recall": null,
     "sampling_correction": true}

``budget`` is the active rows per rank and step, positives included: an integer is a row
count (at most the largest shard), a float in (0, 1] a rate of the shard. ``k`` is the
neighbours per class (``knn``) or per sample (``hf``). The graph or index is rebuilt from the
rows every ``rebuild_interval`` steps (0: built once) in the background and swapped in
``rebuild_delay`` steps later (default: a tenth of the interval); a build not done by then
is swapped in at the first step it is done on every rank (``late_rebuild``: ``postpone``, no
step waits) or waited for (``wait``, the run stays reproducible). ``index``: ``exact``, ``ivf``,
``hnsw`` (faiss) or ``auto`` (exact for small shards, IVF for large ones). An approximate
index measures its recall@k against an exhaustive search on sampled classes at each build and
logs it; ``min_recall`` (default null: the index's own breadth) widens its search until that
recall reaches the given value, an exhaustive scan at most.
``hard_fraction`` (default 0.5): the share of the rows left after the positives that the hard
negatives may take, nearest first; uniform random rows fill the rest (1: hard negatives fill
the budget when there are enough of them). ``sampling_correction`` (default true): the logits
of the uniformly drawn negatives get ``log(rows they were drawn from / rows drawn)``, so that
they stand for all the rows they were drawn from; false gives PartialFC's loss.

``optimizer`` is ``sgd`` (params lr, momentum, weight_decay, lars_coefficient: LARS's trust
coefficient over the whole sharded head, 0 = off), ``adam`` or ``adamw`` (params lr,
betas, eps, weight_decay); with a selection other than ``full`` it updates the touched rows
only. ``storage_dtype`` (``fp32``, ``bf16``, ``fp16``) is the dtype of the shard and of its
optimizer state; logits and softmax stay fp32.
``logits`` is what the head keeps of a step's ``(B, C_r)`` logits between forward and backward
(:mod:`hybridfc.head.cross_entropy`): ``store`` keeps them in one fp32 buffer (three GEMMs);
``recompute`` keeps a tile and computes them again in the backward pass (a fourth GEMM);
``auto`` (default) stores them while the buffer is at most ``logits_budget_mb`` MiB.

``softmax`` is a plain softmax over ``x·Wᵀ`` without normalisation; the others normalise
``x`` and ``W`` and apply their margin to the target logit. ``seed`` seeds the head's
weight initialisation. ``gradient_clipping`` is the largest global L2 norm of the head's
gradient over all shards (0 turns clipping off). ``evaluation`` asks for the held-out top-k
accuracy every ``interval`` optimizer steps (0: never), computed by
:meth:`hybridfc.HybridEngine.evaluate` over the shards. ``communication.chunks`` (default 1)
splits each rank's micro-batch into that many chunks, whose feature exchange overlaps the
head's compute (:mod:`hybridfc.head.cross_entropy`); at most ``train_micro_batch_size_per_gpu``.
``warm_start.imprint`` (default false) sets every class row, before the first optimizer step of a
run that did not load a checkpoint, to the mean L2-normalised embedding of its training samples
under the initial backbone (one distributed pass over the training data given to
``hybridfc.initialize``; :func:`hybridfc.head.imprint.imprint`), and after loading a checkpoint
of fewer classes (the head grows) the new rows only; ``warm_start.refresh_interval``
(default 0: never) does it again, with the current backbone, after every that many optimizer steps
(the rows' momentum is forgotten).
``schedule.batch_scaling`` (default null: the ds_config's lr is the lr) multiplies the lr of
backbone and head by ``global batch / reference_batch`` (``rule: "linear"``, Goyal et al.) or its
square root (``"sqrt"``), the global batch being DeepSpeed's ``train_batch_size``; DeepSpeed's
warm-up and decay still shape it, and the head follows the backbone's schedule.
``schedule.plateau`` (default null) lowers the learning rate of backbone and head together on a
plateau of the held-out metric (the first of ``evaluation.top_k``, measured every
``evaluation.interval`` steps by ``engine.evaluate``): after ``patience`` (2) evaluations in a row
that do not beat the best by more than ``threshold`` (1e-3, absolute) a multiplier is multiplied by
``factor`` (0.1), never below ``min_factor`` (1e-3); it multiplies whatever DeepSpeed's scheduler
sets, and is saved in checkpoints.
``communication.grad_topk`` (default null: DeepSpeed's dense reduction) in (0, 1] replaces the
reduction of the backbone's gradient by an all-gather of each rank's top ``grad_topk`` share of
entries as (index, value) pairs, what is not sent kept for the next step (error feedback;
ZeRO 0 and 1, bf16 or fp32: :mod:`hybridfc.compression`); ``grad_topk_warmup_steps`` decays the
share from 1 to ``grad_topk`` over that many steps, ``grad_topk_value_dtype`` is the values' dtype
on the wire (indices are int32), ``grad_topk_momentum_correction`` applies the momentum of a
momentum-SGD backbone optimizer before compression (DGC) and runs that optimizer without it.
``max_consecutive_skips`` (default 10; 0: never) stops the run with an error on every rank after
that many optimizer steps in a row were skipped for non-finite values (:mod:`hybridfc.step`).

A bad section raises :class:`ConfigError` listing every problem, one per line, each naming
the full dotted key, the value given and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Optional, Union, get_args

import hjson
import torch
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    PlainValidator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

__all__ = [
    "AdamOptimizerConfig",
    "AdamParams",
    "AdamWOptimizerConfig",
    "ArcFaceMarginConfig",
    "CombinedMarginConfig",
    "ConfigError",
    "CosFaceMarginConfig",
    "ChunksConfig",
    "CommunicationConfig",
    "DTYPES",
    "GradTopKConfig",
    "PlateauConfig",
    "ScheduleConfig",
    "WarmStartConfig",
    "EvaluationConfig",
    "FullSelectionConfig",
    "HFSelectionConfig",
    "HeadOptimizerConfig",
    "HybridFCConfig",
    "KNNSelectionConfig",
    "MarginConfig",
    "PartialSelectionConfig",
    "SGDOptimizerConfig",
    "SGDParams",
    "SelectionConfig",
    "SoftmaxMarginConfig",
    "config_fingerprint",
    "load_ds_config",
    "parse_head_optimizer",
    "parse_communication",
    "parse_hybridfc_section",
    "parse_margin",
    "parse_selection",
    "split_ds_config",
]

SECTION = "hybridfc"

Number = Annotated[float, Strict(), AllowInfNan(False)]
"""A finite float; an int is accepted and converted, a bool or a string is not."""

DtypeName = Literal["fp32", "bf16", "fp16"]
"""The dtypes the section names (the head's storage, grad_topk's values)."""

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The one table from those names to torch dtypes."""

LogitsMode = Literal["store", "recompute", "auto"]
"""What the head keeps of a step's logits for the backward pass (``logits``)."""

LOGITS_CHOICES: tuple[str, ...] = ("store", "recompute", "auto")


def resolve_logits(choice: str, batch: int, rows: int, budget_mb: float, value_bytes: int = 4) -> str:
    """``"store"`` or ``"recompute"`` for a step of ``batch`` samples over ``rows`` rows: the choice,
    ``auto`` storing while the ``batch × rows`` buffer of ``value_bytes`` values fits ``budget_mb``
    MiB (the head and ``hybridfc plan`` decide with this one rule)."""
    if choice != "auto":
        return choice
    return "store" if batch * rows * value_bytes <= budget_mb * 2**20 else "recompute"


class ConfigError(ValueError):
    """Any problem with a DeepSpeed config or its ``"hybridfc"`` section."""


class _Section(BaseModel):
    """Base of every model of the section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SoftmaxMarginConfig(_Section):
    """Plain softmax over ``x·Wᵀ``, no normalisation and no margin."""

    type: Literal["softmax"] = "softmax"


class CosFaceMarginConfig(_Section):
    """CosFace: ``scale * (cos θ - margin)`` for the target class."""

    type: Literal["cosface"] = "cosface"
    scale: Number = Field(64.0, gt=0)
    margin: Number = Field(0.35, ge=0)


class ArcFaceMarginConfig(_Section):
    """ArcFace: ``scale * cos(θ + margin)`` for the target class."""

    type: Literal["arcface"] = "arcface"
    scale: Number = Field(64.0, gt=0)
    margin: Number = Field(0.5, ge=0, lt=math.pi)


class CombinedMarginConfig(_Section):
    """Combined margin: ``scale * (cos(m1·θ + m2) - m3)`` for the target class."""

    type: Literal["combined"] = "combined"
    scale: Number = Field(64.0, gt=0)
    m1: Number = Field(1.0, gt=0)
    m2: Number = Field(0.5, ge=0)
    m3: Number = Field(0.0, ge=0)


MarginConfig = Annotated[
    Union[SoftmaxMarginConfig, CosFaceMarginConfig, ArcFaceMarginConfig, CombinedMarginConfig],
    Field(discriminator="type"),
]
"""The margin of the head's loss, chosen by its ``"type"`` key."""


def _check_budget(value: Any) -> "int | float":
    is_count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    is_rate = isinstance(value, float) and 0 < value <= 1
    if not (is_count or is_rate):
        raise ValueError("must be a row count (an integer >= 1) or a rate of the shard (a number in (0, 1])")
    return value


Budget = Annotated[Union[int, float], PlainValidator(_check_budget)]
"""Active rows per rank: an integer is a row count, a float in (0, 1] a rate of the shard."""

IndexKind = Literal["auto", "exact", "ivf", "hnsw"]
"""How nearest classes are found: exact matmul + top-k, an IVF index, or a faiss HNSW index; ``auto``
picks exact for small shards and IVF for large ones."""


class FullSelectionConfig(_Section):
    """Every class of the shard enters the softmax (the exact class-parallel softmax)."""

    type: Literal["full"] = "full"


class _Sampled(_Section):
    """Keys shared by the selections that compute ``budget`` rows per rank."""

    budget: Budget = 0.1
    sampling_correction: StrictBool = True


class PartialSelectionConfig(_Sampled):
    """PartialFC: the positives plus uniformly random negatives, ``budget`` rows per rank."""

    type: Literal["partial"] = "partial"


class _Rebuilt(_Sampled):
    """Keys shared by the selections that look classes up in a structure rebuilt from W."""

    k: StrictInt = Field(32, ge=1)
    rebuild_interval: StrictInt = Field(1000, ge=0)
    rebuild_delay: Optional[StrictInt] = Field(None, ge=1)
    late_rebuild: Literal["postpone", "wait"] = "postpone"
    index: IndexKind = "auto"
    hard_fraction: Number = Field(0.5, gt=0, le=1)
    min_recall: Optional[Number] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _delay_within_interval(self) -> "_Rebuilt":
        if self.rebuild_delay is not None and self.rebuild_interval and self.rebuild_delay > self.rebuild_interval:
            raise ValueError(f"rebuild_delay ({self.rebuild_delay}) must be at most rebuild_interval "
                             f"({self.rebuild_interval}): one rebuild runs at a time")
        return self

    def delay(self) -> int:
        """Steps between a rebuild's snapshot and its swap: ``rebuild_delay``, or a tenth of the interval."""
        return self.rebuild_delay or max(1, self.rebuild_interval // 10)


class KNNSelectionConfig(_Rebuilt):
    """KNN softmax: the union of the ``k`` nearest classes of the batch's labels, from a
    class-to-class graph over all classes rebuilt every ``rebuild_interval`` steps."""

    type: Literal["knn"] = "knn"


class HFSelectionConfig(_Rebuilt):
    """HF-softmax: each sample's ``k`` nearest classes of the shard, from an index over the
    shard's centres rebuilt every ``rebuild_interval`` steps."""

    type: Literal["hf"] = "hf"


SelectionConfig = Annotated[
    Union[FullSelectionConfig, PartialSelectionConfig, KNNSelectionConfig, HFSelectionConfig],
    Field(discriminator="type"),
]
"""Which classes of each shard enter each step's softmax, chosen by its ``"type"`` key."""


class EvaluationConfig(_Section):
    """Held-out top-k accuracy every ``interval`` optimizer steps (0: never)."""

    interval: StrictInt = Field(0, ge=0)
    top_k: list[Annotated[StrictInt, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)


class PlateauConfig(_Section):
    """The lr multiplier's drop on a plateau of the held-out metric (:class:`hybridfc.schedule.PlateauLR`)."""

    patience: StrictInt = Field(2, ge=1)
    factor: Number = Field(0.1, gt=0, lt=1)
    threshold: Number = Field(1e-3, ge=0)
    min_factor: Number = Field(1e-3, gt=0, le=1)


class BatchScalingConfig(_Section):
    """The lr of backbone and head multiplied by ``(global batch / reference_batch)`` (``linear``)
    or its square root (``sqrt``)."""

    reference_batch: StrictInt = Field(..., ge=1)
    rule: Literal["linear", "sqrt"] = "linear"

    def factor(self, global_batch: int) -> float:
        """The lr multiplier at ``global_batch`` samples per optimizer step."""
        ratio = global_batch / self.reference_batch
        return ratio if self.rule == "linear" else math.sqrt(ratio)


class ScheduleConfig(_Section):
    """hybridfc's part of the lr schedule, on top of DeepSpeed's scheduler."""

    plateau: Optional[PlateauConfig] = None
    batch_scaling: Optional[BatchScalingConfig] = None


class WarmStartConfig(_Section):
    """How the head's rows start: ``imprint`` sets each class row to the mean normalised feature
    of its training samples under the initial backbone, before the first step;
    ``refresh_interval`` does it again with the current backbone every that many steps."""

    imprint: StrictBool = False
    refresh_interval: StrictInt = Field(0, ge=0)


class ChunksConfig(_Section):
    """The head's exchanges: each rank's micro-batch in ``chunks`` pieces, whose feature exchange
    overlaps the head's compute (:mod:`hybridfc.parallel.chunks`)."""

    chunks: StrictInt = Field(1, ge=1)


class GradTopKConfig(_Section):
    """The backbone's gradient: DeepSpeed's dense reduction (``grad_topk`` null), or each rank's top
    ``grad_topk`` share of entries with error feedback (:mod:`hybridfc.compression`)."""

    grad_topk: Optional[Number] = Field(None, gt=0, le=1)
    grad_topk_warmup_steps: StrictInt = Field(250, ge=0)
    grad_topk_value_dtype: DtypeName = "bf16"
    grad_topk_momentum_correction: StrictBool = False

    @model_validator(mode="after")
    def _topk_keys_need_topk(self) -> "GradTopKConfig":
        stray = [key for key, field in type(self).model_fields.items()
                 if key.startswith("grad_topk_") and getattr(self, key) != field.default]
        if self.grad_topk is None and stray:
            raise ValueError(f"{', '.join(stray)} without grad_topk: no effect while DeepSpeed reduces the "
                             f"backbone's gradients densely; set grad_topk, or remove {'them' if stray[1:] else 'it'}")
        return self


class CommunicationConfig(ChunksConfig, GradTopKConfig):
    """The ``communication`` section: the keys of two separate settings side by side in one JSON
    object, the head's :class:`ChunksConfig` and the backbone's :class:`GradTopKConfig`."""


class SGDParams(_Section):
    """Hyper-parameters of the head's SGD optimizer."""

    lr: Number = Field(0.1, gt=0)
    momentum: Number = Field(0.9, ge=0, lt=1)
    weight_decay: Number = Field(5e-4, ge=0)
    lars_coefficient: Number = Field(0.0, ge=0)


class AdamParams(_Section):
    """Hyper-parameters of the head's Adam / AdamW optimizer (row-sparse)."""

    lr: Number = Field(1e-3, gt=0)
    betas: list[Annotated[Number, Field(ge=0, lt=1)]] = Field(default_factory=lambda: [0.9, 0.999],
                                                              min_length=2, max_length=2)
    eps: Number = Field(1e-8, gt=0)
    weight_decay: Number = Field(0.0, ge=0)


class SGDOptimizerConfig(_Section):
    """Momentum SGD, in DeepSpeed's ``{"type", "params"}`` shape."""

    type: Literal["sgd"] = "sgd"
    params: SGDParams = Field(default_factory=SGDParams)


class AdamOptimizerConfig(_Section):
    """Adam with L2 weight decay added to the gradient."""

    type: Literal["adam"] = "adam"
    params: AdamParams = Field(default_factory=AdamParams)


class AdamWOptimizerConfig(_Section):
    """AdamW: Adam with decoupled weight decay."""

    type: Literal["adamw"] = "adamw"
    params: AdamParams = Field(default_factory=lambda: AdamParams(weight_decay=0.01))


def _sgd_by_default(value: Any) -> Any:
    if isinstance(value, dict) and "type" not in value:
        return {"type": "sgd", **value}
    return value


HeadOptimizerConfig = Annotated[
    Union[SGDOptimizerConfig, AdamOptimizerConfig, AdamWOptimizerConfig],
    Field(discriminator="type"),
    BeforeValidator(_sgd_by_default),
]
"""The head's optimizer, in DeepSpeed's ``{"type", "params"}`` shape (``"type"`` defaults to sgd)."""


class HybridFCConfig(_Section):
    """The whole ``"hybridfc"`` section of a DeepSpeed config."""

    num_classes: StrictInt = Field(ge=1)
    embedding_size: StrictInt = Field(ge=1)
    seed: StrictInt = Field(0, ge=0)
    margin: MarginConfig = Field(default_factory=ArcFaceMarginConfig)
    selection: SelectionConfig = Field(default_factory=FullSelectionConfig)
    storage_dtype: DtypeName = "fp32"
    logits: LogitsMode = "auto"
    logits_budget_mb: Number = Field(1024, gt=0)
    optimizer: HeadOptimizerConfig = Field(default_factory=SGDOptimizerConfig)
    gradient_clipping: Number = Field(0.0, ge=0)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    communication: CommunicationConfig = Field(default_factory=CommunicationConfig)
    max_consecutive_skips: StrictInt = Field(10, ge=0)


_MISSING_SECTION = (
    f'the DeepSpeed config needs a top-level "{SECTION}" section with at least '
    f"num_classes and embedding_size, for example:\n"
    f'  "{SECTION}": {{"num_classes": 1000000, "embedding_size": 512}}'
)


def parse_hybridfc_section(section: dict[str, Any]) -> HybridFCConfig:
    """Validate the ``"hybridfc"`` section; raise :class:`ConfigError` listing every problem."""
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: must be an object (got {_show(section)})")
    return _validate(HybridFCConfig, section, SECTION)


ParsedMargin = Union[SoftmaxMarginConfig, CosFaceMarginConfig, ArcFaceMarginConfig, CombinedMarginConfig]
ParsedSelection = Union[FullSelectionConfig, PartialSelectionConfig, KNNSelectionConfig, HFSelectionConfig]
ParsedHeadOptimizer = Union[SGDOptimizerConfig, AdamOptimizerConfig, AdamWOptimizerConfig]


class _StandaloneMargin(_Section):
    margin: MarginConfig


class _StandaloneOptimizer(_Section):
    optimizer: HeadOptimizerConfig


class _StandaloneSelection(_Section):
    selection: SelectionConfig


class _StandaloneCommunication(_Section):
    communication: CommunicationConfig


def parse_margin(spec: "dict[str, Any] | ParsedMargin") -> ParsedMargin:
    """Validate a margin dict given outside a ds_config (``ClassParallelFC(margin=...)``); a
    parsed margin section passes as it is."""
    return _standalone(spec, _StandaloneMargin, "margin")


def parse_head_optimizer(spec: "dict[str, Any] | ParsedHeadOptimizer") -> ParsedHeadOptimizer:
    """Validate a head-optimizer dict given outside a ds_config (``build_head_optimizer``); a
    parsed optimizer section passes as it is."""
    return _standalone(spec, _StandaloneOptimizer, "optimizer")


def parse_selection(spec: "dict[str, Any] | ParsedSelection") -> ParsedSelection:
    """Validate a selection dict given outside a ds_config (``ClassParallelFC(selection=...)``); a
    parsed selection section passes as it is."""
    return _standalone(spec, _StandaloneSelection, "selection")


def parse_communication(spec: "dict[str, Any] | CommunicationConfig") -> CommunicationConfig:
    """Validate a communication dict given outside a ds_config (``ClassParallelFC(communication=...)``);
    a parsed communication section passes as it is."""
    return _standalone(spec, _StandaloneCommunication, "communication")


def _standalone(spec: Any, wrapper: type[_Section], key: str) -> Any:
    """``spec`` validated as the ``key`` field of ``wrapper`` (errors named from ``key``); a
    model of one of that field's types is returned as it is."""
    if isinstance(spec, _Section):
        accepted = _field_types(wrapper.model_fields[key])
        if not isinstance(spec, accepted):
            raise ConfigError(f"{key}: got a parsed {type(spec).__name__} section; expected a dict or one of "
                              f"{', '.join(model.__name__ for model in accepted)}")
        return spec
    return getattr(_validate(wrapper, {key: spec}, ""), key)


def _validate(model: type[_Section], data: dict[str, Any], prefix: str) -> Any:
    """``model.model_validate(data)``, or a :class:`ConfigError` with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, model, prefix) for error in exc.errors()]
        raise ConfigError("\n".join(problems)) from None


def load_ds_config(config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """Return a deep copy of a ds_config dict, or the ds_config read from a JSON (Hjson) file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(
            "the DeepSpeed config must be a dict or the path of a JSON file "
            f"(got {type(config).__name__})"
        )
    path = Path(config)
    data = _parse_json(_read_text(path), path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"DeepSpeed config file {path}: the top level must be a JSON object "
            f"(got {type(data).__name__})"
        )
    return data


def split_ds_config(ds_config: dict[str, Any]) -> tuple[dict[str, Any], HybridFCConfig]:
    """Return a copy of ds_config without ``"hybridfc"``, for DeepSpeed, and the parsed section."""
    if not isinstance(ds_config, dict):
        raise ConfigError(f"the DeepSpeed config must be a dict (got {type(ds_config).__name__})")
    if SECTION not in ds_config:
        raise ConfigError(_MISSING_SECTION)
    rest = {key: copy.deepcopy(value) for key, value in ds_config.items() if key != SECTION}
    return rest, parse_hybridfc_section(ds_config[SECTION])


def config_fingerprint(cfg: HybridFCConfig) -> int:
    """A 63-bit digest of ``cfg``, the same in every process, to check that all ranks agree."""
    text = json.dumps(cfg.model_dump(), sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _read_text(path: Path) -> str:
    """The text of a config file, or a :class:`ConfigError` naming the path."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read DeepSpeed config file {path}: {exc}") from None


def _parse_json(text: str, path: Path) -> Any:
    """Parse a config file's text the way DeepSpeed does: Hjson, duplicate keys rejected.

    Hjson is a superset of JSON (comments, trailing commas); DeepSpeed reads its config
    files with it, so a file DeepSpeed accepts is accepted here too.
    """

    def reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ConfigError(
                f"DeepSpeed config file {path}: duplicate keys in one object: "
                + ", ".join(json.dumps(key) for key in duplicates)
            )
        return dict(pairs)

    try:
        return hjson.loads(text, object_pairs_hook=reject_duplicates)
    except hjson.HjsonDecodeError as exc:
        raise ConfigError(
            f"invalid JSON in DeepSpeed config file {path}, "
            f"line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


class _Location(NamedTuple):
    """Where a pydantic error points: dotted key, model holding its last part, that field."""

    key: str
    owner: type[BaseModel] | None
    field: FieldInfo | None


def _tagged_members(field: FieldInfo) -> dict[str, type[BaseModel]]:
    """The models of a discriminated-union field by tag; empty for any other field."""
    if not isinstance(field.discriminator, str):
        return {}
    return {
        member.model_fields[field.discriminator].default: member
        for member in get_args(field.annotation)
    }


def _field_types(field: FieldInfo) -> tuple[type[BaseModel], ...]:
    """The models a field may hold: its model, or the members of its union."""
    annotation = field.annotation
    return tuple(c for c in (annotation, *get_args(annotation)) if isinstance(c, type) and issubclass(c, BaseModel))


def _field_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model a plain model-typed field (or an optional one) holds, or None."""
    return next(iter(_field_types(field)), None)   # Optional[M] is Union[M, None]


def _locate(loc: tuple[int | str, ...], root: type[BaseModel], prefix: str) -> _Location:
    """Follow a pydantic ``loc`` from ``root``, dropping union tags from the key."""
    parts = [prefix] if prefix else []
    model: type[BaseModel] | None = root
    owner: type[BaseModel] | None = None
    field: FieldInfo | None = None
    steps = iter(loc)
    for step in steps:
        parts.append(str(step))
        owner = model
        field = model.model_fields.get(str(step)) if model is not None else None
        model = None
        if field is not None:
            members = _tagged_members(field)
            model = members.get(next(steps, None)) if members else _field_model(field)
    return _Location(".".join(parts), owner, field)


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in JSON, shortened when long."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> str:
    """A bound for a message: ``0`` rather than ``0.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _one_of(values: Any) -> str:
    """``"a", "b"`` for a message listing allowed values."""
    return ", ".join(json.dumps(value) for value in values)


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_TYPES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
}


def _describe(error: ErrorDetails, root: type[BaseModel], prefix: str) -> str:
    """One line for one pydantic error: dotted key, what was given, what is allowed."""
    kind, given = error["type"], error["input"]
    where = _locate(error["loc"], root, prefix)
    if kind == "missing":
        return f"{where.key}: required key is missing"
    if kind == "extra_forbidden":
        assert where.owner is not None
        allowed = ", ".join(sorted(where.owner.model_fields))
        return f"{where.key}: unknown key; allowed keys: {allowed}"
    if kind == "invalid_key":
        return f"{where.key}: keys must be strings (got {_show(given)})"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _describe_tag(kind, given, where)
    if kind == "literal_error":
        assert where.field is not None
        allowed = _one_of(get_args(where.field.annotation))
        return f"{where.key}: {_show(given)} is not one of {allowed}"
    if kind in _BOUNDS:
        ctx_key, symbol = _BOUNDS[kind]
        bound = _number(error.get("ctx", {})[ctx_key])
        return f"{where.key}: must be {symbol} {bound} (got {_show(given)})"
    if kind == "value_error":
        return f"{where.key}: {error['ctx']['error']} (got {_show(given)})"
    reason = _TYPES.get(kind, error["msg"])
    return f"{where.key}: {reason} (got {_show(given)})"


def _describe_tag(kind: str, given: Any, where: _Location) -> str:
    """The line for a missing or unknown tag of a discriminated union such as ``margin``."""
    assert where.field is not None and isinstance(where.field.discriminator, str)
    discriminator = where.field.discriminator
    allowed = _one_of(_tagged_members(where.field))
    key = f"{where.key}.{discriminator}"
    if kind == "union_tag_not_found":
        return f"{key}: required key is missing; one of {allowed}"
    return f"{key}: {_show(given[discriminator])} is not one of {allowed}"
