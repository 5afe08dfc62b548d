"""End-to-end tests: hybridfc under the real ``deepspeed`` launcher, 2 CPU ranks (gloo).

Each launch costs 10–20 s of start-up, so one launch of ``worker.py`` runs many short trainings
one after another (a run per ZeRO stage and dtype, gradient accumulation, an lr schedule, the
runs that save a checkpoint), and the tests read what each rank recorded. Correctness is measured against a
single float64 process that runs the full softmax on the global batch (rank 0's rows, then
rank 1's) with ``tests/reference.py``.

Bad inputs each get a launch of their own: the launcher must return non-zero, with the error
on the ranks, within a timeout (a hang is a failure). The launcher and the replay are in
``launcher.py``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

import worker
from hybridfc.data import SyntheticClasses, nearest_mean_accuracy
from hybridfc.parallel import wire
from hybridfc.plan import PlanInputs, make_plan
from launcher import (BACKBONE_OPTIMIZERS, CHECKPOINTED, FAILURE_TIMEOUT, HEAD_SGD, LOG_EVERY, MATRIX, MICRO_BATCH,
                      NUM_CLASSES, REPO, SAVE_AFTER, SELECTIONS, STEPS_AFTER_SAVE, TRAIN_STEPS, WARMUP, WARMUP_STEPS,
                      assert_close_relative, assert_failed, assert_matches_replay, assert_run_failed, assert_succeeded,
                      ds_config, launch, launch_worker, rank_errors, records, single_process_replay, tail)

pytestmark = pytest.mark.e2e


def test_rank_errors_are_found_wherever_the_other_rank_printed():
    """A rank's one-line error can land in the middle of another rank's traceback line."""
    output = ("Traceback (most recent call last):\n  File \"worker.py\", line 3worker rank 1: ConfigError: bad | key\n"
              ", in main\nworker rank 0: ConfigError: bad | key\n")
    errors = rank_errors(subprocess.CompletedProcess([], 1, output))
    assert errors == {0: ("ConfigError", "bad | key"), 1: ("ConfigError", "bad | key")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One launch: every (ZeRO stage, dtype) for TRAIN_STEPS steps, gradient accumulation 2 for
    2 steps, a warm-up lr schedule, and the runs that checkpoint after SAVE_AFTER steps and go on
    STEPS_AFTER_SAVE more."""
    directory = tmp_path_factory.mktemp("trained")
    runs = [{"name": f"train_z{stage}_{dtype}", "config": ds_config(stage, dtype), "steps": TRAIN_STEPS}
            for stage, dtype in MATRIX]
    runs.append({"name": "accumulation", "config": ds_config(2, accumulation=2), "steps": 2})
    runs.append({"name": "schedule", "steps": WARMUP_STEPS + 2,
                 "config": {**ds_config(1, optimizer="AdamW"), "scheduler": WARMUP, "steps_per_print": LOG_EVERY}})
    runs += [{"name": f"save_z{stage}_{dtype}", "config": ds_config(stage, dtype, optimizer="AdamW"),
              "steps": SAVE_AFTER + STEPS_AFTER_SAVE, "save_after": SAVE_AFTER,
              "checkpoint": str(directory / f"checkpoint_z{stage}_{dtype}")}
             for stage, dtype in CHECKPOINTED]
    runs += [{"name": f"save_{name}", "config": ds_config(2, optimizer="AdamW", **section),
              "steps": SAVE_AFTER + STEPS_AFTER_SAVE, "save_after": SAVE_AFTER,
              "checkpoint": str(directory / f"checkpoint_{name}")}
             for name, section in SELECTIONS.items()]
    result = launch_worker(directory, runs, timeout=450)
    (directory / "launcher.log").write_text(result.stdout)
    assert_succeeded(result)
    return directory


@pytest.fixture(scope="module")
def resumed(trained: Path) -> Path:
    """A fresh launch that loads each checkpoint and trains the STEPS_AFTER_SAVE steps that followed it."""
    runs = [{"name": f"resume_z{stage}_{dtype}", "config": ds_config(stage, dtype, optimizer="AdamW"),
             "steps": STEPS_AFTER_SAVE,
             "first_step": SAVE_AFTER, "load": True, "checkpoint": str(trained / f"checkpoint_z{stage}_{dtype}")}
            for stage, dtype in CHECKPOINTED]
    runs += [{"name": f"resume_{name}", "config": ds_config(2, optimizer="AdamW", **section),
              "steps": STEPS_AFTER_SAVE, "first_step": SAVE_AFTER, "load": True,
              "checkpoint": str(trained / f"checkpoint_{name}")}
             for name, section in SELECTIONS.items()]
    assert_succeeded(launch_worker(trained, runs, timeout=300))
    return trained


