"""The state parts of a checkpoint (:mod:`hybridfc.state`): a part a test registers is saved,
loaded and resharded with no change to the checkpoint code; growing the head on as many ranks
keeps each rank's grad_topk residual and random generators (an exact resume), on another number
of ranks the residual is the ranks' mean and the generators are not restored; re-saving a tag
never leaves ``latest`` naming a missing directory."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

import hybridfc.checkpoint
from distributed import run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.checkpoint import load_parts, publish, read_head, read_parts, save_head, staging_tag
from hybridfc.compression.error_feedback import TopKGradientReducer
from hybridfc.runtime.data import DataPosition
from hybridfc.state import SavedStates, StatePart

OLD, NEW, WIDTH, NUMEL = 37, 50, 6, 40
publish_module = importlib.import_module("hybridfc.checkpoint.publish")


class Tally:
    """A part of a test's own: one number per rank; on another number of ranks, their sum."""

    name = "tally"

    def __init__(self, value: float) -> None:
        self.value = torch.tensor(value)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]

    def merge(self, saved: SavedStates) -> Optional[dict[str, Any]]:
        return saved.own() or {"value": sum(state["value"] for state in saved)}


def make_parts(rank: int, classes: int):
    head = ClassParallelFC(classes, WIDTH, seed=3)
    reducer = TopKGradientReducer(NUMEL, 0.2, value_dtype=torch.float32)
    return head, build_head_optimizer(head, {"type": "sgd"}), reducer, Tally(10.0 + rank)


def _save_worker(rank: int, world_size: int, tag_dir: str) -> torch.Tensor:
    head, optimizer, reducer, tally = make_parts(rank, OLD)
    reducer.reduce([torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))])
    torch.manual_seed(100 + rank)
    position = DataPosition(None)
    position.mark()
    save_head(head, optimizer, tag_dir, [reducer, tally, *position.parts()])
    return reducer.residual.clone(), torch.rand(4)


def _load_worker(rank: int, world_size: int, tag_dir: str) -> dict:
    head, optimizer, reducer, tally = make_parts(rank, NEW)
    parts: list[StatePart] = [reducer, tally, *DataPosition(None).parts()]
    states = read_head(head, tag_dir)
    states.update(read_parts(tag_dir, parts, rank, world_size))
    torch.manual_seed(7)
    load_parts(parts, states)
    return {"residual": reducer.residual.clone(), "steps": reducer.steps, "tally": float(tally.value),
            "draw": torch.rand(4), "grown_from": states["head"]["grown_from"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list]:
    tag_dir = tmp_path_factory.mktemp("parts") / "tag"
    return tag_dir, run_distributed(_save_worker, 2, args=(str(tag_dir),))


def test_every_part_has_its_own_file(saved):
    tag_dir, _ = saved
    names = sorted(path.name for path in tag_dir.iterdir())
    assert names == sorted(f"hybridfc_{part}_rank{rank:05d}_of_00002.pt" for rank in range(2)
                           for part in ("head", "optimizer", "selection", "grad_topk", "tally", "rng"))


def test_growing_on_as_many_ranks_keeps_each_ranks_residual_and_random_generators(saved):
    tag_dir, before = saved
    for rank, loaded in enumerate(run_distributed(_load_worker, 2, args=(str(tag_dir),))):
        residual, draw = before[rank]
        assert loaded["grown_from"] == OLD
        assert torch.equal(loaded["residual"], residual) and loaded["steps"] == 1
        assert torch.equal(loaded["draw"], draw), f"rank {rank}'s random generators not restored"
        assert loaded["tally"] == 10.0 + rank


def test_on_another_number_of_ranks_a_registered_part_is_merged_by_its_own_rule(saved):
    tag_dir, before = saved
    mean = (before[0][0] + before[1][0]) / 2
    fresh = torch.Generator().manual_seed(7)
    expected_draw = torch.rand(4, generator=fresh)
    for loaded in run_distributed(_load_worker, 3, args=(str(tag_dir),)):
        assert torch.equal(loaded["residual"], mean)
        assert loaded["tally"] == 21.0
        assert torch.equal(loaded["draw"], expected_draw), "random generators restored on another number of ranks"


def stage(save_dir: Path, tag: str, content: str) -> None:
    staging = save_dir / staging_tag(tag)
    staging.mkdir(parents=True)
    (staging / "file").write_text(content)


@pytest.mark.parametrize("can_exchange", [True, False])
def test_re_saving_a_tag_replaces_it(tmp_path, monkeypatch, can_exchange):
    if not can_exchange:
        monkeypatch.setattr(publish_module, "exchange", lambda first, second: False)
    stage(tmp_path, "t", "old")
    publish(tmp_path, "t")
    stage(tmp_path, "t", "new")
    publish(tmp_path, "t")
    assert (tmp_path / "t" / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "t"]


def test_re_saving_a_tag_never_leaves_latest_naming_a_missing_directory(tmp_path, monkeypatch):
    """Every rename and removal of the re-save happens while ``latest``'s tag holds a checkpoint."""
    stage(tmp_path, "t", "old")
    publish(tmp_path, "t")
    stage(tmp_path, "t", "new")
    seen = []

    def watch(function):
        def watched(*args, **kwargs):
            seen.append((tmp_path / (tmp_path / "latest").read_text() / "file").is_file())
            return function(*args, **kwargs)
        return watched

    monkeypatch.setattr(publish_module.os, "replace", watch(os.replace))
    monkeypatch.setattr(publish_module.shutil, "rmtree", watch(publish_module.shutil.rmtree))
    monkeypatch.setattr(hybridfc.checkpoint, "SAVE_STAGE_HOOK", lambda reached: seen.append(
        (tmp_path / "t" / "file").read_text() == "new"))
    publish(tmp_path, "t")
    assert seen and all(seen), seen
