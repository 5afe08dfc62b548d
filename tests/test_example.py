"""``examples/train.py`` as a new user meets it, without a launcher: a schedule that fits the run,
a progress line that says what its numbers are, and a bad input told in one line per rank."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import hybridfc

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
spec = importlib.util.spec_from_file_location("example_train", TRAIN)
train = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = train      # its dataclasses look their module up
spec.loader.exec_module(train)


def schedule(warmup: int | None, kind: str = "WarmupDecayLR") -> dict:
    params = {"warmup_min_lr": 0, "warmup_max_lr": 0.002}
    if warmup is not None:
        params["warmup_num_steps"] = warmup
    return {"train_micro_batch_size_per_gpu": 64, "scheduler": {"type": kind, "params": params}}


def test_a_warm_up_longer_than_half_the_run_is_shortened_and_said():
    """600 images, 2 ranks of 64, 4 epochs: 20 steps; cpu_images.json's 200-step warm-up would end
    the run at a tenth of the peak lr (it ended at chance)."""
    config = schedule(200)
    train.set_schedule_length(config, num_samples=600, epochs=4, max_steps=None, world_size=2)
    assert config["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 0.002, "warmup_num_steps": 10,
                                             "total_num_steps": 20}


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupCosineLR"])
def test_deepspeeds_default_warm_up_is_fitted_too(kind):
    """No warmup_num_steps means DeepSpeed's 1,000."""
    config = schedule(None, kind)
    train.set_schedule_length(config, num_samples=600, epochs=4, max_steps=None, world_size=2)
    assert config["scheduler"]["params"]["warmup_num_steps"] == 10


def test_a_warm_up_that_fits_is_kept():
    config = schedule(200)
    train.set_schedule_length(config, num_samples=1433, epochs=50, max_steps=480, world_size=2)
    assert config["scheduler"]["params"]["warmup_num_steps"] == 200
    assert config["scheduler"]["params"]["total_num_steps"] == 480


class _Engine:
    global_steps = 700
    last_evaluation = {1: 0.51234, 5: 0.9}
    last_evaluated_step = 625


def test_the_progress_line_names_the_step_its_accuracies_come_from():
    """Accuracies stay on the line between evaluations: the key says when they were measured."""
    evaluator = train.Evaluator(_Engine(), None, [], None)
    assert evaluator.postfix() == {"held-out@625": "top1 0.512 top5 0.900"}


@pytest.mark.parametrize("error", [hybridfc.InputError("hybridfc: bad input to ClassParallelFC on rank 1: label 7\n"
                                                       "is out of range [0, 5)"),
                                   hybridfc.ConfigError("hybridfc.margin.sclae: unknown key")])
def test_a_bad_input_is_one_line_on_stderr_and_exit_code_1(monkeypatch, capsys, error):
    def run(args):
        raise error

    monkeypatch.setattr(train, "run", run)
    monkeypatch.setattr(train, "parse_args", lambda: None)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        train.main()
    assert exited.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"examples/train.py: rank 1: {type(error).__name__}: {' | '.join(str(error).splitlines())}"]