@pytest.mark.parametrize("stage, dtype", MATRIX)
def test_backbone_replicas_identical_and_trained(trained, stage, dtype):
    """Both ranks hold the same backbone after training, and it moved from its initial value."""
    rank0, rank1 = (rec["backbone"] for rec in records(trained, f"train_z{stage}_{dtype}"))
    initial = dict(worker.build_backbone().named_parameters())
    assert rank0.keys() == initial.keys()
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"backbone parameter {name} differs between the ranks"
        assert not torch.equal(value, initial[name].detach().to(value.dtype)), f"parameter {name} never changed"


@pytest.mark.parametrize("stage, dtype", [(0, "fp32"), (3, "bf16")])
def test_communication_stats_count_what_the_planner_predicts(trained, stage, dtype):
    """``engine.communication_stats()`` over TRAIN_STEPS steps: the head's exchanges of
    ``hybridfc plan`` per step, plus the step's agreement (an all-gather of two fp64 per rank)."""
    plan = make_plan(PlanInputs(NUM_CLASSES, worker.EMBEDDING_SIZE, 2, MICRO_BATCH)).method("model_parallel")
    expected = plan.communication
    agreement = wire.all_gather_bytes(2 * 8, 2)
    for rec in records(trained, f"train_z{stage}_{dtype}"):
        sent = {kind: traffic["bytes_sent"] for kind, traffic in rec["communication"].items()}
        assert sent == {"all_gather": TRAIN_STEPS * (expected.feature_all_gather + expected.label_all_gather
                                                     + agreement),
                        "all_reduce": TRAIN_STEPS * expected.softmax,
                        "all_to_all": TRAIN_STEPS * expected.feature_gradient}


def test_communication_is_logged_every_steps_per_print(trained):
    log = (trained / "launcher.log").read_text()
    lines = re.findall(rf"step (\d+): hybridfc communication over {LOG_EVERY} steps: ([\d.]+) k?B sent", log)
    assert [int(step) for step, _ in lines] == list(range(LOG_EVERY, WARMUP_STEPS + 2 + 1, LOG_EVERY))
    assert all(float(amount) > 0 for _, amount in lines)


