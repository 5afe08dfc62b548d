"""hybridfc's lr schedule under the real ``deepspeed`` launcher, 2 CPU ranks, against float64
replays: ``schedule.plateau`` drops the lr multiplier of backbone and head after ``patience``
evaluations without improvement and not before, and a resumed run carries it on;
``schedule.batch_scaling`` multiplies both by its factor for the global batch; the head's
``lars_coefficient`` scales its lr by the trust ratio over both shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import worker
from launcher import (assert_matches_replay, assert_succeeded, ds_config, launch_worker, records,
                      single_process_replay)

pytestmark = pytest.mark.e2e

STEPS, SAVE_AFTER = 7, 4
# threshold 1: no accuracy beats the first evaluation's by more, so every later one is a bad one
PLATEAU = {"evaluation": {"interval": 1, "top_k": [1]},
           "schedule": {"plateau": {"patience": 2, "factor": 0.5, "threshold": 1.0}}}
EXPECTED_SCALES = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]
# the global batch is 2 ranks x 8: sqrt(16 / 4) = 2
BATCH_SCALING = {"schedule": {"batch_scaling": {"reference_batch": 4, "rule": "sqrt"}}}
BATCH_FACTOR = 2.0
LARS = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("plateau")
    checkpoint = str(directory / "checkpoint")
    lars = ds_config(0)
    lars["hybridfc"]["optimizer"]["params"] = {**lars["hybridfc"]["optimizer"]["params"], "lars_coefficient": LARS}
    plan = [{"name": "plateau", "config": ds_config(0, **PLATEAU), "steps": STEPS, "evaluate": True,
             "save_after": SAVE_AFTER, "checkpoint": checkpoint},
            {"name": "batch_scaled", "config": ds_config(0, **BATCH_SCALING), "steps": 3},
            {"name": "lars", "config": lars, "steps": 3}]
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


def test_batch_scaling_multiplies_the_lr_of_backbone_and_head(runs):
    recs = records(runs, "batch_scaled")
    for rec in recs:
        assert rec["lr_scales"] == [BATCH_FACTOR] * 3
        assert rec["head_lrs"] == [0.5 * BATCH_FACTOR] * 3
    scaled = [{**rec, "backbone_lrs": [lr * BATCH_FACTOR for lr in rec["backbone_lrs"]]} for rec in recs]
    assert_matches_replay(recs, *single_process_replay(scaled, backbone=worker.build_backbone().double()))


def test_lars_trust_ratio_spans_both_shards_of_the_head(runs):
    """The float64 replay computes the ratio over the whole head; a ratio over one shard would differ."""
    recs = records(runs, "lars")
    assert_matches_replay(recs, *single_process_replay(recs, backbone=worker.build_backbone().double(),
                                                       head_lars=LARS))
