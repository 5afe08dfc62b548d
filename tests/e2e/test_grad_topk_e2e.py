"""``communication.grad_topk`` under the real ``deepspeed`` launcher, 2 CPU ranks (gloo): the
backbone's gradient averaged from each rank's top-k entries replaces DeepSpeed's reduction at
ZeRO 0 and 1.

One launch runs the trainings one after another; the tests read what each rank recorded
(``worker.py``). The bad settings share one launch: every rank must fail naming the key, run after run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from hybridfc.parallel import wire
from launcher import assert_run_failed, assert_succeeded, ds_config, launch_worker, records

pytestmark = pytest.mark.e2e

STAGES = (0, 1)
DENSITY = 0.05
WARMUP = 10
LONG_STEPS = 120
SHORT_STEPS = 6
SAVE_AFTER, AFTER_SAVE = 3, 3
NAN_STEP = 4


def without_weight_decay(config: dict) -> dict:
    """Momentum correction applies the momentum itself: the optimizer's weight decay must be 0."""
    config["optimizer"]["params"]["weight_decay"] = 0.0
    return config


def with_overlap_comm(config: dict) -> dict:
    config["zero_optimization"]["overlap_comm"] = True
    return config


def topk(density: float = DENSITY, **keys: object) -> dict:
    """grad_topk at ``density`` with fp32 values and no warm-up, unless ``keys`` say otherwise."""
    return {"communication": {"grad_topk": density, "grad_topk_warmup_steps": 0, "grad_topk_value_dtype": "fp32",
                              **keys}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Dense and grad_topk 1.0 side by side; 120 steps at 5 % after a warm-up, at ZeRO 0 and 1;
    bf16; gradient accumulation; a NaN on rank 1; momentum correction; a save after 3 steps."""
    directory = tmp_path_factory.mktemp("grad_topk")
    plan = []
    for stage in STAGES:
        plan += [{"name": f"dense_z{stage}", "config": ds_config(stage), "steps": SHORT_STEPS},
                 {"name": f"full_z{stage}", "config": ds_config(stage, **topk(1.0)), "steps": SHORT_STEPS},
                 {"name": f"long_z{stage}", "config": ds_config(stage, **topk(grad_topk_warmup_steps=WARMUP)),
                  "steps": LONG_STEPS},
                 {"name": f"save_z{stage}", "config": ds_config(stage, optimizer="AdamW", **topk()),
                  "steps": SAVE_AFTER + AFTER_SAVE, "save_after": SAVE_AFTER,
                  "checkpoint": str(directory / f"checkpoint_z{stage}")}]
    plan += [{"name": "bf16", "config": ds_config(1, "bf16", **topk(grad_topk_value_dtype="bf16")), "steps": 20},
             {"name": "accumulation", "config": ds_config(0, accumulation=2, **topk()), "steps": 3},
             {"name": "nan", "config": ds_config(0, **topk()), "steps": 8, "nan_rank": 1, "nan_steps": [NAN_STEP]},
             {"name": "momentum", "steps": 20,
              "config": without_weight_decay(ds_config(0, **topk(grad_topk_momentum_correction=True)))}]
    result = launch_worker(directory, plan, timeout=500)
    (directory / "launcher.log").write_text(result.stdout)
    assert_succeeded(result)
    return directory


@pytest.fixture(scope="module")
def resumed(runs: Path) -> Path:
    plan = [{"name": f"resume_z{stage}", "config": ds_config(stage, optimizer="AdamW", **topk()),
             "steps": AFTER_SAVE, "first_step": SAVE_AFTER, "load": True,
             "checkpoint": str(runs / f"checkpoint_z{stage}")} for stage in STAGES]
    assert_succeeded(launch_worker(runs, plan, timeout=300))
    return runs


def assert_same_backbone(a: dict, b: dict, what: str) -> None:
    for name, value in a["backbone"].items():
        assert torch.equal(value, b["backbone"][name]), f"{what}: backbone parameter {name} differs"


@pytest.mark.parametrize("stage", STAGES)
def test_full_density_equals_deepspeeds_dense_reduction_bitwise(runs, stage):
    """grad_topk 1.0 (on 2 ranks pairs would cost more, so the residual is all-reduced dense)
    trains exactly as DeepSpeed's own reduction: same losses, head and backbone, bit for bit."""
    for dense, full in zip(records(runs, f"dense_z{stage}"), records(runs, f"full_z{stage}")):
        assert torch.equal(torch.stack(dense["losses"]), torch.stack(full["losses"]))
        assert torch.equal(dense["heads"][-1], full["heads"][-1])
        assert_same_backbone(dense, full, f"ZeRO-{stage}")
        assert float(full["grad_topk"]["residual"].abs().max()) == 0


@pytest.mark.parametrize("stage", STAGES)
def test_replicas_stay_bit_identical_over_long_sparse_training(runs, stage):
    """120 steps at 5 % after a 10-step warm-up: both ranks hold the same backbone bit for bit,
    it trained (the loss fell), and each rank kept its own residual; the exchange was an
    all-gather of (index, value) pairs of the counted bytes once warmed up."""
    rank0, rank1 = records(runs, f"long_z{stage}")
    assert_same_backbone(rank0, rank1, f"ZeRO-{stage}")
    losses = torch.stack(rank0["losses"])
    assert losses[-10:].mean() < 0.8 * losses[:10].mean(), losses.tolist()
    assert not torch.equal(rank0["grad_topk"]["residual"], rank1["grad_topk"]["residual"])
    assert rank0["grad_topk"]["steps"] == LONG_STEPS
    sparse = rank0["communication"]["sparse_all_reduce"]
    numel = rank0["grad_topk"]["residual"].numel()
    pairs = max(1, round(DENSITY * numel))
    assert sparse["calls"] >= LONG_STEPS - WARMUP
    assert sparse["bytes_sent"] >= (LONG_STEPS - WARMUP) * wire.sparse_all_reduce_bytes(pairs, 4, 2)


def test_sparse_training_stays_close_to_dense(runs):
    """A short run: the losses of grad_topk 5 % stay near the dense run's (error feedback)."""
    dense = torch.stack(records(runs, "dense_z0")[0]["losses"])
    sparse = torch.stack(records(runs, "long_z0")[0]["losses"][:SHORT_STEPS])
    assert float((dense - sparse).abs().max()) < 0.1 * float(dense.abs().max())


def test_bf16_values_on_zero_1(runs):
    rank0, rank1 = records(runs, "bf16")
    assert_same_backbone(rank0, rank1, "bf16 ZeRO-1")
    assert torch.isfinite(rank0["grad_topk"]["residual"]).all()
    assert rank0["communication"]["sparse_all_reduce"]["calls"] > 0


def test_accumulation_exchanges_once_per_optimizer_step(runs):
    """Two micro-batches per step: one exchange per optimizer step, none per micro-batch."""
    for rec in records(runs, "accumulation"):
        assert rec["communication"]["sparse_all_reduce"]["calls"] == 3
        assert rec["counters"]["global_steps"] == 3


def test_a_nan_on_one_rank_leaves_every_residual_finite(runs):
    """Rank 1's input is NaN at one step: the step is skipped on both ranks, neither residual
    takes the NaN, and training goes on with identical replicas."""
    rank0, rank1 = records(runs, "nan")
    for rec in (rank0, rank1):
        assert rec["counters"]["skipped_steps"] == 1 and rec["counters"]["global_steps"] == 8
        assert torch.isfinite(rec["grad_topk"]["residual"]).all()
        assert rec["grad_topk"]["steps"] == 7
        assert all(torch.isfinite(v).all() for v in rec["backbone"].values())
    assert_same_backbone(rank0, rank1, "after the NaN")


def test_momentum_correction_trains_identical_replicas(runs):
    rank0, rank1 = records(runs, "momentum")
    assert_same_backbone(rank0, rank1, "momentum correction")
    assert rank0["grad_topk"]["velocity"] is not None
    assert torch.isfinite(rank0["grad_topk"]["velocity"]).all()


@pytest.mark.parametrize("stage", STAGES)
def test_save_and_resume_continue_identically(resumed, stage):
    """The residuals travel with the checkpoint: a fresh launch that loads it repeats the
    uninterrupted run's later steps bit for bit, residuals included."""
    for before, after in zip(records(resumed, f"save_z{stage}"), records(resumed, f"resume_z{stage}")):
        assert torch.equal(torch.stack(after["losses"]), torch.stack(before["losses"][SAVE_AFTER:]))
        assert_same_backbone(before, after, f"ZeRO-{stage} resumed")
        assert torch.equal(before["grad_topk"]["residual"], after["grad_topk"]["residual"])


BAD_SETTINGS = {
    "zero2": (ds_config(2, **topk()), ("hybridfc.communication.grad_topk", "ZeRO stage 2", "stages 0 and 1")),
    "density": (ds_config(0, **topk(1.5)), ("hybridfc.communication.grad_topk", "1.5")),
    "momentum_without_sgd": (ds_config(0, optimizer="AdamW", **topk(grad_topk_momentum_correction=True)),
                             ("hybridfc.communication.grad_topk_momentum_correction", "momentum")),
    "momentum_with_weight_decay": (ds_config(0, **topk(grad_topk_momentum_correction=True)),
                                   ("hybridfc.communication.grad_topk_momentum_correction", "weight_decay")),
    "zero1_overlap_comm": (with_overlap_comm(ds_config(1, **topk())), ("hybridfc.communication.grad_topk",
                                                                       "overlap_comm")),
}


@pytest.fixture(scope="module")
def bad_settings(tmp_path_factory) -> subprocess.CompletedProcess:
    """One launch: a run per setting grad_topk cannot take, each failing on every rank in turn."""
    runs = [{"name": name, "config": config, "steps": 1, "expect_error": True}
            for name, (config, _) in BAD_SETTINGS.items()]
    result = launch_worker(tmp_path_factory.mktemp("bad_settings"), runs, timeout=240)
    assert_succeeded(result)
    return result


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_settings_fail_on_every_rank(bad_settings, name):
    assert_run_failed(bad_settings, name, ("ConfigError",), *BAD_SETTINGS[name][1])
