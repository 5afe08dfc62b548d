"""Capacity planning: memory and communication of the classification head, per rank and step.

>>> from hybridfc.plan import PlanInputs, make_plan, max_num_classes
>>> inputs = PlanInputs(num_classes=10_000_000, embedding_size=512, world_size=64,
...                     local_batch=64, selection="partial", budget=0.1)
>>> plan = make_plan(inputs)
>>> [round(m.memory.total / 2**30, 2) for m in plan.methods]      # GiB per rank
[133.51, 3.6, 0.95]
>>> max_num_classes(inputs, 80 * 2**30, "selection")               # largest C in 80 GiB
865667136

Three methods are planned side by side, each for one optimizer step of one micro-batch:

* ``data_parallel``: every rank holds all C rows, computes its local batch b against all of
  them and all-reduces the C×d weight gradient;
* ``model_parallel``: rank r holds its shard of C_r rows, all-gathers the features of the
  global batch B = N·b and computes B × C_r logits (``ClassParallelFC``, selection ``full``);
* ``selection``: sharded as above, but only ``budget`` rows of the shard are computed
  (``partial``, ``knn`` and ``hf`` cost the same here; ``full`` is model-parallel again).

"Per rank" is the rank with the largest shard, C_r = ⌈C/N⌉. Every figure is in bytes.

Memory: the head's buffers at its peak inside the step, above what the process held before the
head existed (backbone, framework, communication library excluded). With ``rows`` the rows a
rank holds, ``comp`` the rows it computes, ``batch`` the rows of its logits (b for
data-parallel, B when sharded), ``s`` the weight's storage width, ``k`` the optimizer's state
tensors (momentum SGD 1, Adam 2):

=========================  =====================  ==============================================
term                       bytes                  what
=========================  =====================  ==============================================
weight                     rows·d·s               the rows held
optimizer_state            k·rows·d·s             dense over the rows held (a row-sparse update
                                                  touches only selected rows, but stores all)
weight_gradient            comp·d·4               ∂L/∂ of the normalised rows, fp32
logits                     batch·comp·4, or a     ``store``: the fp32 logits' exponentials, one
                           tile                   buffer kept for the backward pass;
                                                  ``recompute``: a tile, b·min(comp, 16384)·4
                                                  (a CUDA tile; the CPU's is 64 × 2048); the
                                                  sharded methods' ``logits`` mode, ``auto``
                                                  storing while the buffer fits its budget
                                                  (data-parallel: always the buffer)
row_copy                   comp·d·4 or 0          the fp32 rows fed to the normalisation when they
                                                  are not the weight itself: the fp32 cast of a
                                                  bf16/fp16 weight, or the gathered selected rows
normalized_rows            comp·d·4, or a tile    data-parallel: ``F.normalize`` of the rows,
                           of min(comp, 16384)    saved for backward; hybridfc's head normalises
                           rows                   one column tile at a time into one buffer
                                                  (a CUDA tile; the CPU's is 2048 rows)
normalize_temporaries      4·comp·d·4 or 0        data-parallel only: backward of ``F.normalize``
                                                  w.r.t. the row norm: ``x/n``, ``x/n/n``, ``-g``
                                                  and their product
feature_buffers            batch·d·4·(2, 3 or 4)  normalised features and their gradient, plus the
                                                  fp32 gathered (or cast) features when the head
                                                  made them, plus (sharded) the features scaled
                                                  by each sample's loss gradient
=========================  =====================  ==============================================

Two moments can be the peak; ``total`` is the larger:

* ``softmax_peak``, the end of the softmax backward (``grad_logits.t() @ features`` has just
  produced the weight gradient; logits, normalised rows and features are still held):
  weight + optimizer_state + row_copy + normalized_rows + logits + weight_gradient +
  feature_buffers;
* ``normalize_peak``, data-parallel only, inside the backward of ``F.normalize`` on the rows
  (logits and normalised rows are freed, four temporaries of the rows' size coexist with their
  incoming gradient): weight + optimizer_state + row_copy + weight_gradient +
  normalize_temporaries.

The optimizer step comes later and holds less: hybridfc's update is in place (weight, state and
gradient only); the data-parallel baseline's ``torch.optim.SGD`` makes at most three update
temporaries of the weight's size, against five fp32 ones in ``normalize_peak``. Left out: vectors of one
value per row or sample (row norms, labels, indices; ≤ 2/d of a weight copy) and the selection's
own structures (row marks, 5 bytes per row; the KNN graph, rows·k·4; the ANN index and its
snapshot, about 2·rows·d·4). The model assumes an angular
margin (arcface, cosface, combined), which normalises the rows; the plain ``softmax`` margin
holds less. With gradient accumulation, add the gradient kept between micro-batches
(rows·d·s for ``full``, comp·d·s for a selection).

Communication: bytes one rank sends in one step; it receives as many. Each collective is counted
as the backend moves it (:mod:`hybridfc.parallel.wire`, the same model the communication layer's
accounting uses): an all-gather of a tensor of S bytes (all ranks together) sends (N−1)/N·S per
rank, an all-reduce 2(N−1)/N·S; the feature-gradient reduce-scatter is an all-to-all and a local
sum on gloo (whose own reduce-scatter would send as much as an all-reduce), NCCL's reduce-scatter
elsewhere, (N−1)/N·S either way.

===========================  ===========================  ====================================
term                         bytes                        what
===========================  ===========================  ====================================
feature_all_gather           (N−1)·b·d·f                  the B×d features (f: feature width)
label_all_gather             (N−1)·(b + 4)·8              int64 labels and each rank's
                                                          (batch size, input verdict) vector
softmax                      2(N−1)/N · 3·B·4             all-reduce of the row max (B fp32),
                                                          then of sum-exp and target logit (2B)
feature_gradient             (N−1)·b·d·f                  scatter-sum of the B×d gradient
selection_lookup             2(N−1)/N · B·k·8             ``knn`` only: the MAX all-reduce that
                                                          hands every rank the int64 neighbour
                                                          lists of the batch's labels
weight_gradient_sync         2(N−1)/N · C·d·s             data-parallel only; 0 when sharded
===========================  ===========================  ====================================

The backbone's gradient (:func:`backbone_gradient_exchange`, ``hybridfc plan --backbone-params
P``): DeepSpeed's dense ring all-reduce of its P fp32 entries sends 2(N−1)/N·4P per rank and
step; ``grad_topk`` R sends an all-gather of k = R·P (int32 index, value) pairs, (N−1)·k·(4 + v)
with v the value's bytes: R·N·(4 + v)/8 times the dense bytes (50× fewer at 1 % on 2 ranks with
fp32 values, 25× on 4, nothing saved on 100). It stops paying at a density of 8/((4 + v)·N);
above it hybridfc sends dense.

``Plan.global_logits`` is B·C·4: the fp32 logits of one step over all classes and the whole
batch, the size one device would need without sharding (summed over ranks when sharded).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Union

from hybridfc.config import LOGITS_CHOICES, resolve_logits
from hybridfc.head.tiles import CUDA_COLUMNS
from hybridfc.parallel import wire

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATES = {"sgd": 1, "adam": 2}
SELECTIONS = ("full", "partial", "knn", "hf")
METHODS = ("data_parallel", "model_parallel", "selection")
FP32 = 4
INT64 = 8
VERDICT_VALUES = 4
SOFTMAX_EXCHANGES = (1, 2)   # fp32 per sample in the softmax's all-reduces: row max; sum-exp and target
NORMALIZE_TEMPORARIES = 4

Budget = Union[int, float]


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on; ``budget`` is a rate of the shard (float in (0, 1]) or a row
    count (int ≥ 1), and applies to the selections other than ``full``."""

    num_classes: int
    embedding_size: int
    world_size: int
    local_batch: int
    selection: str = "full"
    budget: Optional[Budget] = None
    storage_dtype: str = "fp32"
    feature_dtype: str = "fp32"
    optimizer: str = "sgd"
    k: int = 32
    logits: str = "auto"
    logits_budget_mb: float = 1024

    def __post_init__(self) -> None:
        check_inputs(self)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.local_batch

    @property
    def shard_rows(self) -> int:
        """Rows of the largest shard, ⌈C/N⌉."""
        return -(-self.num_classes // self.world_size)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank; see the module docstring for each term."""

    weight: int
    optimizer_state: int
    weight_gradient: int
    logits: int
    row_copy: int
    normalized_rows: int
    normalize_temporaries: int
    feature_buffers: int
    softmax_peak: int
    normalize_peak: int
    total: int


@dataclass(frozen=True)
class Communication:
    """Bytes one rank sends per step (ring algorithms); see the module docstring."""

    feature_all_gather: int
    label_all_gather: int
    softmax: int
    feature_gradient: int
    selection_lookup: int
    weight_gradient_sync: int
    total: int


@dataclass(frozen=True)
class MethodPlan:
    """One method: the rows a rank holds and computes, its memory and its communication."""

    method: str
    label: str
    rows_held: int
    rows_computed: int
    logits_batch: int
    logits_mode: str
    memory: Memory
    communication: Communication


@dataclass(frozen=True)
class Plan:
    """The three methods for one set of inputs, in the order of :data:`METHODS`."""

    inputs: PlanInputs
    methods: tuple[MethodPlan, ...]
    global_logits: int

    def method(self, name: str) -> MethodPlan:
        return self.methods[METHODS.index(name)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        methods = tuple(
            MethodPlan(**{**m, "memory": Memory(**m["memory"]), "communication": Communication(**m["communication"])})
            for m in data["methods"]
        )
        return cls(PlanInputs(**data["inputs"]), methods, data["global_logits"])


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(inputs: PlanInputs) -> None:
    """Raise ``ValueError`` naming the first bad input and what is allowed."""
    for name in ("embedding_size", "world_size", "local_batch", "num_classes", "k"):
        value = getattr(inputs, name)
        _require(_is_count(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
    _require(inputs.num_classes >= inputs.world_size,
             f"num_classes={inputs.num_classes} is smaller than world_size={inputs.world_size}: "
             "every rank needs at least one class")
    for name, allowed in (("selection", SELECTIONS), ("storage_dtype", DTYPE_BYTES),
                          ("feature_dtype", DTYPE_BYTES), ("optimizer", OPTIMIZER_STATES),
                          ("logits", LOGITS_CHOICES)):
        _require(getattr(inputs, name) in allowed,
                 f"{name} must be one of {', '.join(allowed)}, got {getattr(inputs, name)!r}")
    _require(isinstance(inputs.logits_budget_mb, (int, float)) and inputs.logits_budget_mb > 0,
             f"logits_budget_mb must be a positive number of MiB, got {inputs.logits_budget_mb!r}")
    _check_budget(inputs)


def _check_budget(inputs: PlanInputs) -> None:
    budget = inputs.budget
    if inputs.selection == "full":
        _require(budget is None, f"budget applies to the selections partial, knn and hf, not to full "
                                 f"(which computes every row); got budget={budget!r}")
        return
    _require(budget is not None, f"selection {inputs.selection!r} needs a budget: a rate in (0, 1] "
                                 "or a row count >= 1")
    if _is_count(budget):
        _require(budget >= 1, f"budget must be a rate in (0, 1] or a row count >= 1, got {budget}")
        _require(budget <= inputs.shard_rows,
                 f"budget={budget} rows is more than the shard: {inputs.num_classes} classes over "
                 f"{inputs.world_size} ranks leave {inputs.shard_rows} rows on the largest one")
        return
    _require(isinstance(budget, float) and math.isfinite(budget) and 0 < budget <= 1,
             f"budget must be a rate in (0, 1] or a row count >= 1, got {budget!r}")


def budget_rows(inputs: PlanInputs, shard: int) -> int:
    """Rows computed out of a shard of ``shard`` rows: the count, or ⌊rate·shard⌋ (the rate read
    as the decimal it is written as), at least 1."""
    if _is_count(inputs.budget):
        return min(inputs.budget, shard)
    return max(1, math.floor(Fraction(repr(inputs.budget)) * shard))


def _memory(inputs: PlanInputs, rows: int, comp: int, batch: int, sharded: bool, selected: bool,
            mode: str) -> Memory:
    d, s = inputs.embedding_size, DTYPE_BYTES[inputs.storage_dtype]
    weight = rows * d * s
    state = OPTIMIZER_STATES[inputs.optimizer] * weight
    gradient = comp * d * FP32
    tile_columns = min(comp, CUDA_COLUMNS)
    normalized = tile_columns * d * FP32 if sharded else comp * d * FP32
    temporaries = 0 if sharded else NORMALIZE_TEMPORARIES * comp * d * FP32
    row_copy = comp * d * FP32 if selected or s != FP32 else 0
    made_features = (sharded and inputs.world_size > 1) or DTYPE_BYTES[inputs.feature_dtype] != FP32
    features = batch * d * FP32 * ((3 if made_features else 2) + (1 if sharded else 0))
    logits = batch * comp * FP32 if mode == "store" else inputs.local_batch * tile_columns * FP32
    softmax_peak = weight + state + row_copy + normalized + logits + gradient + features
    normalize_peak = weight + state + row_copy + gradient + temporaries if not sharded else 0
    return Memory(weight, state, gradient, logits, row_copy, normalized, temporaries, features,
                  softmax_peak, normalize_peak, max(softmax_peak, normalize_peak))


def _communication(inputs: PlanInputs, sharded: bool, selected: bool) -> Communication:
    n, b, d, batch = inputs.world_size, inputs.local_batch, inputs.embedding_size, inputs.global_batch
    if sharded:
        features = wire.all_gather_bytes(b * d * FP32, n)
        labels = wire.all_gather_bytes(b * INT64, n) + wire.all_gather_bytes(VERDICT_VALUES * INT64, n)
        softmax = sum(wire.all_reduce_bytes(scalars * batch * FP32, n) for scalars in SOFTMAX_EXCHANGES)
        feature_gradient = wire.scatter_sum_bytes(batch * d * FP32, n)
        lookup = wire.all_reduce_bytes(batch * inputs.k * INT64, n) if selected and inputs.selection == "knn" else 0
        parts = (features, labels, softmax, feature_gradient, lookup, 0)
    else:
        weight_grad = inputs.num_classes * d * DTYPE_BYTES[inputs.storage_dtype]
        parts = (0, 0, 0, 0, 0, wire.all_reduce_bytes(weight_grad, n))
    return Communication(*parts, sum(parts))


def _label(inputs: PlanInputs, method: str) -> str:
    if method != "selection":
        return method.replace("_", "-")
    return f"{inputs.selection} ({inputs.budget})" if inputs.selection != "full" else "full"


def _method(inputs: PlanInputs, method: str) -> MethodPlan:
    sharded = method != "data_parallel"
    selected = method == "selection" and inputs.selection != "full"
    rows = inputs.shard_rows if sharded else inputs.num_classes
    comp = budget_rows(inputs, rows) if selected else rows
    batch = inputs.global_batch if sharded else inputs.local_batch
    mode = resolve_logits(inputs.logits, batch, comp, inputs.logits_budget_mb) if sharded else "store"
    return MethodPlan(method, _label(inputs, method), rows, comp, batch, mode,
                      _memory(inputs, rows, comp, batch, sharded, selected, mode),
                      _communication(inputs, sharded, selected))


def make_plan(inputs: PlanInputs) -> Plan:
    """Memory and communication per rank of the three methods (module docstring: the terms)."""
    methods = tuple(_method(inputs, m) for m in METHODS)
    return Plan(inputs, methods, inputs.global_batch * inputs.num_classes * FP32)


@dataclass(frozen=True)
class GradientExchange:
    """Bytes one rank sends per step for the backbone's gradient, dense and with ``grad_topk``."""

    parameters: int
    world_size: int
    density: float
    value_dtype: str
    dense: int
    topk: int
    break_even_density: float

    @property
    def saving(self) -> float:
        """How many times fewer bytes top-k sends than dense."""
        return self.dense / self.topk if self.topk else math.inf


def backbone_gradient_exchange(parameters: int, world_size: int, density: float,
                               value_dtype: str = "fp32") -> GradientExchange:
    """The backbone's gradient exchange per rank and step (module docstring); where top-k does
    not pay, ``topk`` is what hybridfc sends instead: the dense all-reduce."""
    _require(_is_count(parameters) and parameters >= 1, f"parameters must be an integer >= 1, got {parameters}")
    _require(_is_count(world_size) and world_size >= 1, f"world_size must be an integer >= 1, got {world_size}")
    _require(0 < density <= 1, f"the top-k density must be in (0, 1], got {density}")
    _require(value_dtype in DTYPE_BYTES, f"value_dtype must be one of {', '.join(DTYPE_BYTES)}, got {value_dtype!r}")
    value_bytes = DTYPE_BYTES[value_dtype]
    pairs = max(1, round(density * parameters))
    dense = wire.all_reduce_bytes(FP32 * parameters, world_size)
    sparse = wire.sparse_all_reduce_bytes(pairs, value_bytes, world_size)
    topk = sparse if wire.sparse_pays(pairs, parameters, value_bytes, world_size) else dense
    return GradientExchange(parameters, world_size, density, value_dtype, dense, topk,
                            min(1.0, 2 * FP32 / ((4 + value_bytes) * world_size)))


def _fits(inputs: PlanInputs, num_classes: int, memory_bytes: float, method: str) -> bool:
    sized = dataclasses.replace(inputs, num_classes=num_classes)
    return _method(sized, method).memory.total <= memory_bytes


def max_num_classes(inputs: PlanInputs, memory_bytes: float, method: str = "selection") -> Optional[int]:
    """The largest C whose ``method`` fits ``memory_bytes`` per rank (the other inputs kept), or
    None when not even the smallest valid C fits. Memory grows with C, so C + 1 does not fit."""
    _require(method in METHODS, f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _require(memory_bytes > 0, f"memory must be > 0 bytes, got {memory_bytes}")
    budget = inputs.budget if _is_count(inputs.budget) and inputs.selection != "full" else 1
    low = inputs.world_size * budget
    if not _fits(inputs, low, memory_bytes, method):
        return None
    high = 2 * low
    while _fits(inputs, high, memory_bytes, method):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _fits(inputs, mid, memory_bytes, method) else (low, mid)
    return low
