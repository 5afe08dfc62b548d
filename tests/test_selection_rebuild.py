"""Background rebuilds of the KNN graph (knn) and the shard index (hf), on 2 ranks.

One ``run_distributed`` call runs every scenario: a rebuild every ``INTERVAL`` steps, swapped in
``DELAY`` steps after its snapshot, against a fresh build on the same snapshot; a builder held
back on purpose while training goes on; a checkpoint taken while a rebuild is in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from hybridfc import build_head_optimizer
from hybridfc.checkpoint import load_head, save_head
from hybridfc.selection.graph import build_knn_graph
from hybridfc.selection.index import ShardIndex
from hybridfc.selection.rebuild import BackgroundRebuild, snapshot
from reference import random_weight
from test_selection import forward_backward, make_head, num_classes, step_batch

WORLD_SIZE = 2
WIDTH = 8
K = 4
INTERVAL, DELAY = 3, 2
STEPS = 8
TIMEOUT = 120.0
RELEASE_TIMEOUT = 30.0  # a held-back rebuild gives up (and fails its swap) after this long
KINDS = ("knn", "hf")
SGD = {"type": "sgd", "params": {"lr": 2.0, "momentum": 0.9, "weight_decay": 0.0}}


def spec(kind: str, delay: int = DELAY, late: str = "wait") -> dict:
    """Swaps wait for late builds unless ``late`` says otherwise: the timelines compare steps."""
    return {"type": kind, "budget": 0.4, "k": K, "rebuild_interval": INTERVAL, "rebuild_delay": delay,
            "late_rebuild": late, "index": "exact"}


def rebuilt(head):
    """The head's :class:`~hybridfc.selection.rebuild.BackgroundRebuild` (graph or index)."""
    return head.selection.graph if hasattr(head.selection, "graph") else head.selection.index


def in_use(head) -> torch.Tensor:
    """What the selection looks classes up in: the graph (knn) or the indexed centres (hf)."""
    current = rebuilt(head).current
    return current if torch.is_tensor(current) else current.centres


def queries() -> torch.Tensor:
    return F.normalize(torch.randn(20, WIDTH, generator=torch.Generator().manual_seed(5)), dim=1)


def fresh_build(kind: str, rows: torch.Tensor, head) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """A new exact graph (collective over the ranks), or a new index's answers to :func:`queries`."""
    if kind == "knn":
        return build_knn_graph(rows, head.class_start, head.num_classes, K, kind="exact")
    return ShardIndex(rows, "exact").search(queries(), K)


def new_head(kind: str, weight_seed: int, delay: int = DELAY, late: str = "wait"):
    head = make_head(random_weight(num_classes(WORLD_SIZE), WIDTH, weight_seed).float(), spec(kind, delay, late))
    return head, build_head_optimizer(head, SGD)


def forward_backward_step(head, optimizer, rank: int, step: int) -> torch.Tensor:
    """Step ``step``'s forward and backward on its fresh batch (after ``zero_grad``); the loss."""
    optimizer.zero_grad()
    return forward_backward(head, *step_batch(WORLD_SIZE, 50 + step), rank)[0]


def train_step(head, optimizer, rank: int, step: int) -> torch.Tensor:
    loss = forward_backward_step(head, optimizer, rank, step)
    optimizer.step()
    return loss


# ----------------------------------------------------------------------------- in the ranks


def _timeline(kind: str, rank: int) -> dict:
    """``STEPS`` steps; what each forward looked classes up in, the snapshots, and fresh builds
    on each snapshot at its swap step."""
    head, optimizer = new_head(kind, weight_seed=1)
    used, built_from, snapshots, fresh, swapped = [], [], {}, {}, {}
    for step in range(1, STEPS + 1):
        forward_backward_step(head, optimizer, rank, step)
        used.append(in_use(head))
        built_from.append(rebuilt(head).built_from_step)
        optimizer.step()
        if step % INTERVAL == 0:
            rows, taken = rebuilt(head).pending_snapshot()
            snapshots[step] = {"pending": rows, "taken": taken, "weight": snapshot(head.weight)}
        if step - DELAY in snapshots:
            current = rebuilt(head).current
            swapped[step - DELAY] = current if kind == "knn" else current.search(queries(), K)
            fresh[step - DELAY] = fresh_build(kind, snapshots[step - DELAY]["pending"], head)
    return {"used": used, "built_from": built_from, "snapshots": snapshots, "fresh": fresh, "swapped": swapped}


