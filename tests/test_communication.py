"""The communication layer: every collective against a single-process reference (sync and async,
1–4 ranks), its byte accounting against ``hybridfc plan``, errors raised on every rank, and the
rule that nothing outside ``hybridfc/parallel`` talks to ``torch.distributed``."""

from __future__ import annotations

import ast
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc import ClassParallelFC
from hybridfc.parallel import (RankError, StatsCursor, all_gather, all_gather_vector, all_reduce, barrier,
                               exchange_or_raise, gather_padded, reduce_scatter_padded, ring_shift, run_on_every_rank,
                               sparse_sum, wire)
from hybridfc.parallel.accounting import Ledger
from hybridfc.plan import PlanInputs, make_plan

TIMEOUT = 120.0
WIDTH = 3
PACKAGE = Path(__file__).resolve().parents[1] / "hybridfc"


def tensor_of(rank: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Rank ``rank``'s fresh float64 input, reproducible in any process."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * seed + rank), dtype=torch.float64)


def uneven_sizes(world_size: int) -> list[int]:
    """Row counts with an empty rank when there are several, never all equal."""
    return [3, 0, 5, 2][:world_size] if world_size > 1 else [4]


def _collectives(rank: int, world_size: int, async_op: bool) -> dict:
    """Each collective once, with results waited on only after all are launched when async."""
    sizes = uneven_sizes(world_size)
    total = sum(sizes)
    launched = {
        "sum": all_reduce(tensor_of(rank, (4, WIDTH), 1), "sum", async_op=async_op),
        "max": all_reduce(tensor_of(rank, (4, WIDTH), 2), "max", async_op=async_op),
        "min": all_reduce(tensor_of(rank, (4, WIDTH), 3), "min", async_op=async_op),
        "gather": all_gather(tensor_of(rank, (2, WIDTH), 4), async_op=async_op),
        "padded": gather_padded(tensor_of(rank, (sizes[rank], WIDTH), 5), sizes, async_op=async_op),
        "scatter": reduce_scatter_padded(tensor_of(rank, (total, WIDTH), 6), sizes, async_op=async_op),
        "even_scatter": reduce_scatter_padded(tensor_of(rank, (2 * world_size, WIDTH), 7), [2] * world_size,
                                              async_op=async_op),
    }
    out = {name: value.wait() if async_op else value for name, value in launched.items()}
    out["vector"] = all_gather_vector(torch.tensor([rank, 7 * rank - 1]))
    out["ring"] = ring_shift([tensor_of(rank, (2, WIDTH), 8), torch.arange(rank, rank + 3)])
    barrier()
    return out


def _collectives_worker(rank: int, world_size: int) -> dict:
    return {mode: _collectives(rank, world_size, mode == "async") for mode in ("sync", "async")}


@pytest.fixture(scope="module", params=(1, 2, 3, 4), ids=lambda n: f"world{n}")
def collectives_run(request):
    return request.param, run_distributed(_collectives_worker, request.param, timeout=TIMEOUT)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_collective_equals_its_single_process_reference(collectives_run, mode):
    world_size, results = collectives_run
    ranks = range(world_size)
    sizes = uneven_sizes(world_size)
    starts = [sum(sizes[:r]) for r in ranks]
    scatter_sum = sum(tensor_of(q, (sum(sizes), WIDTH), 6) for q in ranks)
    even_sum = sum(tensor_of(q, (2 * world_size, WIDTH), 7) for q in ranks)
    for rank, result in enumerate(r[mode] for r in results):
        assert_close(result["sum"], sum(tensor_of(q, (4, WIDTH), 1) for q in ranks), rtol=1e-14, atol=1e-14)
        assert torch.equal(result["max"], torch.stack([tensor_of(q, (4, WIDTH), 2) for q in ranks]).amax(0))
        assert torch.equal(result["min"], torch.stack([tensor_of(q, (4, WIDTH), 3) for q in ranks]).amin(0))
        assert torch.equal(result["gather"], torch.cat([tensor_of(q, (2, WIDTH), 4) for q in ranks]))
        assert torch.equal(result["padded"], torch.cat([tensor_of(q, (sizes[q], WIDTH), 5) for q in ranks]))
        assert_close(result["scatter"], scatter_sum[starts[rank]: starts[rank] + sizes[rank]], rtol=1e-14, atol=1e-14)
        assert_close(result["even_scatter"], even_sum[2 * rank: 2 * rank + 2], rtol=1e-14, atol=1e-14)
        assert torch.equal(result["vector"], torch.tensor([[q, 7 * q - 1] for q in ranks]))
        left = (rank - 1) % world_size
        assert torch.equal(result["ring"][0], tensor_of(left, (2, WIDTH), 8))
        assert torch.equal(result["ring"][1], torch.arange(left, left + 3))


def test_sync_and_async_results_are_bitwise_equal(collectives_run):
    _, results = collectives_run
    for result in results:
        for name, value in result["sync"].items():
            if isinstance(value, list):
                assert all(torch.equal(a, b) for a, b in zip(value, result["async"][name]))
            else:
                assert torch.equal(value, result["async"][name]), name


def _gather_warnings_worker(rank: int, world_size: int) -> list[str]:
    """The warnings one all-gather of each kind raises (torch 2.13 deprecates all_gather_into_tensor)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        all_gather(torch.ones(3))
        all_gather(torch.ones(3), async_op=True).wait()
        sparse_sum(torch.tensor([rank], dtype=torch.int32), torch.ones(1), 4)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_the_gathers_print_no_deprecation_warning():
    assert run_distributed(_gather_warnings_worker, 2) == [[], []]


def _accounting_worker(rank: int, world_size: int) -> dict:
    """The ledger's record of known collectives, and a wait that has to block."""
    cursor = StatsCursor()
    sizes = [4, 2, 3, 1][:world_size]
    all_reduce(torch.ones(1000), "sum")
    gather_padded(torch.ones(sizes[rank], 8), sizes)
    reduce_scatter_padded(torch.ones(sum(sizes), 8), sizes)
    ring_shift([torch.ones(10, dtype=torch.float64)])
    counted = cursor.take()
    late = torch.ones(4)
    if rank == 0:
        time.sleep(0.3)
    entered = time.time()
    pending = all_reduce(late, "sum", async_op=True)
    pending.wait()
    entered_by_rank = all_gather_vector(torch.tensor([entered], dtype=torch.float64))[:, 0]
    return {"counted": counted.to_dict(), "blocked": cursor.take()["all_reduce"].exposed_seconds,
            "held_up": float(entered_by_rank.max() - entered), "empty": cursor.take().to_dict()}


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ledger_counts_calls_and_the_bytes_each_backend_moves(world_size):
    results = run_distributed(_accounting_worker, world_size, timeout=TIMEOUT)
    padded = 4 * 8 * 4
    for rank, result in enumerate(results):
        counted = result["counted"]
        assert (counted["all_reduce"]["calls"], counted["all_reduce"]["bytes_sent"]) == \
            (1, wire.all_reduce_bytes(4000, world_size))
        assert counted["all_gather"]["bytes_sent"] == (world_size - 1) * padded
        assert counted["all_to_all"]["bytes_sent"] == (world_size - 1) * padded
        assert counted["send"]["bytes_sent"] == 80
        assert "reduce_scatter" not in counted, "gloo's reduce-scatter sends twice what an all-to-all does"
        assert result["empty"] == {}
        # the all-reduce cannot end before its last rank joined: a rank's exposed time covers that wait
        # (less the few calls between its clock reading and the collective)
        assert result["blocked"] >= result["held_up"] - 0.05, "a rank waiting for a late peer is blocked in wait()"


def test_the_ledger_adds_up_records_from_several_threads():
    ledger = Ledger()
    workers = [threading.Thread(target=lambda: [ledger.record("all_gather", 1, 100, 0.5) for _ in range(200)])
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    traffic = ledger.totals()["all_gather"]
    assert (traffic.calls, traffic.bytes_sent, traffic.exposed_seconds) == (800, 80_000, 400.0)


SELECTIONS = {"full": {"type": "full"},
              "knn": {"type": "knn", "budget": 0.5, "k": 4, "rebuild_interval": 0, "index": "exact"}}


def _head_step_worker(rank: int, world_size: int, local_batch: int, d: int, classes: int, selection: str) -> dict:
    """The second step's traffic (the first builds the knn graph)."""
    head = ClassParallelFC(classes, d, margin={"type": "softmax"}, seed=3, selection=SELECTIONS[selection])
    for step in range(2):
        embeddings = tensor_of(rank, (local_batch, d), 9 + step).float().requires_grad_()
        labels = torch.randint(0, classes, (local_batch,), generator=torch.Generator().manual_seed(rank + step))
        head.communication_stats()
        head(embeddings, labels).backward()
    return head.communication_stats().to_dict()


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_head_step_sends_what_hybridfc_plan_says(world_size, selection):
    """All-gathers = features + labels + verdicts, all-reduces = softmax (+ knn's lookup),
    all-to-all = feature gradients, each equal to the planner's term (gloo, even batches)."""
    local_batch, d, classes = 6, 16, 101
    stats = run_distributed(_head_step_worker, world_size, args=(local_batch, d, classes, selection), timeout=TIMEOUT)
    budget = SELECTIONS[selection].get("budget")
    inputs = PlanInputs(classes, d, world_size, local_batch, selection=selection, budget=budget, k=4)
    plan = make_plan(inputs).method("selection").communication
    for counted in stats:
        assert counted["all_gather"]["bytes_sent"] == plan.feature_all_gather + plan.label_all_gather
        assert counted["all_gather"]["calls"] == 3
        assert counted["all_reduce"]["bytes_sent"] == plan.softmax + plan.selection_lookup
        assert counted["all_to_all"]["bytes_sent"] == plan.feature_gradient
        assert sum(kind["bytes_sent"] for kind in counted.values()) == plan.total
    assert (plan.selection_lookup > 0) == (selection == "knn")


def test_one_process_sends_nothing():
    cursor = StatsCursor()
    x = torch.randn(3, 2)
    assert all_reduce(x.clone(), "sum", async_op=True).wait().equal(x)
    assert gather_padded(x, [3]).equal(x) and reduce_scatter_padded(x, [3]).equal(x)
    barrier()
    assert cursor.take().to_dict() == {}


def _failing_worker(rank: int, world_size: int, bad_rank: int) -> str:
    def check() -> None:
        if rank == bad_rank:
            raise FileNotFoundError(f"shard of rank {rank} is missing")

    try:
        run_on_every_rank(check, "loading the shards")
    except RankError as exc:
        return f"RankError: {exc}"
    except FileNotFoundError as exc:
        return f"FileNotFoundError: {exc}"
    return "no error"


@pytest.mark.parametrize("world_size,bad_rank", [(2, 1), (3, 0), (4, 2)])
def test_a_failure_on_one_rank_raises_on_every_rank(world_size, bad_rank):
    outcomes = run_distributed(_failing_worker, world_size, args=(bad_rank,), timeout=TIMEOUT)
    for rank, outcome in enumerate(outcomes):
        if rank == bad_rank:
            assert outcome == f"FileNotFoundError: shard of rank {rank} is missing"
        else:
            assert outcome == f"RankError: hybridfc: loading the shards failed on rank(s) [{bad_rank}] (see the error there)"


def _exchange_worker(rank: int, world_size: int) -> list:
    return exchange_or_raise((rank, 10 + rank), None, "exchanging")


def test_exchange_returns_every_ranks_values_when_none_failed():
    for table in run_distributed(_exchange_worker, 3, timeout=TIMEOUT):
        assert table == [[0, 10], [1, 11], [2, 12]]


def _distributed_uses(path: Path) -> list[str]:
    """Lines of ``path`` that import ``torch.distributed`` or reach it as an attribute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed"
                                                                                 for a in node.names):
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_only_the_parallel_package_talks_to_torch_distributed():
    parallel = PACKAGE / "parallel"
    outside = [use for path in sorted(PACKAGE.rglob("*.py")) if parallel not in path.parents
               for use in _distributed_uses(path)]
    assert outside == []
    assert _distributed_uses(parallel / "collectives.py"), "the check must see the layer's own import"


def test_a_pending_result_is_computed_once():
    pending = all_reduce(torch.ones(2), "sum", async_op=True)
    assert pending.wait() is pending.wait()