@pytest.mark.parametrize("stage, dtype", MATRIX)
def test_head_shards_match_float64_replay(trained, stage, dtype):
    """Each rank owns its half of the classes; its shard evolves exactly as one float64 process
    training the full head on the recorded global embeddings would make it evolve."""
    recs = records(trained, f"train_z{stage}_{dtype}")
    assert [rec["class_start"] for rec in recs] == [0, NUM_CLASSES // 2]
    assert not torch.equal(recs[0]["heads"][-1], recs[1]["heads"][-1])
    assert all(rec["backbone_lrs"] == [BACKBONE_OPTIMIZERS["SGD"]["lr"]] * TRAIN_STEPS for rec in recs)
    assert all(rec["head_lrs"] == [HEAD_SGD["lr"]] * TRAIN_STEPS for rec in recs)
    assert_matches_replay(recs, *single_process_replay(recs))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_training_matches_single_process(trained, stage):
    """In fp32 the whole job (backbone under DeepSpeed, head sharded) is one float64 process
    training backbone and full head on the global batch: same losses, head and backbone."""
    recs = records(trained, f"train_z{stage}_fp32")
    backbone = worker.build_backbone().double()
    assert_matches_replay(recs, *single_process_replay(recs, backbone=backbone))
    for name, expected in backbone.named_parameters():
        assert_close_relative(recs[0]["backbone"][name], expected.detach(), f"backbone parameter {name}")


@pytest.mark.parametrize("stage, dtype", MATRIX)
def test_dtypes(trained, stage, dtype):
    """The backbone computes in the engine's dtype; the head's weights and the loss stay fp32."""
    for rec in records(trained, f"train_z{stage}_{dtype}"):
        expected = torch.bfloat16 if dtype == "bf16" else torch.float32
        assert {e.dtype for e in rec["embeddings"]} == {expected}
        assert {b.dtype for b in rec["backbone"].values()} == {expected}
        assert {h.dtype for h in rec["heads"]} == {torch.float32}
        assert {loss.dtype for loss in rec["losses"]} == {torch.float32}


@pytest.mark.parametrize("stage, dtype", MATRIX)
def test_loss_falls(trained, stage, dtype):
    """The global loss (the same scalar on both ranks) falls over TRAIN_STEPS steps."""
    rank0, rank1 = (torch.stack(rec["losses"]) for rec in records(trained, f"train_z{stage}_{dtype}"))
    assert torch.equal(rank0, rank1)
    first, last = float(rank0[:3].mean()), float(rank0[-3:].mean())
    assert last < 0.8 * first, f"mean loss of the first 3 steps {first:.3f}, of the last 3 {last:.3f}"


def test_head_steps_only_at_accumulation_boundaries(trained):
    """With gradient_accumulation_steps 2 the shard changes after micro-batches 2 and 4 only, by
    the step of the mean gradient of both; the backbone likewise matches the float64 replay."""
    recs = records(trained, "accumulation")
    for rec in recs:
        shards = [rec["initial_head"], *rec["heads"]]
        changed = [not torch.equal(before, after) for before, after in zip(shards, shards[1:])]
        assert changed == [False, True, False, True]
    backbone = worker.build_backbone().double()
    assert_matches_replay(recs, *single_process_replay(recs, accumulation=2, backbone=backbone))
    for name, expected in backbone.named_parameters():
        assert_close_relative(recs[0]["backbone"][name], expected.detach(), f"backbone parameter {name}")


def test_head_lr_follows_backbone_schedule(trained):
    """Under DeepSpeed's WarmupLR the head's lr is its own lr times the backbone's current lr ratio,
    and the whole run still matches the float64 replay."""
    recs = records(trained, "schedule")
    backbone_lrs = recs[0]["backbone_lrs"]
    assert backbone_lrs[0] < backbone_lrs[WARMUP_STEPS - 1] < backbone_lrs[-1]
    base_lr = BACKBONE_OPTIMIZERS["AdamW"]["lr"]
    assert backbone_lrs[-1] == pytest.approx(base_lr, rel=1e-12)
    for rec in recs:
        assert rec["head_lrs"] == pytest.approx([HEAD_SGD["lr"] * lr / base_lr for lr in backbone_lrs], rel=1e-12)
    backbone = worker.build_backbone().double()
    assert_matches_replay(recs, *single_process_replay(recs, "AdamW", backbone=backbone))


@pytest.mark.parametrize("stage, dtype", CHECKPOINTED)
def test_checkpoint_tag_holds_head_shards(trained, stage, dtype):
    """The tag directory holds one head shard per rank, with the rows the rank had when saving."""
    saved = records(trained, f"save_z{stage}_{dtype}")
    checkpoint = trained / f"checkpoint_z{stage}_{dtype}"
    tag = f"global_step{SAVE_AFTER}"
    assert (checkpoint / "latest").read_text().strip() == tag
    for rank, rec in enumerate(saved):
        shard = torch.load(checkpoint / tag / f"hybridfc_head_rank{rank:05d}_of_00002.pt")
        assert shard["shard"]["class_start"] == rec["class_start"]
        assert torch.equal(shard["weight"], rec["heads"][SAVE_AFTER - 1])


@pytest.mark.parametrize("stage, dtype", CHECKPOINTED)
def test_resume_continues_like_uninterrupted_run(resumed, stage, dtype):
    """A fresh launch that loads the checkpoint reproduces the uninterrupted run's later steps bit
    for bit: restored shards, same losses, same final head and backbone."""
    saved = records(resumed, f"save_z{stage}_{dtype}")
    loaded = records(resumed, f"resume_z{stage}_{dtype}")
    for rank, (before, after) in enumerate(zip(saved, loaded)):
        assert torch.equal(after["initial_head"], before["heads"][SAVE_AFTER - 1]), f"rank {rank}'s shard not restored"
        assert torch.equal(torch.stack(after["losses"]), torch.stack(before["losses"][SAVE_AFTER:])), \
            f"rank {rank}'s losses after resuming differ"
        assert torch.equal(after["heads"][-1], before["heads"][-1]), f"rank {rank}'s final shard differs"
        for name, value in after["backbone"].items():
            assert torch.equal(value, before["backbone"][name]), f"rank {rank}'s backbone parameter {name} differs"


@pytest.mark.parametrize("name", SELECTIONS)
def test_selection_trains_and_resumes_bit_for_bit(resumed, name):
    """Under DeepSpeed (ZeRO-2) a head with a class selection trains (its last two losses average
    below the first) and a fresh launch that loads the checkpoint, with a knn rebuild in flight
    at the save, reproduces the uninterrupted run's later steps bit for bit."""
    saved = records(resumed, f"save_{name}")
    loaded = records(resumed, f"resume_{name}")
    losses = torch.stack(saved[0]["losses"])
    # the loss of a step depends on the random rows it draws: compare the last two steps' mean
    assert losses[-2:].mean() < losses[0], f"{name}: the loss did not fall ({losses.tolist()})"
    for rank, (before, after) in enumerate(zip(saved, loaded)):
        assert torch.equal(after["initial_head"], before["heads"][SAVE_AFTER - 1]), f"rank {rank}'s shard not restored"
        assert torch.equal(torch.stack(after["losses"]), torch.stack(before["losses"][SAVE_AFTER:])), \
            f"{name}: rank {rank}'s losses after resuming differ"
        assert torch.equal(after["heads"][-1], before["heads"][-1]), f"{name}: rank {rank}'s final shard differs"


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> subprocess.CompletedProcess:
    """One launch of runs that each fail on purpose, every rank reporting its error and going on to
    the next run: a misspelled key, a missing config file, LARS past its bound, fewer classes than
    ranks, a NaN on every step, and a 64-class checkpoint loaded into a 48-class head."""
    directory = tmp_path_factory.mktemp("failures")
    checkpoint = str(directory / "checkpoint_64")
    lars = ds_config(schedule={"batch_scaling": {"reference_batch": 4, "rule": "linear"}}, **SELECTIONS["partial"])
    lars["hybridfc"]["optimizer"]["params"] = {**HEAD_SGD, "lars_coefficient": 0.15}
    nan_forever = {**ds_config(0), "hybridfc": {**ds_config(0)["hybridfc"], "max_consecutive_skips": 3}}
    runs = [{"name": "typo", "config": ds_config(margin={"type": "arcface", "sclae": 64}), "steps": 1},
            {"name": "missing", "deepspeed_config": str(directory / "no_such_config.json"), "steps": 1},
            {"name": "lars_bound", "config": lars, "steps": 1},
            {"name": "one_class", "config": ds_config(num_classes=1), "steps": 1},
            {"name": "nan_forever", "config": nan_forever, "steps": 6, "nan_rank": 0, "nan_steps": list(range(1, 6))},
            {"name": "saved_64", "config": ds_config(optimizer="AdamW"), "steps": 1, "save_after": 1,
             "checkpoint": checkpoint, "expect_error": False},
            {"name": "other_num_classes", "config": ds_config(optimizer="AdamW", num_classes=48), "steps": 1,
             "load": True, "checkpoint": checkpoint}]
    for run in runs:
        run.setdefault("expect_error", True)
    result = launch_worker(directory, runs, timeout=300)
    assert_succeeded(result)
    return result


def test_loading_checkpoint_with_fewer_num_classes_fails_on_every_rank(failures):
    """A checkpoint saved with 64 classes does not load into a 48-class head (a head grows, never
    shrinks: tests/e2e/test_grow_e2e.py): every rank says so."""
    assert_run_failed(failures, "other_num_classes", ("CheckpointError",), "num_classes", "64", "48")


def test_out_of_range_label_on_one_rank_fails_every_rank(tmp_path):
    """A bad label on rank 1 only raises InputError on both ranks, naming rank 1 and the label."""
    run = {"name": "bad_label", "config": ds_config(), "steps": 1, "bad_label_rank": 1}
    result = launch_worker(tmp_path, [run], timeout=FAILURE_TIMEOUT)
    assert_failed(result, ("InputError",), "rank 1", str(worker.BAD_LABEL), every_rank=True)


def test_misspelled_config_key_is_named(failures):
    """A typo inside the hybridfc section is reported with its full dotted key."""
    assert_run_failed(failures, "typo", ("ConfigError",), "hybridfc.margin.sclae")


def test_missing_config_file_is_named(failures):
    """A ds_config path that does not exist is reported with the path."""
    assert_run_failed(failures, "missing", ("ConfigError",), "no_such_config.json")


def test_lars_scaled_past_its_bound_by_batch_scaling_fails_at_start_on_every_rank(failures):
    """LARS at lr 0.5, η 0.15 is within ``lr * η / (1 - m) < 1`` (0.75), but batch scaling x4 (global
    batch 16 against 4) makes it 3: refused at ``initialize`` on every rank, not at a later step."""
    assert_run_failed(failures, "lars_bound", ("ValueError",), "lars_coefficient", "lr=2")


def test_fewer_classes_than_ranks_is_an_error(failures):
    """num_classes 1 cannot be sharded over 2 ranks: a clear error on every rank, no hang."""
    assert_run_failed(failures, "one_class", ("ValueError", "ConfigError"), "num_classes")


def test_persistent_nan_stops_the_run_on_every_rank_naming_the_ranks(failures):
    assert_run_failed(failures, "nan_forever", ("NonFiniteError",), "3 steps in a row skipped (steps 2 to 4)",
                      "non-finite input on rank(s) [0]", "max_consecutive_skips")


def test_example_train_script(tmp_path):
    """examples/train.py trains, evaluates, checkpoints and writes its result on a task long enough
    to learn: 1,000 classes x 16 samples, 2 epochs (126 steps) reach 0.46 held-out top-1 on the dev
    VM (the data's ceiling, the nearest training-mean rule, is 0.66); the floor, 0.25, is 250 times
    chance."""
    result_json, checkpoint = tmp_path / "result.json", tmp_path / "checkpoint"
    result = launch(REPO / "examples" / "train.py", "--deepspeed_config", REPO / "ds_configs" / "cpu.json",
                    "--num-classes", 1000, "--samples-per-class", 16, "--epochs", 2,
                    "--result-json", result_json, "--save-dir", checkpoint, timeout=240)
    assert_succeeded(result)
    metrics = json.loads(result_json.read_text())
    assert metrics["top1"] > 0.25, metrics
    assert metrics["ceiling"] == nearest_mean_accuracy(SyntheticClasses(1000, 16), SyntheticClasses(1000, 2, split="test"))
    assert metrics["history"][-1]["step"] == 126   # 2 epochs of 63 steps (the uneven last batch kept)
    assert metrics["num_classes"] == 1000
    assert math.isfinite(metrics["final_loss"])
    assert "over 2 ranks" in result.stdout and "hybridfc communication over 126 steps, per rank:" in result.stdout
    tag = (checkpoint / "latest").read_text().strip()
    assert sorted(p.name for p in (checkpoint / tag).glob("hybridfc_head_*.pt")) == [
        "hybridfc_head_rank00000_of_00002.pt", "hybridfc_head_rank00001_of_00002.pt"]


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(heading):]
    start = after.index("```python\n") + len("```python\n")
    return after[start: after.index("```", start)]


