"""A DeepSpeed-engine checkpoint saved by the code before the runtime package (layout 1: the run
state inside the head's shard files; ``tests/data/checkpoint_v1/make_fixtures.py``) loads through
the launcher and the run goes on as the run that saved it went on: the same batches from the
loader, losses, head rows, backbone, grad_topk residual and step counters, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from launcher import assert_succeeded, launch_worker, records

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "checkpoint_v1"
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


def test_a_layout_1_deepspeed_checkpoint_resumes_bit_for_bit(resumed):
    expected = torch.load(FIXTURES / "deepspeed_expected.pt")
    for rank, (before, after) in enumerate(zip(expected, records(resumed, "resume_v1"))):
        assert torch.equal(after["initial_head"], before["head_at_save"]), f"rank {rank}'s shard not restored"
        for field in ("labels", "losses", "heads"):
            assert all(torch.equal(a, b) for a, b in zip(after[field], before[field])), f"rank {rank}: {field} differ"
        for name, value in after["backbone"].items():
            assert torch.equal(value, before["backbone"][name]), f"rank {rank}'s backbone parameter {name} differs"
        assert torch.equal(after["grad_topk"]["residual"], before["grad_topk"]["residual"]), f"rank {rank}'s residual"
        assert after["grad_topk"]["steps"] == before["grad_topk"]["steps"]
        assert after["counters"] == before["counters"], rank
