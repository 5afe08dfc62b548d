"""Growing the head (continuous training): a checkpoint of C_old classes loaded into a head of
C_new > C_old classes, on the same or another number of ranks (C_old = 37, C_new = 50: divisible
by none of 2-4). Every saved row keeps its values and optimizer state wherever it now lives; the
new rows start as a fresh C_new head's, with empty state and a row clock at the saved step; the
steps after the growth equal a float64 single-process run that appended the same rows; a head
with fewer classes than its checkpoint is refused on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from distributed import RankFailed, run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.checkpoint import CheckpointError, apply_head, read_head, save_head
from hybridfc.head.class_parallel_fc import init_class_rows
from hybridfc.head.optimizer import ROW_STATE
from reference import random_batch, rank_rows, reference_grads

OLD, NEW, WIDTH, SEED = 37, 50, 6, 3
STEPS_BEFORE, STEPS_AFTER = 3, 2
MARGIN = {"type": "cosface", "scale": 8.0, "margin": 0.2}
SGD = {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}}
OPTIMIZERS = {"sgd_sparse": (SGD, {"type": "partial", "budget": 0.5}),
              "adam_sparse": ({"type": "adam", "params": {"lr": 0.01}}, {"type": "partial", "budget": 0.5}),
              "sgd_full": (SGD, None)}
SAVED_ON, LOADED_ON = (2, 3), (1, 2, 3, 4)
FLOAT64 = dict(rtol=1e-10, atol=1e-12)


def make_head(classes: int, optimizer: str):
    spec, selection = OPTIMIZERS[optimizer]
    head = ClassParallelFC(classes, WIDTH, margin=MARGIN, seed=SEED, selection=selection).double()
    return head, build_head_optimizer(head, spec)


def batch(classes: int, world_size: int, step: int):
    """The global batch of a step (fresh float64 embeddings, labels of every class) split evenly."""
    embeddings, labels = random_batch(classes, WIDTH, 4 * world_size, 1000 * classes + step)
    return embeddings, labels, (4,) * world_size


def train(head, optimizer, rank: int, world_size: int, classes: int, steps: range) -> None:
    for step in steps:
        embeddings, labels, sizes = batch(classes, world_size, step)
        rows = rank_rows(sizes, rank)
        head(embeddings[rows], labels[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()


def _save_worker(rank: int, world_size: int, root: str) -> None:
    for name in OPTIMIZERS:
        head, optimizer = make_head(OLD, name)
        train(head, optimizer, rank, world_size, OLD, range(STEPS_BEFORE))
        save_head(head, optimizer, Path(root) / name)


def _grow_worker(rank: int, world_size: int, roots: dict[int, str]) -> dict:
    out = {}
    for saved_on, root in roots.items():
        for name in OPTIMIZERS:
            head, optimizer = make_head(NEW, name)
            state = read_head(head, Path(root) / name)
            apply_head(head, optimizer, state)
            grown = {"weight": head.weight.detach().clone(), "state": {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()},
                     "grown_from": state["head"]["grown_from"], "steps": head.steps}
            train(head, optimizer, rank, world_size, NEW, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
            out[saved_on, name] = {**grown, "after": head.weight.detach().clone()}
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[int, str]:
    roots = {}
    for world_size in SAVED_ON:
        root = tmp_path_factory.mktemp(f"saved_on_{world_size}")
        run_distributed(_save_worker, world_size, args=(str(root),))
        roots[world_size] = str(root)
    return roots


@pytest.fixture(scope="module", params=LOADED_ON, ids=lambda n: f"on{n}")
def grown(request, saved) -> tuple[int, list[dict]]:
    return request.param, run_distributed(_grow_worker, request.param, args=(saved,), timeout=240)


def whole(results: list[dict], key: tuple, field: str, name: str | None = None) -> torch.Tensor:
    parts = [result[key][field] if name is None else result[key][field][name] for result in results]
    return torch.cat(parts)


def reference_run(saved_on: int, loaded_on: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.optim.SGD on the float64 full weight: the steps on C_old, the new rows appended (fresh
    initial values, zero momentum), the steps on C_new. Returns the weight and momentum at the
    growth and the weight after."""
    weight = init_class_rows(0, OLD, WIDTH, SEED, 0.01).double().requires_grad_()
    optimizer = torch.optim.SGD([weight], **SGD["params"])
    for step in range(STEPS_BEFORE):
        embeddings, labels, _ = batch(OLD, saved_on, step)
        weight.grad = reference_grads(embeddings, labels, weight, MARGIN)[2]
        optimizer.step()
    momentum = optimizer.state[weight]["momentum_buffer"]
    grown_weight = torch.cat([weight.detach(), init_class_rows(OLD, NEW - OLD, WIDTH, SEED, 0.01).double()])
    grown_momentum = torch.cat([momentum, torch.zeros(NEW - OLD, WIDTH, dtype=torch.float64)])
    weight = grown_weight.clone().requires_grad_()
    optimizer = torch.optim.SGD([weight], **SGD["params"])
    optimizer.state[weight]["momentum_buffer"] = grown_momentum.clone()
    for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
        embeddings, labels, _ = batch(NEW, loaded_on, step)
        weight.grad = reference_grads(embeddings, labels, weight, MARGIN)[2]
        optimizer.step()
    return grown_weight, grown_momentum, weight.detach()