def test_readme_python_blocks_run_under_the_launcher(tmp_path):
    """The README's python blocks, as written, through the launcher with the main job's config: the
    switching script trains an epoch and saves; the resuming block, run after it in the same script,
    loads that checkpoint and trains epochs 1 and 2 (3 epochs of 79 steps in all, not 4)."""
    script = tmp_path / "readme_snippet.py"
    script.write_text(readme_block("## Switching a DeepSpeed script to hybridfc") + "\n"
                      + readme_block("## Resuming and resharding"))
    result = launch(script, "--deepspeed_config", REPO / "ds_configs" / "cpu.json", timeout=240, cwd=tmp_path)
    assert_succeeded(result)
    tag = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert tag == f"global_step{3 * 79}"
    assert len(list((tmp_path / "checkpoints" / tag).glob("hybridfc_head_*.pt"))) == 2


NAN_STEPS = [2, 5, 6]


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory) -> Path:
    """One launch: at every ZeRO stage, fp32 and bf16, rank 1 feeds a NaN at NAN_STEPS."""
    directory = tmp_path_factory.mktemp("nan")
    runs = [{"name": f"nan_z{stage}_{dtype}", "config": ds_config(stage, dtype), "steps": 9,
             "nan_rank": 1, "nan_steps": NAN_STEPS} for stage, dtype in MATRIX]
    runs += [{"name": f"nan_z{stage}_fp32_unclipped", "config": {**ds_config(stage), "gradient_clipping": 0.0},
              "steps": 9, "nan_rank": 1, "nan_steps": NAN_STEPS} for stage in (0, 1)]
    runs += [{"name": f"state_dict_z{stage}", "config": ds_config(stage), "steps": 2, "state_dict_round_trip": True}
             for stage in (0, 3)]
    result = launch_worker(directory, runs, timeout=450)
    (directory / "launcher.log").write_text(result.stdout)
    assert_succeeded(result)
    return directory


