"""``warm_start`` under the real ``deepspeed`` launcher, 2 CPU ranks: with ``imprint``, before
the first step every class row is the mean normalised embedding of its training samples under
the initial backbone; with ``refresh_interval``, again under the backbone of that step; against a
float64 single-process reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import worker
from hybridfc.data import SyntheticClasses
from launcher import NUM_CLASSES, assert_close_relative, assert_succeeded, ds_config, launch_worker, records

pytestmark = pytest.mark.e2e


def reference_rows(parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``(C, d)``: each class's mean normalised embedding over the loader's dataset, float64,
    under the initial backbone or one with ``parameters``."""
    data = SyntheticClasses(NUM_CLASSES, worker.LOADER_SAMPLES_PER_CLASS, worker.INPUT_DIM, seed=worker.DATA_SEED)
    x, y = data.batch(torch.arange(len(data)))
    backbone = worker.build_backbone()
    if parameters is not None:
        backbone.load_state_dict(parameters)
    with torch.no_grad():
        features = F.normalize(backbone.double()(x.double()), dim=1)
    sums = torch.zeros(NUM_CLASSES, features.shape[1], dtype=torch.float64).index_add_(0, y, features)
    return sums / torch.bincount(y, minlength=NUM_CLASSES).unsqueeze(1)


@pytest.fixture(scope="module")
def warm_starts(tmp_path_factory) -> Path:
    """One launch: imprinting at ZeRO 0 and 2, and a refresh after step 2."""
    directory = tmp_path_factory.mktemp("warm_start")
    runs = [{"name": f"imprint_z{stage}", "config": ds_config(stage, warm_start={"imprint": True}), "steps": 2,
             "loader": True} for stage in (0, 2)]
    runs.append({"name": "refresh", "config": ds_config(0, warm_start={"refresh_interval": 2}), "steps": 2,
                 "loader": True})
    assert_succeeded(launch_worker(directory, runs, timeout=180))
    return directory


@pytest.mark.parametrize("stage", [0, 2])
def test_imprinted_rows_are_the_class_means_of_the_normalised_embeddings(warm_starts, stage):
    recs = records(warm_starts, f"imprint_z{stage}")
    rows = torch.cat([rec["head_at_first_forward"] for rec in recs])
    assert_close_relative(rows, reference_rows(), "imprinted rows")
    assert not torch.equal(rows, torch.cat([rec["initial_head"] for rec in recs]))


def test_a_refresh_imprints_with_the_current_backbone(warm_starts):
    """``refresh_interval`` 2: after step 2 the rows are the class means under the backbone of that
    moment (recorded at the end of the run), not the initial one."""
    recs = records(warm_starts, "refresh")
    rows = torch.cat([rec["heads"][-1] for rec in recs])
    assert_close_relative(rows, reference_rows(recs[0]["backbone"]), "refreshed rows")
    assert not torch.allclose(rows.double(), reference_rows(), atol=1e-3)
    assert torch.equal(torch.cat([rec["head_at_first_forward"] for rec in recs]),
                       torch.cat([rec["initial_head"] for rec in recs]))
