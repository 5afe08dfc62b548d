"""Growing the head under the real ``deepspeed`` launcher, 2 CPU ranks: a run of 53 classes saves;
a run configured for 64 (with the training data of 64 classes and ``warm_start.imprint``) loads
that checkpoint. The saved rows come back where the new layout puts them (rows move between the
ranks), the 11 new rows are imprinted from the loaded backbone (float64 reference) and training
goes on."""

from __future__ import annotations

import pytest
import torch

from launcher import NUM_CLASSES, assert_close_relative, assert_succeeded, ds_config, launch_worker, records
from test_warm_start_e2e import reference_rows

pytestmark = pytest.mark.e2e

OLD = 53


def test_a_grown_checkpoint_keeps_the_saved_rows_and_imprints_the_new(tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    small = {"name": "small", "config": ds_config(0, num_classes=OLD), "steps": 3, "loader": True,
             "save_after": 3, "checkpoint": checkpoint}
    grown = {"name": "grown", "config": ds_config(0, warm_start={"imprint": True}), "steps": 2, "loader": True,
             "load": True, "checkpoint": checkpoint}
    result = launch_worker(tmp_path, [small, grown], timeout=180)   # one launch: the second run loads the first's
    assert_succeeded(result)
    assert f"head grown from {OLD} to {NUM_CLASSES} classes" in result.stdout
    saved = torch.cat([rec["heads"][-1] for rec in records(tmp_path, "small")])
    grown_recs = records(tmp_path, "grown")
    assert [rec["class_start"] for rec in grown_recs] == [0, NUM_CLASSES // 2]
    at_first_step = torch.cat([rec["head_at_first_forward"] for rec in grown_recs])
    assert torch.equal(at_first_step[:OLD], saved)
    expected = reference_rows(records(tmp_path, "small")[0]["backbone"])[OLD:]
    assert_close_relative(at_first_step[OLD:], expected, "imprinted new rows")
    assert all(torch.isfinite(torch.stack(rec["losses"])).all() for rec in grown_recs)
    assert not torch.equal(torch.cat([rec["heads"][-1] for rec in grown_recs]), at_first_step)
