"""Class selections (partial, knn, hf): the head's step on the active rows only.

One ``run_distributed`` call per world size (1-4) runs every scenario inside its ranks and
returns what each rank saw (losses, gradients, active sets, weights and optimizer state after
each step). The tests compare that with ``full`` (bit for bit, when the budget covers the
shard), with the float64 reference of :mod:`reference` restricted to the union of the ranks'
active sets, and with torch's Adam. Class counts are never divisible by the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc import ClassParallelFC, ConfigError, build_head_optimizer
from hybridfc.checkpoint import load_head, save_head
from hybridfc.config import parse_selection
from hybridfc.parallel.groups import shard_range
from reference import random_batch, random_weight, rank_rows, reference_grads_over, use_small_tiles

WORLD_SIZES = (1, 2, 3, 4)
OPTIMIZER_WORLD_SIZES = (1, 2, 3)
WIDTH = 8
TIMEOUT = 240.0
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
KINDS = ("partial", "knn", "hf")
FULL = {"type": "full"}
REBUILT = {"k": 3, "rebuild_interval": 3, "rebuild_delay": 1, "late_rebuild": "wait", "index": "exact"}
SIZES = {1: (12,), 2: (7, 5), 3: (6, 0, 8), 4: (4, 6, 0, 5)}  # local batches per world size, B <= 24
MARGINS = {
    "arcface": {"type": "arcface", "scale": 16.0, "margin": 0.5},
    "cosface": {"type": "cosface", "scale": 16.0, "margin": 0.35},
    "softmax": {"type": "softmax"},
}
ARCFACE = MARGINS["arcface"]
OPTIMIZERS = {
    "sgd": {"type": "sgd", "params": {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.05}},
    "adam": {"type": "adam", "params": {"lr": 0.05, "weight_decay": 0.01}},
    "adamw": {"type": "adamw", "params": {"lr": 0.05, "weight_decay": 0.1}},
}
SPARSE_BUDGET = 0.5
STEPS = 4


def num_classes(world_size: int) -> int:
    """40, 81, 122, 163: leaves world_size - 1 leftover rows."""
    return 41 * world_size - 1


def largest_shard(world_size: int) -> int:
    return shard_range(num_classes(world_size), world_size, 0)[1]


def selection(kind: str, budget: "int | float", **options) -> dict:
    """A selection spec; knn and hf rebuild every 3 steps (swapped in a step later) from an exact index."""
    spec = {"type": kind, "budget": budget, **options}
    return {**REBUILT, **spec} if kind in ("knn", "hf") else spec


def expected_rows(budget: "int | float", shard_rows: int) -> int:
    """Active rows per step of a shard: a count (at most the shard) or ⌊rate·C_r⌋, at least 1,
    the rate read as the decimal it is written as."""
    if isinstance(budget, float):
        return max(1, math.floor(Fraction(str(budget)) * shard_rows))
    return min(budget, shard_rows)


def step_batch(world_size: int, seed: int, spread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh global batch ``(E, Y)``; ``spread``: distinct labels spread evenly over the classes
    (every shard holds at least three)."""
    classes, batch = num_classes(world_size), sum(SIZES[world_size])
    embeddings, labels = random_batch(classes, WIDTH, batch, seed)
    if spread:
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
        labels = (torch.arange(batch) * classes // batch)[order]
    return embeddings, labels


# ----------------------------------------------------------------------------- in the ranks


def make_head(weight: torch.Tensor, spec: dict, margin: dict = ARCFACE, double: bool = False,
              **options) -> ClassParallelFC:
    """A head of ``len(weight)`` classes whose shard holds its rows of ``weight``."""
    head = ClassParallelFC(weight.shape[0], weight.shape[1], margin=margin, selection=spec, **options)
    if double:
        head.double()
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
    return head


def forward_backward(head, embeddings, labels, rank, factor=1.0):
    """Forward and backward of this rank's part of a global batch; ``(loss, embeddings' gradient)``."""
    dtype = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    rows = rank_rows(SIZES[head.world_size], rank)
    local = embeddings[rows].to(dtype).requires_grad_()
    loss = head(local, labels[rows])
    (loss * factor).backward()
    return loss.detach(), local.grad


def dense_gradient(head) -> torch.Tensor:
    """The shard's gradient since ``zero_grad`` as a ``(C_r, d)`` tensor (zero on untouched rows)."""
    rows, grad = head.gradient()
    if rows is None:
        return grad.clone()
    dense = grad.new_zeros(head.num_local, grad.shape[1])
    dense[rows] = grad
    return dense


def train(head, optimizer, rank: int, seed: int, steps: int = 2) -> list[dict]:
    """``steps`` optimizer steps on fresh batches; per step what the head saw and left."""
    records = []
    for step in range(steps):
        optimizer.zero_grad()
        loss, embedding_grad = forward_backward(head, *step_batch(head.world_size, seed + step), rank)
        active = head.last_selection
        rows, grad = head.gradient()
        record = {"loss": loss, "embedding_grad": embedding_grad, "grad": dense_gradient(head),
                  "grad_rows": rows, "sparse_grad": None if rows is None else grad.clone(),
                  "active": None if active is None else active.rows.clone(),
                  "positives_only": None if active is None else active.positives_only}
        optimizer.step()
        record["weight"] = head.weight.detach().clone()
        record["state"] = {name: value.clone() for name, value in optimizer.state[head.weight].items()}
        records.append(record)
    return records


def full_budget_selections(world_size: int) -> dict[str, dict]:
    """Every sparse selection with a budget that covers every shard: a rate of 1 and the largest shard."""
    return {f"{kind}/{budget!r}": selection(kind, budget) for kind in KINDS
            for budget in (1.0, largest_shard(world_size))}


def _full_budget(rank: int, world_size: int) -> dict:
    """Two SGD steps and two Adam steps of full and of every covering sparse selection, same inputs."""
    weight = random_weight(num_classes(world_size), WIDTH, 100 + world_size).float()
    out = {}
    for optimizer_name in ("sgd", "adam"):
        for name, spec in {"full": FULL, **full_budget_selections(world_size)}.items():
            head = make_head(weight, spec)
            optimizer = build_head_optimizer(head, OPTIMIZERS[optimizer_name])
            out[optimizer_name, name] = train(head, optimizer, rank, seed=200 + world_size)
    return out


@dataclass(frozen=True)
class Scenario:
    """One optimizer step of a float64 sparse head on fresh inputs drawn from ``seed``."""

    spec: dict
    margin: dict
    seed: int
    micro: int = 1  # micro-batches accumulated, each loss divided by their count
    spread: bool = False  # many distinct labels in every shard
    logits: str = "store"

    def weight(self, world_size: int) -> torch.Tensor:
        return random_weight(num_classes(world_size), WIDTH, self.seed)

    def batches(self, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [step_batch(world_size, self.seed + m, self.spread) for m in range(self.micro)]


def reference_scenarios(world_size: int) -> dict[str, Scenario]:
    """Each selection with each margin, with two accumulated micro-batches, with room for random
    rows with and without the sampling correction, hard negatives allowed the whole budget,
    and a budget of 2 rows that the positives exceed."""
    budgets = {"partial": 0.5, "knn": 16, "hf": 0.4}
    specs = {}
    for kind, budget in budgets.items():
        for name, margin in MARGINS.items():
            specs[f"{kind}/{name}"] = (selection(kind, budget), margin, 1, False)
        specs[f"{kind}/accumulate"] = (selection(kind, budget), MARGINS["cosface"], 2, False)
        corrected = selection(kind, 0.5) if kind == "partial" else selection(kind, 0.75, k=1)  # room for random rows
        specs[f"{kind}/corrected"] = (corrected, ARCFACE, 2, False)
        specs[f"{kind}/uncorrected"] = ({**corrected, "sampling_correction": False}, ARCFACE, 1, False)
        if kind != "partial":
            specs[f"{kind}/hard_only"] = (selection(kind, budget, hard_fraction=1.0), ARCFACE, 1, False)
    specs["positives_only"] = (selection("partial", 2), ARCFACE, 2, True)
    return {f"{name}@{logits}": Scenario(spec, margin, 1000 * world_size + 10 * i, micro, spread, logits)
            for logits in ("store", "recompute")
            for i, (name, (spec, margin, micro, spread)) in enumerate(specs.items())}


def _run_scenario(scenario: Scenario, rank: int, world_size: int) -> dict:
    """Each micro-batch's loss, embeddings' gradient and active classes; the touched rows' gradient."""
    head = make_head(scenario.weight(world_size), scenario.spec, scenario.margin, double=True,
                     logits=scenario.logits)
    micro = []
    for embeddings, labels in scenario.batches(world_size):
        loss, embedding_grad = forward_backward(head, embeddings, labels, rank, factor=1 / scenario.micro)
        active = head.last_selection
        micro.append({"loss": loss, "embedding_grad": embedding_grad, "classes": active.rows + head.class_start,
                      "positives_only": active.positives_only, "logit_offset": active.logit_offset})
    rows, grad = head.gradient()
    return {"micro": micro, "grad_classes": rows + head.class_start, "grad": grad,
            "positives_only_steps": head.selection.positives_only_steps,
            "shard": (head.class_start, head.num_local),
            "graph": head.selection.graph.current if scenario.spec["type"] == "knn" else None}


def _sparse_updates(rank: int, world_size: int) -> dict:
    """Two steps of every optimizer, storage dtype and selection with half the shard active."""
    weight = random_weight(num_classes(world_size), WIDTH, 300 + world_size)
    out = {}
    for optimizer_name, spec in OPTIMIZERS.items():
        for storage in ("fp32", "bf16"):
            for kind in KINDS:
                head = make_head(weight, selection(kind, SPARSE_BUDGET), storage_dtype=storage)
                optimizer = build_head_optimizer(head, spec)
                out[optimizer_name, storage, kind] = {
                    "initial": head.weight.detach().clone(),
                    "steps": train(head, optimizer, rank, seed=400 + world_size),
                    "shard": (head.class_start, head.num_local)}
    return out


def _adam_steps(rank: int, world_size: int) -> dict:
    """``STEPS`` steps of dense float64 Adam and AdamW (full), and of Adam under partial."""
    weight = random_weight(num_classes(world_size), WIDTH, 500 + world_size)
    out = {}
    for name in ("adam", "adamw"):
        head = make_head(weight, FULL, double=True)
        initial = head.weight.detach().clone()
        out["dense", name] = {"initial": initial, "steps": train(head, build_head_optimizer(head, OPTIMIZERS[name]),
                                                                 rank, seed=600 + world_size, steps=STEPS)}
    head = make_head(weight.float(), selection("partial", SPARSE_BUDGET))
    initial = head.weight.detach().clone()
    out["lazy", "adam"] = {"initial": initial, "steps": train(head, build_head_optimizer(head, OPTIMIZERS["adam"]),
                                                              rank, seed=700 + world_size, steps=STEPS)}
    return out


def _reproducibility(rank: int, world_size: int) -> dict:
    """Each selection run three times (seed 0, seed 0 again, seed 1) from the same weight."""
    weight = random_weight(num_classes(world_size), WIDTH, 800).float()
    out = {}
    for kind in KINDS:
        for label, seed in (("first", 0), ("again", 0), ("other_seed", 1)):
            head = make_head(weight, selection(kind, 0.5, **({} if kind == "partial" else {"k": 1})), seed=seed)
            steps = train(head, build_head_optimizer(head, OPTIMIZERS["sgd"]), rank, seed=900, steps=5)
            rebuilt = {"knn": "graph", "hf": "index"}
            out[kind, label] = {"losses": [s["loss"] for s in steps], "active": [s["active"] for s in steps],
                                "weight": head.weight.detach().clone(),
                                "built_from_step": getattr(head.selection, rebuilt[kind]).built_from_step
                                if kind in rebuilt else None}
    return out


def bad_selections(world_size: int) -> list[tuple[dict, str]]:
    """``(spec, the key its ConfigError must name)``."""
    classes, largest = num_classes(world_size), largest_shard(world_size)
    return [
        ({"type": "knn", "budget": 0.5, "k": classes}, "selection.k"),
        ({"type": "hf", "budget": 0.5, "k": classes + 1}, "selection.k"),
        ({"type": "partial", "budget": 0}, "selection.budget"),
        ({"type": "knn", "budget": 0.0, "k": 3}, "selection.budget"),
        ({"type": "partial", "budget": 1.5}, "selection.budget"),
        ({"type": "partial", "budget": largest + 1}, "selection.budget"),
        ({"type": "hf", "budget": largest + 1, "k": 3}, "selection.budget"),
        ({"type": "topk", "budget": 0.5}, "selection.type"),
        ({"type": "knn", "budget": 0.5, "kk": 3}, "selection.kk"),
        ({"type": "partial", "budget": 0.5, "k": 3}, "selection.k"),
    ]


def edge_selections(world_size: int) -> list[dict]:
    """The largest values that are accepted: k = C - 1 (knn), k = C (hf), budget = largest shard."""
    classes, largest = num_classes(world_size), largest_shard(world_size)
    return [{"type": "knn", "budget": 0.5, "k": classes - 1}, {"type": "hf", "budget": 0.5, "k": classes},
            {"type": "partial", "budget": largest}]


def _construct(spec: dict, world_size: int) -> str:
    """``"ok"`` or ``"<exception type>: <message>"`` of building a head with ``spec``."""
    try:
        ClassParallelFC(num_classes(world_size), WIDTH, selection=spec)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _selection_worker(rank: int, world_size: int) -> dict:
    use_small_tiles()
    out = {"reference": {name: _run_scenario(scenario, rank, world_size)
                         for name, scenario in reference_scenarios(world_size).items()}}
    if world_size in OPTIMIZER_WORLD_SIZES:
        out.update(full_budget=_full_budget(rank, world_size), sparse=_sparse_updates(rank, world_size),
                   adam=_adam_steps(rank, world_size))
    if world_size == 2:
        out["reproducibility"] = _reproducibility(rank, world_size)
        out["bad"] = [_construct(spec, world_size) for spec, _ in bad_selections(world_size)]
        out["edge"] = [_construct(spec, world_size) for spec in edge_selections(world_size)]
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def run(request):
    """``(world_size, [what each rank returned])``, one spawn per world size."""
    return request.param, run_distributed(_selection_worker, request.param, timeout=TIMEOUT)


def _optimizer_run(run):
    world_size, results = run
    if world_size not in OPTIMIZER_WORLD_SIZES:
        pytest.skip(f"optimizer scenarios run on {OPTIMIZER_WORLD_SIZES} ranks")
    return world_size, results


def _two_rank_run(run):
    world_size, results = run
    if world_size != 2:
        pytest.skip("runs on 2 ranks")
    return results


# ----------------------------------------------------------------------------- 1. budget covering the shard


def test_budget_covering_the_shard_equals_full_bit_for_bit(run):
    """With budget 1.0 or the largest shard, partial, knn and hf give exactly full's loss,
    embedding gradients and weight gradient, and the same weights and optimizer state after
    two SGD steps and two Adam steps."""
    world_size, results = _optimizer_run(run)
    for optimizer_name in ("sgd", "adam"):
        for name in full_budget_selections(world_size):
            for rank, result in enumerate(results):
                runs = result["full_budget"]
                for step, (expected, got) in enumerate(zip(runs[optimizer_name, "full"], runs[optimizer_name, name],
                                                           strict=True)):
                    where = f"{optimizer_name}, {name}, rank {rank}, step {step + 1}"
                    assert got["active"].numel() == expected["weight"].shape[0], where
                    for key in ("loss", "embedding_grad", "grad", "weight"):
                        assert torch.equal(got[key], expected[key]), f"{key}: {where}"
                    assert expected["state"].keys() <= got["state"].keys(), where  # plus sparse step counters
                    for key, value in expected["state"].items():
                        assert torch.equal(got["state"][key], value), f"state {key}: {where}"


# ----------------------------------------------------------------------------- 2. reference on the active sets


def test_sparse_step_equals_reference_over_the_union_of_active_sets(run):
    """Loss, embedding gradients and the touched rows' gradient equal the float64 margin
    softmax over the classes the ranks selected (their union U), for partial, knn and hf with
    arcface, cosface and softmax; with two micro-batches the touched rows are the union of
    both steps' active rows and their gradient the sum; with ``sampling_correction`` (the
    default) the softmax adds each rank's logit offsets to the non-target logits."""
    world_size, results = run
    for name, scenario in reference_scenarios(world_size).items():
        weight = scenario.weight(world_size)
        expected_grad = torch.zeros_like(weight)
        for m, (embeddings, labels) in enumerate(scenario.batches(world_size)):
            got_micro = [result["reference"][name]["micro"][m] for result in results]
            classes = torch.cat([got["classes"] for got in got_micro])
            assert classes.numel() < weight.shape[0], f"{name}: the active sets cover every class"
            offset = None
            if scenario.spec.get("sampling_correction", True):
                offset = torch.cat([torch.zeros(got["classes"].numel(), dtype=torch.float64)
                                    if got["logit_offset"] is None else got["logit_offset"] for got in got_micro])
            else:
                assert all(got["logit_offset"] is None for got in got_micro), name
            loss, embedding_grad, weight_grad = reference_grads_over(classes, embeddings, labels, weight,
                                                                     scenario.margin, offset)
            expected_grad[classes] += weight_grad / scenario.micro
            for rank, result in enumerate(results):
                got = result["reference"][name]["micro"][m]
                where = f"{name}, micro-batch {m}, rank {rank}"
                assert_close(got["loss"], loss, **FLOAT64, msg=where)
                expected = world_size * embedding_grad[rank_rows(SIZES[world_size], rank)] / scenario.micro
                assert_close(got["embedding_grad"], expected, **FLOAT64, msg=where)
        for rank, result in enumerate(results):
            got = result["reference"][name]
            touched = torch.unique(torch.cat([micro["classes"] for micro in got["micro"]]))
            assert torch.equal(got["grad_classes"], touched), f"{name}, rank {rank}"
            assert_close(got["grad"], expected_grad[touched], **FLOAT64, msg=f"{name}, rank {rank}")


def test_active_rows_number_the_budget(run):
    """Unless the positives exceed it, each rank's active set has exactly ``budget`` rows:
    ⌊rate·C_r⌋ for a rate, the count (at most the shard) for an integer."""
    world_size, results = run
    for name, scenario in reference_scenarios(world_size).items():
        if name.startswith("positives_only"):
            continue
        for rank, result in enumerate(results):
            got = result["reference"][name]
            budget = expected_rows(scenario.spec["budget"], got["shard"][1])
            for micro in got["micro"]:
                assert not micro["positives_only"]
                assert micro["classes"].numel() == budget, f"{name}, rank {rank}"


# ----------------------------------------------------------------------------- 3. positives


def _positives(labels: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """The sorted distinct labels of a global batch that live in the shard ``(start, rows)``."""
    start, rows = shard
    return torch.unique(labels[(labels >= start) & (labels < start + rows)])


def test_every_positive_is_active(run):
    """Every label of the global batch that lives in a rank's shard is among its active rows."""
    world_size, results = run
    for name, scenario in reference_scenarios(world_size).items():
        for m, (_, labels) in enumerate(scenario.batches(world_size)):
            for rank, result in enumerate(results):
                got = result["reference"][name]
                positives = _positives(labels, got["shard"])
                assert torch.isin(positives, got["micro"][m]["classes"]).all(), f"{name}, rank {rank}"


def test_sampling_correction_weighs_the_random_rows_only(run):
    """With ``sampling_correction``, the rows a rank took for certain (positives, candidates)
    get no offset and every other active row ``log(free / drawn)``: drawn rows out of the free
    rows they were drawn from."""
    world_size, results = run
    drew = 0
    for name, scenario in reference_scenarios(world_size).items():
        if not scenario.spec.get("sampling_correction", True):
            continue
        for m, (_, labels) in enumerate(scenario.batches(world_size)):
            for rank, result in enumerate(results):
                got = result["reference"][name]
                offset, classes = got["micro"][m]["logit_offset"], got["micro"][m]["classes"]
                if offset is None:
                    continue
                drawn = offset != 0
                free = got["shard"][1] - int((~drawn).sum())
                expected = torch.full((int(drawn.sum()),), math.log(free / int(drawn.sum())))
                assert_close(offset[drawn].double(), expected.double(), msg=f"{name}, rank {rank}")
                assert not torch.isin(_positives(labels, got["shard"]), classes[drawn]).any(), f"{name}, rank {rank}"
                drew += 1
    assert drew > 0, "no rank drew random rows"


def test_positives_beyond_the_budget_are_the_active_set(run):
    """With more positives than the budget (2 rows), a rank's active set is exactly its
    positives, the selection says so, and ``positives_only_steps`` counts both micro-batches."""
    world_size, results = run
    scenario = reference_scenarios(world_size)["positives_only@store"]
    for m, (_, labels) in enumerate(scenario.batches(world_size)):
        for rank, result in enumerate(results):
            got = result["reference"]["positives_only@store"]
            positives = _positives(labels, got["shard"])
            assert positives.numel() > 2
            assert torch.equal(got["micro"][m]["classes"], positives), f"rank {rank}"
            assert got["micro"][m]["positives_only"]
            assert got["positives_only_steps"] == scenario.micro


# ----------------------------------------------------------------------------- hard negatives


def _first_new(sequence: torch.Tensor, taken: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` distinct entries of ``sequence`` that are not in ``taken``, in order."""
    chosen = []
    for value in sequence.tolist():
        if value not in chosen and value not in taken.tolist():
            chosen.append(value)
    return torch.tensor(chosen[:count], dtype=torch.int64)


def _candidates(name: str, scenario: Scenario, results: list, rank: int, embeddings, labels) -> torch.Tensor:
    """Global ids of a rank's hard negatives, nearest first: the neighbours of the batch's
    labels in the KNN graph (every label's first, then every label's second, ...), or each
    sample's nearest rows of the shard by cosine (float64 brute force)."""
    start, rows = results[rank]["reference"][name]["shard"]
    k = scenario.spec["k"]
    if scenario.spec["type"] == "knn":
        graph = torch.cat([result["reference"][name]["graph"] for result in results]).long()
        ranked = graph[labels].t().reshape(-1)
    else:
        weight = scenario.weight(len(results))[start : start + rows]
        centres = F.normalize(weight.float(), dim=1).double()
        nearest = (F.normalize(embeddings, dim=1) @ centres.t()).topk(min(k, rows), dim=1).indices
        ranked = nearest.t().reshape(-1) + start
    return ranked[(ranked >= start) & (ranked < start + rows)]


def test_hard_negatives_take_their_fraction_of_the_room_nearest_first(run):
    """knn and hf: after the positives, the hard negatives take ⌊hard_fraction · room⌋ rows
    (room: the budget less the positives), nearest first; uniform random rows fill the rest,
    and only they carry the sampling correction."""
    world_size, results = run
    for name, scenario in reference_scenarios(world_size).items():
        if scenario.spec["type"] not in ("knn", "hf"):
            continue
        fraction = Fraction(str(parse_selection(scenario.spec).hard_fraction))
        for m, (embeddings, labels) in enumerate(scenario.batches(world_size)):
            for rank, result in enumerate(results):
                got = result["reference"][name]
                active = got["micro"][m]
                positives = _positives(labels, got["shard"])
                room = expected_rows(scenario.spec["budget"], got["shard"][1]) - positives.numel()
                hard = _first_new(_candidates(name, scenario, results, rank, embeddings, labels), positives,
                                  math.floor(fraction * room))
                where = f"{name}, micro-batch {m}, rank {rank}"
                assert hard.numel() > 0, where
                assert torch.isin(hard, active["classes"]).all(), where
                if active["logit_offset"] is not None:
                    drawn = active["classes"][active["logit_offset"] != 0]
                    assert drawn.numel() == room - hard.numel(), where
                    assert not torch.isin(hard, drawn).any(), where


# ----------------------------------------------------------------------------- 4. sparse updates


STEP_COUNTERS = ("row_steps", "row_last_step", "applied_steps")
CLOCK_HISTORY = ("log_shrink",)


def _state_before(record_state: dict, reference: dict) -> dict:
    """The optimizer state before a step: the previous step's, or zeros before the first."""
    return record_state or {name: torch.zeros_like(value) for name, value in reference.items()}


def test_sparse_step_leaves_unselected_rows_and_state_bit_for_bit(run):
    """SGD (momentum, weight decay), Adam and AdamW, fp32 and bf16 storage, partial, knn and hf:
    over two steps, the rows outside the step's active set and their optimizer state (momentum,
    moments, row step counts) are exactly as before the step; every active row and its state
    changed; SGD counts the applied steps; the active rows number the budget."""
    world_size, results = _optimizer_run(run)
    for rank, result in enumerate(results):
        for (optimizer_name, storage, kind), got in result["sparse"].items():
            weight, state = got["initial"], {}
            for step, record in enumerate(got["steps"]):
                where = f"{optimizer_name}, {storage}, {kind}, rank {rank}, step {step + 1}"
                rows = record["grad_rows"]
                assert torch.equal(rows, record["active"]) and not record["positives_only"], where
                assert rows.numel() == expected_rows(SPARSE_BUDGET, got["shard"][1]), where
                untouched = torch.ones(weight.shape[0], dtype=torch.bool)
                untouched[rows] = False
                assert untouched.any(), where
                assert torch.equal(record["weight"][untouched], weight[untouched]), where
                assert (record["weight"][rows] != weight[rows]).any(dim=1).all(), where
                before = _state_before(state, record["state"])
                for name, value in record["state"].items():
                    if name in CLOCK_HISTORY:
                        assert value.dtype == torch.float64, where
                        continue
                    assert value.dtype == (torch.int64 if name in STEP_COUNTERS else weight.dtype), where
                    if name == "applied_steps":
                        assert value.item() == step + 1, where
                        continue
                    assert torch.equal(value[untouched], before[name][untouched]), f"{name}: {where}"
                    if storage == "bf16" and name == "exp_avg_sq" and step > 0:
                        continue  # beta2 = 0.999 moves it by less than bf16's resolution unless g is large
                    changed = value[rows] != before[name][rows]
                    assert (changed if changed.dim() == 1 else changed.any(dim=1)).all(), f"{name}: {where}"
                weight, state = record["weight"], record["state"]


# ----------------------------------------------------------------------------- 5. row-sparse Adam


def test_dense_adam_equals_torch_adam(run):
    """With ``full``, the head's Adam and AdamW (with weight decay) equal torch.optim.Adam and
    torch.optim.AdamW fed the same dense gradients, step after step."""
    world_size, results = _optimizer_run(run)
    for name, torch_class in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        for rank, result in enumerate(results):
            got = result["adam"]["dense", name]
            weight = got["initial"].clone().requires_grad_()
            optimizer = torch_class([weight], foreach=False, **OPTIMIZERS[name]["params"])
            for step, record in enumerate(got["steps"]):
                weight.grad = record["grad"]
                optimizer.step()
                assert_close(record["weight"], weight.detach(), **FLOAT64, msg=f"{name}, rank {rank}, step {step + 1}")


def lazy_adam(initial: torch.Tensor, steps: list[dict], params: dict, own_counts: bool = True) -> torch.Tensor:
    """Float64 Adam (L2 decay) that updates only each step's rows, bias-corrected by the steps
    each row was updated (``own_counts``) or by the global step."""
    lr, weight_decay = params["lr"], params["weight_decay"]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    weight = initial.double().clone()
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    counts = torch.zeros(weight.shape[0], 1, dtype=torch.float64)
    for step, record in enumerate(steps, start=1):
        rows = record["grad_rows"]
        grad = record["sparse_grad"].double() + weight_decay * weight[rows]
        exp_avg[rows] = beta1 * exp_avg[rows] + (1 - beta1) * grad
        exp_avg_sq[rows] = beta2 * exp_avg_sq[rows] + (1 - beta2) * grad * grad
        counts[rows] += 1
        n = counts[rows] if own_counts else torch.full_like(counts[rows], step)
        corrected_avg, corrected_sq = exp_avg[rows] / (1 - beta1**n), exp_avg_sq[rows] / (1 - beta2**n)
        weight[rows] -= lr * corrected_avg / (corrected_sq.sqrt() + eps)
    return weight


def test_sparse_adam_corrects_bias_by_each_rows_own_step_count(run):
    """Under a sparse selection, Adam's ``row_steps`` counts the steps each row was updated,
    and the weights equal a float64 lazy Adam whose bias correction uses those counts (not the
    global step, which would give other weights)."""
    world_size, results = _optimizer_run(run)
    params = OPTIMIZERS["adam"]["params"]
    for rank, result in enumerate(results):
        got = result["adam"]["lazy", "adam"]
        counts = torch.zeros(got["initial"].shape[0], dtype=torch.int64)
        for record in got["steps"]:
            counts[record["grad_rows"]] += 1
        assert ((counts > 0) & (counts < STEPS)).any()
        final = got["steps"][-1]
        assert torch.equal(final["state"]["row_steps"], counts)
        assert_close(final["weight"].double(), lazy_adam(got["initial"], got["steps"], params), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(final["weight"].double(), lazy_adam(got["initial"], got["steps"], params, False),
                                  rtol=1e-5, atol=1e-6)


def test_adam_row_step_counts_survive_a_checkpoint(tmp_path):
    """Saving and loading a bf16 head's Adam keeps each row's step count (int64, exact past
    256), so the resumed steps equal the uninterrupted ones."""
    weight = random_weight(5, 4, seed=3).float()
    embeddings, labels = random_batch(5, 4, 3, seed=3)
    embeddings = embeddings.float()

    def build():
        head = make_head(weight, selection("partial", 1.0), storage_dtype="bf16")
        return head, build_head_optimizer(head, OPTIMIZERS["adam"])

    def step(head, optimizer):
        optimizer.zero_grad()
        head(embeddings, labels).backward()
        optimizer.step()

    head, optimizer = build()
    for _ in range(257):
        step(head, optimizer)
    save_head(head, optimizer, tmp_path)
    resumed, resumed_optimizer = build()
    load_head(resumed, resumed_optimizer, tmp_path)
    row_steps = resumed_optimizer.state[resumed.weight]["row_steps"]
    assert row_steps.dtype == torch.int64 and row_steps.tolist() == [257] * 5, row_steps
    for _ in range(10):
        step(head, optimizer)
        step(resumed, resumed_optimizer)
    assert torch.equal(resumed.weight, head.weight)


def momentum_sgd(initial: torch.Tensor, steps: list[dict], params: dict, missed_steps: bool = True) -> torch.Tensor:
    """Float64 momentum SGD on each step's rows, each row read right after the last step that
    selected it. ``missed_steps``: on the other steps a row's buffer decays and weight decay
    shrinks the row at its settled rate, ``b ← m·b; w ← (1 - lr·wd/(1 - m))·w``; otherwise
    those steps leave it and its buffer alone."""
    lr, momentum, weight_decay = params["lr"], params["momentum"], params["weight_decay"]
    weight = initial.double().clone()
    buf = torch.zeros_like(weight)
    at_last_update = weight.clone()
    for record in steps:
        rows = record["grad_rows"]
        if missed_steps:
            missed = torch.ones(weight.shape[0], dtype=torch.bool)
            missed[rows] = False
            buf[missed] *= momentum
            weight[missed] *= 1 - lr * weight_decay / (1 - momentum)
        buf[rows] = momentum * buf[rows] + record["sparse_grad"].double() + weight_decay * weight[rows]
        weight[rows] -= lr * buf[rows]
        at_last_update[rows] = weight[rows]
    return at_last_update


def test_sparse_sgd_decays_the_momentum_and_weight_of_rows_that_missed_steps(tmp_path):
    """A row selected again after missing steps first gets its momentum's decay and the weight
    decay of those steps (at its settled rate), as the float64 replay applies them step by step;
    the clock's state survives a checkpoint."""
    params = OPTIMIZERS["sgd"]["params"]
    weight = random_weight(num_classes(1), WIDTH, seed=11).float()

    def build():
        head = make_head(weight, selection("partial", 0.25))
        return head, build_head_optimizer(head, OPTIMIZERS["sgd"])

    head, optimizer = build()
    first = train(head, optimizer, rank=0, seed=900, steps=4)
    save_head(head, optimizer, tmp_path)
    resumed, resumed_optimizer = build()
    load_head(resumed, resumed_optimizer, tmp_path)
    steps = first + train(resumed, resumed_optimizer, rank=0, seed=904, steps=4)
    state = resumed_optimizer.state[resumed.weight]
    assert state["applied_steps"].dtype == state["row_last_step"].dtype == torch.int64
    assert state["log_shrink"].dtype == torch.float64
    assert state["applied_steps"].item() == 8
    assert_close(resumed.weight.double(), momentum_sgd(weight, steps, params), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(resumed.weight.double(), momentum_sgd(weight, steps, params, missed_steps=False),
                              rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 6. reproducibility


def test_same_seed_reproduces_a_run_and_another_seed_selects_other_rows(run):
    """On 2 ranks, two runs of 5 steps with the same seed (a rebuild from step 3 swapped in at 4)
    give identical losses, active sets and weights; another seed selects other rows."""
    results = _two_rank_run(run)
    for kind in KINDS:
        for rank, result in enumerate(results):
            first, again, other = (result["reproducibility"][kind, name] for name in ("first", "again", "other_seed"))
            if kind != "partial":
                assert first["built_from_step"] == 3
            assert all(torch.equal(a, b) for a, b in zip(first["losses"], again["losses"], strict=True)), kind
            assert all(torch.equal(a, b) for a, b in zip(first["active"], again["active"], strict=True)), kind
            assert torch.equal(first["weight"], again["weight"]), kind
            assert not all(torch.equal(a, b) for a, b in zip(first["active"], other["active"])), f"{kind}, rank {rank}"


# ----------------------------------------------------------------------------- 7. bad input


def test_bad_selection_raises_config_error_naming_the_key_on_every_rank(run):
    """k above the other classes, a budget of 0, above 1 or above the largest shard, an
    unknown type or key: a ConfigError naming the key, on both ranks; the limits themselves
    are accepted."""
    results = _two_rank_run(run)
    for rank, result in enumerate(results):
        for (spec, key), error in zip(bad_selections(2), result["bad"], strict=True):
            assert error.startswith(f"{ConfigError.__name__}: {key}:"), (rank, spec, error)
        assert result["edge"] == ["ok"] * len(edge_selections(2)), rank
