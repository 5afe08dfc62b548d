"""Centres for serving: ``hybridfc export`` writes a checkpoint's head as one (C, d) matrix, and
``load_centres`` puts it into a head of any world size, exactly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from hybridfc import ClassParallelFC, build_head_optimizer
from hybridfc.checkpoint import CheckpointError, load_centres, save_head
from hybridfc.cli import main

CLASSES, WIDTH = 103, 12


def trained_rows() -> torch.Tensor:
    """Fresh rows standing for a trained head ``(C, d)``, the same in every process."""
    return torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(5))


def _save_worker(rank: int, world_size: int, tag_dir: str) -> None:
    head = ClassParallelFC(CLASSES, WIDTH, storage_dtype="fp32")
    with torch.no_grad():
        head.weight.copy_(trained_rows()[head.class_start: head.class_start + head.num_local])
    save_head(head, build_head_optimizer(head, {"type": "sgd"}), tag_dir)


def _load_worker(rank: int, world_size: int, path: str, storage_dtype: str) -> torch.Tensor:
    head = ClassParallelFC(CLASSES, WIDTH, storage_dtype=storage_dtype)
    load_centres(head, path)
    return head.weight.detach().clone()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A save directory whose ``latest`` tag holds a 3-rank head."""
    root = tmp_path_factory.mktemp("checkpoint")
    run_distributed(_save_worker, 3, args=(str(root / "global_step7"),))
    (root / "latest").write_text("global_step7")
    return root


def test_export_writes_the_rows_in_class_order(checkpoint, tmp_path, capsys):
    out = tmp_path / "centres.npy"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torch.equal(torch.from_numpy(np.load(out)), trained_rows())


def test_export_in_fp16_normalised(checkpoint, tmp_path):
    out = tmp_path / "centres16.npy"
    main(["export", str(checkpoint / "global_step7"), "--out", str(out), "--dtype", "fp16", "--normalize"])
    centres = np.load(out)
    assert centres.dtype == np.float16
    assert torch.equal(torch.from_numpy(centres), F.normalize(trained_rows(), dim=1).half())


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_export_then_load_centres_round_trips_on_any_world_size(checkpoint, tmp_path, world_size):
    out = tmp_path / "centres.npy"
    main(["export", str(checkpoint), "--out", str(out)])
    shards = run_distributed(_load_worker, world_size, args=(str(out), "fp32"))
    assert torch.equal(torch.cat(shards), trained_rows())


def test_load_centres_warns_of_nothing(checkpoint, tmp_path):
    """The rows are read from a memory-mapped file into a writable copy (torch warned of a
    read-only NumPy array before)."""
    out = tmp_path / "centres.npy"
    main(["export", str(checkpoint), "--out", str(out)])
    head = ClassParallelFC(CLASSES, WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_centres(head, out)
    assert torch.equal(head.weight.detach(), trained_rows())


def test_load_centres_casts_to_the_storage_dtype(checkpoint, tmp_path):
    out = tmp_path / "centres.npy"
    main(["export", str(checkpoint), "--out", str(out)])
    shards = run_distributed(_load_worker, 2, args=(str(out), "bf16"))
    assert torch.equal(torch.cat(shards), trained_rows().bfloat16())


def test_a_matrix_of_another_shape_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "wrong.npy"
    np.save(path, np.zeros((CLASSES, WIDTH + 1), dtype=np.float32))
    with pytest.raises(CheckpointError, match=rf"wrong\.npy holds a \({CLASSES}, {WIDTH + 1}\) matrix.*"
                                              rf"\({CLASSES}, {WIDTH}\)"):
        load_centres(ClassParallelFC(CLASSES, WIDTH), path)


def test_a_missing_shard_is_an_error_naming_it(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in (checkpoint / "global_step7").glob("*rank0000[02]_of_00003.pt"):
        (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(SystemExit):
        main(["export", str(broken), "--out", str(tmp_path / "x.npy")])
    assert "missing ['hybridfc_head_rank00001_of_00003.pt']" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
