"""A checkpoint's head shard that is truncated, corrupt, missing or of another head: an error on
every rank naming the file and the difference, never a silent re-initialisation."""

from __future__ import annotations

import pytest

from distributed import run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.checkpoint import read_head, save_head, shard_file
from hybridfc.parallel import run_on_every_rank

CLASSES, WIDTH = 37, 6


def _save_worker(rank: int, world_size: int, tag_dir: str) -> None:
    head = ClassParallelFC(CLASSES, WIDTH)
    save_head(head, build_head_optimizer(head, {"type": "sgd"}), tag_dir)


def _read_worker(rank: int, world_size: int, tag_dir: str, classes: int, storage_dtype: str,
                 width: int = WIDTH) -> str:
    head = ClassParallelFC(classes, width, storage_dtype=storage_dtype)
    try:
        run_on_every_rank(lambda: read_head(head, tag_dir), "reading the head's shard", None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "read"


@pytest.fixture()
def saved(tmp_path):
    run_distributed(_save_worker, 2, args=(str(tmp_path),))
    return tmp_path


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        path.write_bytes(data[:64] + bytes(b ^ 0xFF for b in data[64:200]) + data[200:])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "corrupt", "missing"])
def test_a_damaged_shard_is_an_error_on_every_rank_naming_the_file(saved, how):
    damage(shard_file(saved, 1, 2), how)
    outcomes = run_distributed(_read_worker, 2, args=(str(saved), CLASSES, "fp32"))
    if how == "missing":   # every rank sees that the set of shards is incomplete
        for outcome in outcomes:
            assert outcome.startswith("CheckpointError: ") and "missing ['hybridfc_head_rank00001_of_00002.pt']" in outcome
        return
    assert outcomes[0] == "RankError: hybridfc: reading the head's shard failed on rank(s) [1] (see the error there)"
    assert outcomes[1].startswith("CheckpointError: hybridfc: head shard ")
    assert "hybridfc_head_rank00001_of_00002.pt cannot be read, it is truncated or corrupt" in outcomes[1]


@pytest.mark.parametrize("classes, storage_dtype, width, difference", [
    (CLASSES - 2, "fp32", WIDTH, f"num_classes: saved {CLASSES}, this head {CLASSES - 2}"),
    (CLASSES, "bf16", WIDTH, "storage_dtype: saved float32, this head bfloat16"),
    (CLASSES, "fp32", WIDTH + 1, f"embedding_size: saved {WIDTH}, this head {WIDTH + 1}"),
])
def test_a_shard_of_another_head_is_an_error_naming_the_field(saved, classes, storage_dtype, width, difference):
    for outcome in run_distributed(_read_worker, 2, args=(str(saved), classes, storage_dtype, width)):
        assert outcome.startswith("CheckpointError: hybridfc: head shard ") and difference in outcome
        assert "does not match this head" in outcome


def test_an_intact_shard_reads(saved):
    assert run_distributed(_read_worker, 2, args=(str(saved), CLASSES, "fp32")) == ["read", "read"]