@pytest.mark.parametrize("name", [f"z{stage}_{dtype}" for stage, dtype in MATRIX] + ["z0_fp32_unclipped",
                                                                                    "z1_fp32_unclipped"])
def test_a_nan_batch_on_one_rank_skips_the_step_everywhere(nan_runs, name):
    """Every parameter stays finite, the other steps train, and the counters of backbone and head
    agree: every step attempted, the NaN steps skipped."""
    for rec in records(nan_runs, f"nan_{name}"):
        assert all(torch.isfinite(value).all() for value in rec["backbone"].values())
        assert all(torch.isfinite(head).all() for head in rec["heads"])
        assert rec["counters"] == {"global_steps": 9, "skipped_steps": len(NAN_STEPS), "head_steps": 9,
                                   "head_skipped_steps": len(NAN_STEPS)}
        assert not torch.equal(rec["heads"][0], rec["heads"][-1])


def test_skips_are_logged_with_their_cause(nan_runs):
    log = (nan_runs / "launcher.log").read_text()
    for step in NAN_STEPS:
        assert f"step {step + 1}: skipped for non-finite input on rank(s) [1]" in log


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_state_dict_round_trips_backbone_and_head(nan_runs, stage):
    for rec in records(nan_runs, f"state_dict_z{stage}"):
        trip = rec["round_trip"]
        assert set(trip["state"]) == {"backbone", "head"}
        assert all(not value.any() for value in trip["zeroed"]["backbone"].values()) and not trip["zeroed"]["head"].any()
        for name, value in trip["restored"]["backbone"].items():
            assert torch.equal(value, rec["backbone"][name])
        assert torch.equal(trip["restored"]["head"], rec["heads"][-1])


