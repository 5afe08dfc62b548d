"""A head saved on N ranks loads on M (every pair in 1..4, C divisible by neither), every class row
and its optimizer state in place: momentum, Adam moments and per-row step counts, row clocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.checkpoint import apply_head, part_file, read_head, save_head, shard_file
from hybridfc.head.optimizer import ROW_STATE

CLASSES, WIDTH, STEPS = 37, 6, 3
WORLD_SIZES = (1, 2, 3, 4)
OPTIMIZERS = {"sgd": {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}},
              "adam": {"type": "adam", "params": {"lr": 0.01}},
              "adamw": {"type": "adamw", "params": {"lr": 0.01}}}
DTYPES = ("fp32", "bf16", "fp16")
VARIANTS = [(optimizer, dtype) for optimizer in OPTIMIZERS for dtype in DTYPES]


def make_head(optimizer: str, dtype: str):
    head = ClassParallelFC(CLASSES, WIDTH, margin={"type": "cosface", "scale": 8.0, "margin": 0.2}, seed=3,
                           selection={"type": "partial", "budget": 0.5}, storage_dtype=dtype)
    return head, build_head_optimizer(head, OPTIMIZERS[optimizer])


def _save_worker(rank: int, world_size: int, root: str) -> None:
    """A few row-sparse steps of each variant, then a save under ``root/<variant>``."""
    for optimizer_name, dtype in VARIANTS:
        head, optimizer = make_head(optimizer_name, dtype)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            head(torch.randn(5, WIDTH, generator=generator), torch.randint(0, CLASSES, (5,), generator=generator)).backward()
            optimizer.step()
            optimizer.zero_grad()
        save_head(head, optimizer, Path(root) / f"{optimizer_name}_{dtype}")


def _load_worker(rank: int, world_size: int, roots: dict[int, str]) -> dict:
    out = {}
    for saved_on, root in roots.items():
        for optimizer_name, dtype in VARIANTS:
            head, optimizer = make_head(optimizer_name, dtype)
            apply_head(head, optimizer, read_head(head, Path(root) / f"{optimizer_name}_{dtype}"))
            out[saved_on, optimizer_name, dtype] = {"weight": head.weight.detach().clone(), "steps": head.steps,
                                                    "state": optimizer.state_dict()["state"][0]}
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[int, str]:
    roots = {}
    for world_size in WORLD_SIZES:
        root = tmp_path_factory.mktemp(f"saved_on_{world_size}")
        run_distributed(_save_worker, world_size, args=(str(root),))
        roots[world_size] = str(root)
    return roots


def saved_head(root: str, saved_on: int, optimizer_name: str, dtype: str) -> dict:
    """The whole head as saved: rows and per-row state concatenated over the shards, the rest of
    the state from rank 0's file."""
    tag_dir = Path(root) / f"{optimizer_name}_{dtype}"
    files = [torch.load(shard_file(tag_dir, r, saved_on), weights_only=True) for r in range(saved_on)]
    optimizers = [torch.load(part_file(tag_dir, "optimizer", r, saved_on), weights_only=True)["state"]["state"][0]
                  for r in range(saved_on)]
    state = dict(optimizers[0])
    for name in state:
        if name in ROW_STATE:
            state[name] = torch.cat([optimizer[name] for optimizer in optimizers])
    return {"weight": torch.cat([f["weight"] for f in files]), "state": state, "steps": files[0]["steps"]}


@pytest.mark.parametrize("load_on", WORLD_SIZES, ids=lambda n: f"on{n}")
def test_a_head_saved_on_n_ranks_loads_on_m_with_its_optimizer_state(saved, load_on):
    results = run_distributed(_load_worker, load_on, args=(saved,), timeout=240)
    for saved_on in WORLD_SIZES:
        for optimizer_name, dtype in VARIANTS:
            what = f"saved on {saved_on}, loaded on {load_on}, {optimizer_name} {dtype}"
            expected = saved_head(saved[saved_on], saved_on, optimizer_name, dtype)
            loaded = [result[saved_on, optimizer_name, dtype] for result in results]
            assert torch.equal(torch.cat([part["weight"] for part in loaded]), expected["weight"]), what
            assert all(part["steps"] == expected["steps"] == STEPS for part in loaded), what
            for name, value in expected["state"].items():
                if name in ROW_STATE:
                    assert torch.equal(torch.cat([part["state"][name] for part in loaded]), value), (what, name)
                else:
                    assert all(torch.equal(part["state"][name], value) for part in loaded), (what, name)
            assert any(name in expected["state"] for name in ("row_last_step", "row_steps")), what
