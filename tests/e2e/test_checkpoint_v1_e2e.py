"""A DeepSpeed-engine checkpoint saved by the code before the runtime package (layout 1: the run
state inside the head's shard files; ``tests/data/checkpoint_v1/make_fixtures.py``) loads through
the launcher and the run goes on as the run that saved it went on: the head rows at the load, the
loader's batches and the step counters bit for bit; the losses, head rows, backbone and grad_topk
residual of the steps after it to fp32 rounding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from launcher import assert_succeeded, launch_worker, records

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "checkpoint_v1"
CONTINUATION = dict(rtol=1e-5, atol=1e-6)
"""How close the steps after the load come to the saving run's: fp32 rounding (today's head computes
its logits in tiles and in base 2, and rounds differently from the code that saved)."""
SAVE_AFTER, AFTER_SAVE = 3, 3


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("v1")
    checkpoint = directory / "checkpoint"
    shutil.copytree(FIXTURES / "deepspeed", checkpoint)
    run = {"name": "resume_v1", "config": json.loads((FIXTURES / "deepspeed_config.json").read_text()),
           "steps": AFTER_SAVE, "first_step": SAVE_AFTER, "loader": True, "load": True, "checkpoint": str(checkpoint)}
    assert_succeeded(launch_worker(directory, [run], timeout=300))
    return directory


def test_a_layout_1_deepspeed_checkpoint_resumes(resumed):
    expected = torch.load(FIXTURES / "deepspeed_expected.pt")
    for rank, (before, after) in enumerate(zip(expected, records(resumed, "resume_v1"))):
        assert torch.equal(after["initial_head"], before["head_at_save"]), f"rank {rank}'s shard not restored"
        assert all(torch.equal(a, b) for a, b in zip(after["labels"], before["labels"])), f"rank {rank}: labels differ"
        assert after["grad_topk"]["steps"] == before["grad_topk"]["steps"]
        assert after["counters"] == before["counters"], rank
        for field in ("losses", "heads"):
            assert_close(torch.stack(after[field]), torch.stack(before[field]), **CONTINUATION,
                         msg=f"rank {rank}: {field}")
        for name, value in after["backbone"].items():
            assert_close(value, before["backbone"][name], **CONTINUATION, msg=f"rank {rank}'s backbone {name}")
        assert_close(after["grad_topk"]["residual"], before["grad_topk"]["residual"], **CONTINUATION,
                     msg=f"rank {rank}'s residual")