SAVE_STAGES = {"head_written": 1, "backbone_written": 0, "renamed": 0, "latest_written": 0}   # stage: rank killed


@pytest.fixture(scope="module")
def interrupted_saves(tmp_path_factory) -> Path:
    """For each stage of a save, a launch that saves after step 1 and is killed (SIGKILL on one
    rank) in its save after step 3; then one launch that resumes from each checkpoint's latest."""
    directory = tmp_path_factory.mktemp("interrupted")
    for stage, rank in SAVE_STAGES.items():
        run = {"name": f"killed_{stage}", "config": ds_config(0), "steps": 3, "save_after": [1, 3],
               "checkpoint": str(directory / stage), "kill_stage": stage, "kill_rank": rank}
        result = launch_worker(directory, [run], timeout=120)
        assert result.returncode != 0, f"the launch killed at {stage} exited 0:\n{tail(result.stdout)}"
    runs = [{"name": f"resumed_{stage}", "config": ds_config(0), "steps": 1, "load": True,
             "checkpoint": str(directory / stage)} for stage in SAVE_STAGES]
    assert_succeeded(launch_worker(directory, runs, timeout=240))
    return directory


@pytest.mark.parametrize("stage", list(SAVE_STAGES))
def test_a_save_killed_at_any_stage_leaves_a_loadable_checkpoint(interrupted_saves, stage):
    """Killed before ``latest`` moved, the previous checkpoint is the one loaded (the new tag is
    invisible or complete); killed after, the new one, complete."""
    checkpoint = interrupted_saves / stage
    expected = "global_step3" if stage == "latest_written" else "global_step1"
    assert (checkpoint / "latest").read_text() == expected
    if stage in ("head_written", "backbone_written"):
        assert not (checkpoint / "global_step3").exists()
    assert len(list((checkpoint / expected).glob("hybridfc_head_*.pt"))) == 2
    for rec in records(interrupted_saves, f"resumed_{stage}"):
        assert len(rec["losses"]) == 1 and torch.isfinite(rec["losses"][0])


LOADER_STEPS, LOADER_SAVE_AFTER = 20, 10   # 8 steps per epoch: the resumed half crosses an epoch's end