def _slow_rebuild(rank: int) -> dict:
    """hf with delay 3 and late rebuilds postponed; the rebuild from step INTERVAL is held back
    until after step INTERVAL + 1 on rank 0 and until after the swap step INTERVAL + 3 on rank 1."""
    delay = 3
    swap = INTERVAL + delay
    head, optimizer = new_head("hf", weight_seed=2, delay=delay, late="postpone")
    train_step(head, optimizer, rank, 1)
    index, release = head.selection.index, threading.Event()
    build = index.builder

    def held_back(rows):
        if not release.wait(RELEASE_TIMEOUT):
            raise TimeoutError("the test never released the rebuild")
        return build(rows)

    index.builder = held_back
    alive, built_from, seconds = {}, {}, {}
    for step in range(2, swap + 2):
        if step - 1 == (INTERVAL + 1 if rank == 0 else swap):
            release.set()
            index._pending.join()
        start = time.perf_counter()
        train_step(head, optimizer, rank, step)
        seconds[step] = time.perf_counter() - start
        alive[step] = index._pending is not None and index._pending.is_alive()
        built_from[step] = index.built_from_step
    return {"alive": alive, "built_from": built_from, "seconds": seconds, "late_steps": index.late_steps,
            "swap": swap}


def _checkpoint_resume(kind: str, rank: int, tag_dir: Path) -> dict:
    """Save after step INTERVAL + 1 (a rebuild in flight), go on; then a head loaded from the save."""
    head, optimizer = new_head(kind, weight_seed=3)
    for step in range(1, INTERVAL + 2):
        train_step(head, optimizer, rank, step)
    save_head(head, optimizer, tag_dir)
    saved = {"in_use": in_use(head), "built_from": rebuilt(head).built_from_step,
             "pending": rebuilt(head).pending_snapshot()}
    losses = [train_step(head, optimizer, rank, step) for step in range(INTERVAL + 2, STEPS + 1)]
    resumed, resumed_optimizer = new_head(kind, weight_seed=4)
    load_head(resumed, resumed_optimizer, tag_dir)
    restored = {"in_use": in_use(resumed), "built_from": rebuilt(resumed).built_from_step,
                "pending": rebuilt(resumed).pending_snapshot()}
    resumed_losses = [train_step(resumed, resumed_optimizer, rank, step) for step in range(INTERVAL + 2, STEPS + 1)]
    return {"saved": saved, "restored": restored, "losses": losses, "resumed_losses": resumed_losses,
            "final": (head.weight.detach(), in_use(head)), "resumed_final": (resumed.weight.detach(), in_use(resumed))}


