"""``hybridfc plan``: the seed table's figures, units, JSON, the memory answer, errors, and the model
of the head's peak memory against a measurement (``benchmarks/check_plan_memory.py``)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybridfc.cli import UNITS, format_bytes, main
from hybridfc.plan import METHODS, Plan, PlanInputs, budget_rows, make_plan, max_num_classes

REPO = Path(__file__).resolve().parents[1]
GIB, MIB, KIB = 2**30, 2**20, 2**10
SEED_ARGS = ["--num-classes", "10000000", "--embedding-size", "512", "--world-size", "64",
             "--local-batch", "64", "--budget", "0.1", "--logits", "store"]
SEED = PlanInputs(num_classes=10_000_000, embedding_size=512, world_size=64, local_batch=64,
                  selection="partial", budget=0.1, logits="store")

# (figure, the seed's number, its unit read literally (GB as GiB, MB as MiB), the unit that
# reproduces it exactly): the seed's table (N=64, 64/GPU, d=512, C=10M, r=0.1, fp32).
SEED_FIGURES = [
    ("data-parallel weight", lambda p: p.method("data_parallel").memory.weight, 19.07, GIB, GIB),
    ("model-parallel weight", lambda p: p.method("model_parallel").memory.weight, 298, MIB, GIB / 1000),
    ("partial weight", lambda p: p.method("selection").memory.weight, 298, MIB, GIB / 1000),
    ("global logits B x C", lambda p: p.global_logits, 156, GIB, MIB * 1000),
    ("model-parallel logits", lambda p: p.method("model_parallel").memory.logits, 2.44, GIB, MIB * 1000),
    ("partial logits", lambda p: p.method("selection").memory.logits, 250, MIB, KIB * 1000),
]


def run_cli(capsys, *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name, figure, seed, literal, exact", SEED_FIGURES, ids=[f[0] for f in SEED_FIGURES])
def test_seed_figures(name, figure, seed, literal, exact):
    nbytes = figure(make_plan(SEED))
    assert nbytes / literal == pytest.approx(seed, rel=0.03)
    assert nbytes / exact == pytest.approx(seed, rel=0.005)


def test_seed_case_bytes():
    plan = make_plan(SEED)
    mp, dp = plan.method("model_parallel"), plan.method("data_parallel")
    assert dp.memory.weight == 10_000_000 * 512 * 4
    assert mp.rows_held == 156_250 and plan.method("selection").rows_computed == 15_625
    assert mp.communication.feature_all_gather == 63 * 64 * 512 * 4
    assert mp.communication.softmax == 2 * 63 * 3 * 4096 * 4 // 64
    assert mp.communication.feature_gradient == mp.communication.feature_all_gather
    assert mp.communication.weight_gradient_sync == 0
    assert dp.communication.weight_gradient_sync == 2 * 63 * 20_480_000_000 // 64
    assert dp.memory.logits == mp.memory.logits == 64 * 10_000_000 * 4
    assert plan.method("selection").communication == mp.communication


def test_memory_total_is_the_larger_peak():
    for inputs in (SEED, PlanInputs(1_000_000, 128, 2, 128), PlanInputs(1_000_000, 64, 2, 512, storage_dtype="bf16")):
        for m in make_plan(inputs).methods:
            mem = m.memory
            assert mem.total == max(mem.softmax_peak, mem.normalize_peak)
            if m.method == "data_parallel":
                assert mem.normalize_peak == (mem.weight + mem.optimizer_state + mem.row_copy + mem.weight_gradient
                                              + mem.normalize_temporaries)
            else:
                assert mem.normalize_peak == mem.normalize_temporaries == 0
                assert mem.normalized_rows == min(m.rows_computed, 16384) * inputs.embedding_size * 4


def test_rate_rounds_down_the_written_decimal():
    inputs = PlanInputs(900, 8, 10, 4, selection="partial", budget=0.7)
    assert budget_rows(inputs, 90) == 63
    assert budget_rows(inputs, 1) == 1


def test_units_line_is_printed(capsys):
    out = run_cli(capsys, "plan", *SEED_ARGS)
    assert UNITS in out.splitlines()
    assert "GiB = 2^30 B" in UNITS and "MiB = 2^20 B" in UNITS
    assert "19.07 GiB" in out and "152.6 GiB" in out


def test_json_round_trips(capsys):
    data = json.loads(run_cli(capsys, "plan", *SEED_ARGS, "--json"))
    assert data["units"] == "bytes"
    assert Plan.from_dict(data) == make_plan(SEED)
    assert data["methods"][0]["memory"]["weight"] == 20_480_000_000


@pytest.mark.parametrize("inputs", [
    SEED,
    PlanInputs(1_000_000, 512, 8, 128),
    PlanInputs(1_000_000, 256, 8, 64, selection="knn", budget=5000, storage_dtype="bf16", optimizer="adam"),
    PlanInputs(1_000_000, 128, 3, 32, selection="hf", budget=0.25, feature_dtype="fp16"),
], ids=["partial-rate", "full", "knn-count-bf16-adam", "hf-uneven"])
@pytest.mark.parametrize("method", METHODS)
def test_memory_answer_fits_and_one_more_row_block_does_not(inputs, method):
    limit = 40 * GIB
    best = max_num_classes(inputs, limit, method)
    step = 1 if method == "data_parallel" else inputs.world_size
    total = lambda c: make_plan(dataclasses.replace(inputs, num_classes=c)).method(method).memory.total
    assert total(best) <= limit < total(best + step)
    assert total(best + 1) > limit


def test_memory_answer_from_the_cli(capsys):
    data = json.loads(run_cli(capsys, "plan", *SEED_ARGS[2:], "--memory-gib", "80", "--json"))
    best = data["max_num_classes"]
    assert data["inputs"]["num_classes"] == best
    assert data["methods"][2]["memory"]["total"] <= 80 * GIB
    assert max_num_classes(SEED, 80 * GIB) == best
    out = run_cli(capsys, "plan", *SEED_ARGS, "--memory-gib", "80")
    assert f"largest C that fits 80 GiB per rank with partial (0.1): {best:,}" in out


def test_memory_answer_none_when_nothing_fits():
    assert max_num_classes(SEED, 1024, "selection") is None


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "budget must be a rate in (0, 1] or a row count >= 1, got 0"),
    (["--budget", "0.0"], "budget must be a rate in (0, 1] or a row count >= 1, got 0.0"),
    (["--budget", "1.5"], "got 1.5"),
    (["--budget", "-3"], "got -3"),
    (["--budget", "200000"], "budget=200000 rows is more than the shard: 10000000 classes over 64 ranks "
                             "leave 156250 rows on the largest one"),
    (["--budget", "abc"], "not a number: 'abc'"),
    (["--selection", "full", "--budget", "0.1"], "budget applies to the selections partial, knn and hf"),
    (["--selection", "knn"], "selection 'knn' needs a budget"),
    (["--num-classes", "10", "--world-size", "64"], "num_classes=10 is smaller than world_size=64"),
    (["--memory-gib", "0"], "must be > 0"),
    (["--storage-dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_cli_errors_are_clear(capsys, args, message):
    base = ["--num-classes", "10000000", "--embedding-size", "512", "--world-size", "64", "--local-batch", "64"]
    err = cli_error(capsys, "plan", *base, *args)
    assert message in err
    assert err.startswith("usage: hybridfc plan")


def test_cli_needs_num_classes_or_memory(capsys):
    err = cli_error(capsys, "plan", "--embedding-size", "512", "--world-size", "64", "--local-batch", "64")
    assert "give --num-classes, or --memory-gib" in err


def test_help_through_the_console_script():
    script = Path(sys.executable).with_name("hybridfc")
    result = subprocess.run([str(script), "plan", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--memory-gib" in result.stdout and "--selection {full,partial,knn,hf}" in result.stdout


@pytest.mark.slow   # a 1M-class head on 2 ranks: the quick tier checks the plan's arithmetic only
def test_measured_peak_within_15_percent_of_the_plan():
    """2 gloo ranks, C = 1M, d = 128, global batch 256, momentum SGD: the head's peak RSS above
    the baseline against the plan's model-parallel total (see benchmarks/check_plan_memory.py)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "check_plan_memory.py"), "--classes", "1000000",
         "--steps", "2", "--json"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.stdout, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 2
    for row in rows:
        assert abs(row["ratio"] - 1) <= 0.15, row
    assert result.returncode == 0