@pytest.fixture(scope="module")
def loader_runs(tmp_path_factory) -> Path:
    """With hybridfc's loader, for ``full`` and ``knn``: LOADER_STEPS steps straight; the first
    LOADER_SAVE_AFTER and a save; then (a new launch) a resume for the rest. ``full_peek`` saves
    after its loop has taken the next batch (and ends there), as a loop that checks its step limit
    after taking a batch does."""
    directory = tmp_path_factory.mktemp("loader")
    sections = {"full": {}, "knn": SELECTIONS["knn"], "full_peek": {}}
    runs = []
    for name, section in sections.items():
        config = ds_config(0, **section)
        if name != "full_peek":
            runs.append({"name": f"straight_{name}", "config": config, "steps": LOADER_STEPS, "loader": True})
        runs.append({"name": f"first_{name}", "config": config, "steps": LOADER_SAVE_AFTER, "loader": True,
                     "save_after": LOADER_SAVE_AFTER, "checkpoint": str(directory / f"checkpoint_{name}"),
                     "peek_before_save": name == "full_peek"})
    assert_succeeded(launch_worker(directory, runs, timeout=300))
    resumed = [{"name": f"resumed_{name}", "config": ds_config(0, **section), "loader": True, "load": True,
                "steps": LOADER_STEPS - LOADER_SAVE_AFTER, "checkpoint": str(directory / f"checkpoint_{name}")}
               for name, section in sections.items()]
    assert_succeeded(launch_worker(directory, resumed, timeout=300))
    return directory


@pytest.mark.parametrize("name", ["full", "knn", "full_peek"])
def test_save_and_resume_continue_the_uninterrupted_run_bit_for_bit(loader_runs, name):
    """The same samples in the same order after the resume, across an epoch's end: the same
    losses, head shards and backbone, bit for bit (CPU, fp32); also when the loop had taken the
    next batch before it saved (the checkpoint holds the data's position at the last step)."""
    uninterrupted = name.removesuffix("_peek")
    for straight, resumed in zip(records(loader_runs, f"straight_{uninterrupted}"),
                                 records(loader_runs, f"resumed_{name}")):
        assert torch.equal(torch.stack(straight["losses"][LOADER_SAVE_AFTER:]), torch.stack(resumed["losses"]))
        assert torch.equal(straight["heads"][-1], resumed["heads"][-1])
        for key, value in straight["backbone"].items():
            assert torch.equal(value, resumed["backbone"][key]), key


def saved_head_rows(checkpoint: Path) -> torch.Tensor:
    """The whole head of a checkpoint's latest tag: every shard's rows in rank order."""
    tag = checkpoint / (checkpoint / "latest").read_text().strip()
    return torch.cat([torch.load(path, weights_only=True)["weight"] for path in sorted(tag.glob("hybridfc_head_*.pt"))])


def test_a_checkpoint_of_2_ranks_resumes_on_1_and_one_of_1_on_2(trained, tmp_path):
    """ZeRO-0 through the launcher: the head is resharded, DeepSpeed loads its whole state, and
    training goes on."""
    config = ds_config(optimizer="AdamW")
    two = trained / "checkpoint_z0_fp32"
    assert_succeeded(launch_worker(tmp_path, [{"name": "two_on_one", "config": config, "steps": 1, "load": True,
                                               "checkpoint": str(two)}], timeout=120, ranks=1))
    assert torch.equal(torch.load(tmp_path / "two_on_one_rank0.pt")["initial_head"], saved_head_rows(two))
    one = tmp_path / "checkpoint_one"
    assert_succeeded(launch_worker(tmp_path, [{"name": "saved_on_one", "config": config, "steps": 2, "save_after": 2,
                                               "checkpoint": str(one)}], timeout=120, ranks=1))
    assert_succeeded(launch_worker(tmp_path, [{"name": "one_on_two", "config": config, "steps": 1, "load": True,
                                               "checkpoint": str(one)}], timeout=120))
    loaded = torch.cat([rec["initial_head"] for rec in records(tmp_path, "one_on_two")])
    assert torch.equal(loaded, saved_head_rows(one))


def test_another_rank_count_at_zero_1_names_the_universal_checkpoint(trained, tmp_path):
    run = {"name": "z1_on_one", "config": ds_config(1, "bf16", optimizer="AdamW"), "steps": 1, "load": True,
           "checkpoint": str(trained / "checkpoint_z1_bf16")}
    result = launch_worker(tmp_path, [run], timeout=FAILURE_TIMEOUT, ranks=1)
    assert result.returncode != 0
    assert re.search(r"worker rank 0: CheckpointError: .*saved on 2 ranks, this run has 1.*ZeRO-1.*universal "
                     r"checkpoint", result.stdout), tail(result.stdout)