def _rebuild_worker(rank: int, world_size: int, tag_dir: str) -> dict:
    return {"timeline": {kind: _timeline(kind, rank) for kind in KINDS},
            "slow": _slow_rebuild(rank),
            "checkpoint": {kind: _checkpoint_resume(kind, rank, Path(tag_dir) / kind) for kind in KINDS}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """What each of the 2 ranks returned."""
    tag_dir = tmp_path_factory.mktemp("checkpoint")
    return run_distributed(_rebuild_worker, WORLD_SIZE, args=(str(tag_dir),), timeout=TIMEOUT)


# ----------------------------------------------------------------------------- 8. swap = fresh build on the snapshot


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_is_the_weight_after_each_interval_step(results, kind):
    """After steps 3 and 6 the build in flight holds the normalised fp32 rows of that moment."""
    for rank, result in enumerate(results):
        for step, taken in result["timeline"][kind]["snapshots"].items():
            assert taken["taken"] == step, rank
            assert torch.equal(taken["pending"], taken["weight"]), f"rank {rank}, step {step}"


@pytest.mark.parametrize("kind", KINDS)
def test_old_structure_serves_until_the_swap_step(results, kind):
    """Steps 1-5 look classes up in the first build, steps 6-8 in the rebuild from the step-3
    snapshot, swapped in after step 3 + 2 on every rank; the rebuild differs from the first."""
    for rank, result in enumerate(results):
        got = result["timeline"][kind]
        swap = INTERVAL + DELAY
        assert got["built_from"] == [0] * swap + [INTERVAL] * (STEPS - swap), rank
        assert all(torch.equal(used, got["used"][0]) for used in got["used"][:swap]), rank
        assert all(torch.equal(used, got["used"][swap]) for used in got["used"][swap:]), rank
        assert not torch.equal(got["used"][swap], got["used"][0]), rank
        if kind == "hf":
            assert torch.equal(got["used"][swap], got["snapshots"][INTERVAL]["pending"]), rank


def test_swapped_graph_equals_a_fresh_build_on_the_snapshot(results):
    """Each swapped-in KNN graph (int32) equals ``build_knn_graph`` (exact) run on the ranks
    on the same snapshot, and it is the graph the following steps used."""
    for rank, result in enumerate(results):
        got = result["timeline"]["knn"]
        assert set(got["swapped"]) == {INTERVAL, 2 * INTERVAL}
        for taken, graph in got["swapped"].items():
            assert graph.dtype == torch.int32
            assert torch.equal(graph.long(), got["fresh"][taken]), f"rank {rank}, snapshot of step {taken}"
        assert torch.equal(got["used"][INTERVAL + DELAY], got["swapped"][INTERVAL])


def test_swapped_index_answers_like_a_fresh_index_on_the_snapshot(results):
    """Each swapped-in hf index returns exactly the scores and rows of a new ``ShardIndex``
    built on the same snapshot."""
    for rank, result in enumerate(results):
        got = result["timeline"]["hf"]
        assert set(got["swapped"]) == {INTERVAL, 2 * INTERVAL}
        for taken, (scores, rows) in got["swapped"].items():
            fresh_scores, fresh_rows = got["fresh"][taken]
            assert torch.equal(rows, fresh_rows) and torch.equal(scores, fresh_scores), f"rank {rank}, step {taken}"


# ----------------------------------------------------------------------------- 9. training goes on during a rebuild


def test_training_continues_while_a_slow_rebuild_runs(results):
    """A rebuild still running on rank 1 at its swap step: no step waits for it (each takes well
    under the 30 s the build is held back), both ranks keep the old index, and both swap the
    new one in at the first step after which it is done on every rank, one step late."""
    for rank, result in enumerate(results):
        got, swap = result["slow"], result["slow"]["swap"]
        assert max(got["seconds"].values()) < RELEASE_TIMEOUT / 4, (rank, got["seconds"])
        assert got["alive"][swap] == (rank == 1), rank
        assert all(got["alive"][step] for step in range(INTERVAL, INTERVAL + 2)), rank
        assert got["built_from"] == {step: INTERVAL if step > swap else 0 for step in range(2, swap + 2)}, rank
        assert got["late_steps"] == [1], rank


def _held_back_rebuild(late: str, release: threading.Event) -> BackgroundRebuild:
    """A rebuild every 4 steps, swapped in 2 steps later, whose background builds wait for ``release``."""
    def slow_build(rows: torch.Tensor) -> torch.Tensor:
        if threading.current_thread() is not threading.main_thread():  # the background rebuild
            release.wait(RELEASE_TIMEOUT)
        return rows.clone()

    rebuild = BackgroundRebuild(slow_build, interval=4, delay=2, name="test graph", late=late)
    rebuild.ensure_built(torch.ones(3, 2), step=0)
    return rebuild


def test_a_swap_that_waits_names_the_delay_that_would_hide_the_build(caplog):
    """late="wait": a build that outlasts its delay makes the swap step wait; the warning names
    a longer rebuild_delay (in steps, from the measured step time) and the current one."""
    release = threading.Event()
    rebuild = _held_back_rebuild("wait", release)
    threading.Timer(0.3, release.set).start()
    with caplog.at_level(logging.INFO, logger="hybridfc"):
        for step in range(1, 7):
            rebuild.step_end(step, torch.ones(3, 2))
    assert len(rebuild.waits) == 1 and rebuild.waits[0] > 0.05 and rebuild.late_steps == [0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuild_delay of about" in warnings[0] and "(now 2)" in warnings[0], warnings


def test_a_late_build_is_postponed_and_no_new_snapshot_is_taken_meanwhile(caplog):
    """late="postpone": the swap step of a build still running returns at once; the build is
    swapped in at the first step it is done, and the snapshot step that comes while it runs
    takes no new snapshot (warned)."""
    release = threading.Event()
    rebuild = _held_back_rebuild("postpone", release)
    with caplog.at_level(logging.INFO, logger="hybridfc"):
        for step in range(1, 9):
            start = time.perf_counter()
            rebuild.step_end(step, torch.full((3, 2), float(step)))
            assert time.perf_counter() - start < 1.0, step
        assert rebuild.built_from_step == 0 and rebuild.pending_snapshot()[1] == 4
        release.set()
        rebuild.wait()
        rebuild.step_end(9, torch.ones(3, 2))
    assert rebuild.built_from_step == 4 and rebuild.late_steps == [3] and rebuild.waits[0] < 0.05
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no new snapshot" in w and "step 8" in w for w in warnings), warnings
    assert any("3 steps late" in w and "rebuild_delay of about" in w for w in warnings), warnings


# ----------------------------------------------------------------------------- 10. checkpoint mid-rebuild


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_mid_rebuild_restores_and_resumes_identically(results, kind):
    """A head loaded from a save taken while a rebuild was in flight has the structure in use,
    its step and the snapshot in flight; its next steps give the same losses, weights and
    rebuilt structure as the uninterrupted run."""
    for rank, result in enumerate(results):
        got = result["checkpoint"][kind]
        saved, restored = got["saved"], got["restored"]
        assert saved["pending"] is not None and saved["pending"][1] == INTERVAL, rank
        assert restored["built_from"] == saved["built_from"] == 0, rank
        assert torch.equal(restored["in_use"], saved["in_use"]), rank
        assert restored["pending"][1] == saved["pending"][1], rank
        assert torch.equal(restored["pending"][0], saved["pending"][0]), rank
        assert all(torch.equal(a, b) for a, b in zip(got["resumed_losses"], got["losses"], strict=True)), rank
        assert all(torch.equal(a, b) for a, b in zip(got["resumed_final"], got["final"], strict=True)), rank
