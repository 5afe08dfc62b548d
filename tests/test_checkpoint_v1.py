"""A head checkpoint saved before the state parts had files of their own (layout 1:
``tests/data/checkpoint_v1/make_fixtures.py``, by ``save_head`` of commit 2664307) loads with
today's code: on 2 ranks every rank gets back its rows, optimizer state, counters, selection
(a knn rebuild in flight) and run state (grad_topk residual, loader position, plateau rule, random
generators) bit for bit, and the next steps equal the saving run's to fp32 rounding (today's head
computes its logits in tiles and in base 2, and rounds differently from the code that saved); on
3 ranks the rows are cut by ownership."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.testing import assert_close

from distributed import run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.checkpoint import apply_head, load_parts, read_head, read_parts
from hybridfc.compression.error_feedback import TopKGradientReducer
from hybridfc.data import DistributedLoader, SyntheticClasses
from hybridfc.runtime.data import DataPosition
from hybridfc.schedule import PlateauLR
from hybridfc.state import SavedStates

FIXTURES = Path(__file__).resolve().parent / "data" / "checkpoint_v1"
CONTINUATION = dict(rtol=1e-5, atol=1e-6)
"""How close the steps after the load come to the saving run's: fp32 rounding, far below what a
state restored wrong (rows, Adam moments, step counts, the selection) would change."""
TAG_DIR = FIXTURES / "head"
CLASSES, WIDTH, BATCH, SAVE_AFTER, AFTER_SAVE = 37, 6, 5, 3, 3
SELECTION = {"type": "knn", "budget": 12, "k": 3, "rebuild_interval": 2, "rebuild_delay": 2, "late_rebuild": "wait"}
OPTIMIZER = {"type": "adam", "params": {"lr": 0.01, "weight_decay": 1e-4}}
MARGIN = {"type": "cosface", "scale": 8.0, "margin": 0.2}


def make_head():
    head = ClassParallelFC(CLASSES, WIDTH, margin=MARGIN, seed=3, selection=SELECTION)
    return head, build_head_optimizer(head, OPTIMIZER)


def head_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, WIDTH, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator)


def make_loader(rank: int, world_size: int) -> DistributedLoader:
    return DistributedLoader(SyntheticClasses(CLASSES, 2, 4, seed=1), 4, rank=rank, world_size=world_size, seed=5)


def _next_labels(rank: int, world_size: int, saved: Optional[dict]) -> torch.Tensor:
    """The labels of the batch after the saving run's third (``saved``: a position loaded first)."""
    loader = make_loader(rank, world_size)
    if saved is not None:
        loader.load_state_dict(saved)
        return next(iter(loader))[1]
    batches = iter(loader)
    return [next(batches) for _ in range(4)][-1][1]


class Plateau:
    """The plateau rule as a state part (the engine's is :class:`hybridfc.runtime.lr.LrMultiplier`)."""

    name = "plateau"

    def __init__(self) -> None:
        self.rule = PlateauLR("max", 0.5, 1, 0.0, 0.01)

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)

    def merge(self, saved: SavedStates) -> Optional[dict[str, Any]]:
        return saved.first()


