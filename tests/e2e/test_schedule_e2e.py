"""``schedule.plateau`` under the real ``deepspeed`` launcher, 2 CPU ranks: the lr multiplier of
backbone and head drops after ``patience`` evaluations without improvement and not before, the
backbone really steps with it (float64 replay), and a resumed run carries it on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import worker
from test_deepspeed_e2e import (assert_matches_replay, assert_succeeded, ds_config, launch_worker, records,
                                single_process_replay)

pytestmark = pytest.mark.e2e

STEPS, SAVE_AFTER = 7, 4
# threshold 1: no accuracy beats the first evaluation's by more, so every later one is a bad one
PLATEAU = {"evaluation": {"interval": 1, "top_k": [1]},
           "schedule": {"plateau": {"patience": 2, "factor": 0.5, "threshold": 1.0}}}
EXPECTED_SCALES = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("plateau")
    checkpoint = str(directory / "checkpoint")
    plan = [{"name": "plateau", "config": ds_config(0, **PLATEAU), "steps": STEPS, "evaluate": True,
             "save_after": SAVE_AFTER, "checkpoint": checkpoint}]
    assert_succeeded(launch_worker(directory, plan, timeout=200))
    resume = [{"name": "resumed", "config": ds_config(0, **PLATEAU), "steps": STEPS - SAVE_AFTER, "evaluate": True,
               "first_step": SAVE_AFTER, "load": True, "checkpoint": checkpoint}]
    assert_succeeded(launch_worker(directory, resume, timeout=200))
    return directory


def test_the_multiplier_drops_after_patience_and_not_before(runs):
    for rec in records(runs, "plateau"):
        assert rec["lr_scales"] == EXPECTED_SCALES
        assert rec["head_lrs"] == [0.5 * scale for scale in [1.0] + EXPECTED_SCALES[:-1]]


def test_backbone_and_head_step_with_the_multiplier(runs):
    """A float64 process stepping with lr × the multiplier in effect reproduces losses and head."""
    recs = records(runs, "plateau")
    in_effect = [1.0] + EXPECTED_SCALES[:-1]
    scaled = [{**rec, "backbone_lrs": [lr * s for lr, s in zip(rec["backbone_lrs"], in_effect)]} for rec in recs]
    backbone = worker.build_backbone().double()
    assert_matches_replay(recs, *single_process_replay(scaled, backbone=backbone))


def test_a_resumed_run_continues_the_plateau(runs):
    for straight, resumed in zip(records(runs, "plateau"), records(runs, "resumed")):
        assert resumed["lr_scales"] == straight["lr_scales"][SAVE_AFTER:]
        assert torch.equal(torch.stack(resumed["losses"]), torch.stack(straight["losses"][SAVE_AFTER:]))
        for name, value in straight["backbone"].items():
            assert torch.equal(value, resumed["backbone"][name]), name