@pytest.fixture(scope="module")
def saved_heads(saved) -> dict[tuple[int, str], dict]:
    """Each saved head whole, read back by one rank."""
    return run_distributed(_read_saved, 1, args=(saved,))[0]


def _read_saved(rank: int, world_size: int, roots: dict[int, str]) -> dict:
    out = {}
    for saved_on, root in roots.items():
        for name in OPTIMIZERS:
            head, optimizer = make_head(OLD, name)
            apply_head(head, optimizer, read_head(head, Path(root) / name))
            state = optimizer.state_dict()["state"][0]
            out[saved_on, name] = {"weight": head.weight.detach().clone(),
                                   "rows": {key: state[key] for key in ROW_STATE if key in state}}
    return out


def test_old_rows_keep_their_values_and_optimizer_state_new_rows_start_fresh(grown, saved_heads):
    loaded_on, results = grown
    for saved_on in SAVED_ON:
        for name in OPTIMIZERS:
            key, what = (saved_on, name), f"saved on {saved_on}, grown on {loaded_on}, {name}"
            weight = whole(results, key, "weight")
            saved_run = saved_heads[key]
            assert saved_run["rows"], what
            assert torch.equal(weight[:OLD], saved_run["weight"]), what
            assert torch.equal(weight[OLD:].float(), init_class_rows(OLD, NEW - OLD, WIDTH, SEED, 0.01)), what
            assert all(result[key]["grown_from"] == OLD for result in results), what
            assert all(result[key]["steps"] == STEPS_BEFORE for result in results), what
            for state_name, value in saved_run["rows"].items():
                grown_value = whole(results, key, "state", state_name)
                assert torch.equal(grown_value[:OLD], value), (what, state_name)
                fill = STEPS_BEFORE if state_name == "row_last_step" else 0
                assert torch.all(grown_value[OLD:] == fill), (what, state_name)


def test_training_after_growing_equals_a_float64_run_that_appended_the_rows(grown):
    loaded_on, results = grown
    for saved_on in SAVED_ON:
        key = (saved_on, "sgd_full")
        grown_weight, grown_momentum, after = reference_run(saved_on, loaded_on)
        assert_close(whole(results, key, "weight"), grown_weight, **FLOAT64)
        assert_close(whole(results, key, "state", "momentum_buffer"), grown_momentum, **FLOAT64)
        assert_close(whole(results, key, "after"), after, **FLOAT64)


def _shrink_worker(rank: int, world_size: int, root: str) -> None:
    head, optimizer = make_head(OLD - 5, "sgd_sparse")
    apply_head(head, optimizer, read_head(head, Path(root) / "sgd_sparse"))


def test_a_head_with_fewer_classes_than_its_checkpoint_is_refused(saved):
    results = run_distributed(_shrink_worker, 2, args=(saved[3],), allow_errors=True)
    assert all(isinstance(result, RankFailed) for result in results), results
    for result in results:
        assert CheckpointError.__name__ in str(result) and "never shrinks" in str(result), result