@pytest.mark.parametrize("nbytes, text", [(1335.2 * 2**30, "1,335 GiB"), (999.96 * 2**30, "1,000 GiB"),
                                          (19.07 * 2**30, "19.07 GiB"), (100 * 2**20, "100.0 MiB"),
                                          (1536, "1.500 KiB"), (5, "5 B")])
def test_sizes_keep_every_digit(nbytes, text):
    """Four significant digits; from a thousand up every digit before the point (no ``1335. GiB``)."""
    assert format_bytes(nbytes) == text



def test_auto_stores_the_logits_while_they_fit_the_budget_then_recomputes():
    """``auto`` keeps the (B, C_r) buffer up to ``logits_budget_mb`` and a tile beyond, as the head
    decides; the model's logits term and total follow the mode."""
    base = dict(num_classes=1_000_000, embedding_size=128, world_size=2, local_batch=128)
    small = make_plan(PlanInputs(**base)).method("model_parallel")
    assert small.logits_mode == "store" and small.memory.logits == 256 * 500_000 * 4
    assert small.memory.normalized_rows == 16384 * 128 * 4, "a CUDA column tile's scaled rows"
    big = make_plan(PlanInputs(**base, logits_budget_mb=400)).method("model_parallel")
    assert big.logits_mode == "recompute" and big.memory.logits == 128 * 16384 * 4
    assert small.memory.total - big.memory.total == small.memory.logits - big.memory.logits
    assert make_plan(PlanInputs(**base, logits="recompute")).method("model_parallel").logits_mode == "recompute"
    assert make_plan(PlanInputs(**base, logits_budget_mb=400)).method("data_parallel").logits_mode == "store"
    with pytest.raises(ValueError, match="logits must be one of store, recompute, auto"):
        PlanInputs(**base, logits="keep")


def test_the_planner_and_the_head_pick_the_same_mode():
    from hybridfc import ClassParallelFC

    head = ClassParallelFC(1000, 4, logits_budget_mb=1)
    for batch in (200, 300):
        plan = make_plan(PlanInputs(num_classes=1000, embedding_size=4, world_size=1, local_batch=batch,
                                    logits_budget_mb=1))
        assert plan.method("model_parallel").logits_mode == head.logits_mode(batch, 1000)


def test_the_cli_says_what_auto_keeps_and_takes_a_mode(capsys):
    args = ["plan", "--num-classes", "1000000", "--embedding-size", "128", "--world-size", "2", "--local-batch", "2048"]
    auto = run_cli(capsys, *args)
    assert re.search(r"logits kept \(auto\)\s+store\s+recompute\s+recompute", auto)
    stored = run_cli(capsys, *args, "--logits", "store", "--logits-budget-mb", "1")
    assert re.search(r"logits kept \(store\)\s+store\s+store\s+store", stored)
    assert "--logits: invalid choice: 'keep'" in cli_error(capsys, *args, "--logits", "keep")