def _load_worker(rank: int, world_size: int) -> dict:
    head, optimizer = make_head()
    apply_head(head, optimizer, read_head(head, TAG_DIR))
    loaded = {"weight": head.weight.detach().clone(), "optimizer": copy.deepcopy(optimizer.state_dict()), "steps": head.steps,
              "skipped_steps": optimizer.skipped_steps, "selection": head.selection.state_dict(),
              "class_start": head.class_start}
    loader = make_loader(rank, world_size)
    reducer, plateau = TopKGradientReducer(50, 0.1, value_dtype=torch.float32, momentum=0.9), Plateau()
    parts = [reducer, plateau, *DataPosition(loader).parts()]
    load_parts(parts, read_parts(TAG_DIR, parts, rank, world_size))
    loaded["run_state"] = {"torch_draw": torch.rand(3), "numpy_draw": np.random.rand(), "python_draw": random.random(),
                           "grad_topk": reducer.state_dict(), "plateau": plateau.state_dict(),
                           "loader": next(iter(loader))[1]}
    if world_size == 2:
        loaded["losses"], loaded["rows"] = [], []
        for step in range(SAVE_AFTER, SAVE_AFTER + AFTER_SAVE):
            loss = head(*head_batch(rank, step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loaded["losses"].append(loss.detach())
            loaded["rows"].append(head.weight.detach().clone())
    head.close()
    return loaded


def saved_file(rank: int) -> dict:
    """Rank ``rank``'s layout-1 shard file, as saved."""
    return torch.load(TAG_DIR / f"hybridfc_head_rank{rank:05d}_of_00002.pt", weights_only=True)


def draws(rng: dict[str, Any]) -> tuple[torch.Tensor, float, float]:
    """What the generators saved in ``rng`` draw first."""
    from hybridfc.checkpoint import set_rng_states

    set_rng_states(rng)
    return torch.rand(3), np.random.rand(), random.random()


def assert_equal(actual: Any, expected: Any, what: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), what
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), what
        for key in expected:
            assert_equal(actual[key], expected[key], f"{what}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_equal(a, e, f"{what}[{i}]")
    else:
        assert actual == expected, what


def test_a_layout_1_head_checkpoint_loads_on_as_many_ranks_and_resumes():
    expected = torch.load(FIXTURES / "head_expected.pt", weights_only=False)
    for rank, (saved, loaded) in enumerate(zip(expected, run_distributed(_load_worker, 2, timeout=240))):
        for key in ("weight", "steps", "skipped_steps", "selection"):
            assert_equal(loaded[key], saved[key], f"rank {rank}: {key}")
        for key in ("losses", "rows"):   # today's head rounds differently from the code that saved (tiles, base 2)
            assert_close(torch.stack(loaded[key]), torch.stack(saved[key]), **CONTINUATION, msg=f"rank {rank}: {key}")
        assert_equal(loaded["optimizer"], saved_file(rank)["optimizer"], f"rank {rank}: optimizer")
        assert saved["selection"]["pending"] is not None   # a rebuild was in flight at the save
        run = loaded["run_state"]
        for key in ("grad_topk", "plateau"):
            assert_equal(run[key], saved["run_state"][key], f"rank {rank}: {key}")
        assert torch.equal(run["loader"], _next_labels(rank, 2, None)), f"rank {rank}: loader"
        torch_draw, numpy_draw, python_draw = draws(saved["run_state"]["rng"])
        assert torch.equal(run["torch_draw"], torch_draw) and run["numpy_draw"] == numpy_draw
        assert run["python_draw"] == python_draw


def test_a_layout_1_head_checkpoint_reshards_onto_3_ranks():
    expected = torch.load(FIXTURES / "head_expected.pt", weights_only=False)
    loaded = run_distributed(_load_worker, 3, timeout=240)
    assert torch.equal(torch.cat([part["weight"] for part in loaded]), torch.cat([s["weight"] for s in expected]))
    for name in ("exp_avg", "exp_avg_sq", "row_steps"):
        whole = torch.cat([saved_file(rank)["optimizer"]["state"][0][name] for rank in range(2)])
        assert torch.equal(torch.cat([part["optimizer"]["state"][0][name] for part in loaded]), whole), name
    residuals = torch.stack([s["run_state"]["grad_topk"]["residual"] for s in expected])
    for part in loaded:
        assert torch.equal(part["run_state"]["grad_topk"]["residual"], residuals.mean(0))
        assert part["steps"] == SAVE_AFTER
    for rank, part in enumerate(loaded):
        assert torch.equal(part["run_state"]["loader"], _next_labels(rank, 3, expected[0]["run_state"]["loader"]))
