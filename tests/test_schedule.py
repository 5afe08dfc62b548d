"""``PlateauLR``: when the multiplier drops, its floor, mode ``min``, resuming and bad arguments."""

from __future__ import annotations

import math

import pytest

from hybridfc.schedule import PlateauLR


def steps(plateau: PlateauLR, metrics: list[float]) -> list[bool]:
    return [plateau.step(metric) for metric in metrics]


def test_drops_exactly_after_patience_evaluations_without_improvement():
    plateau = PlateauLR(factor=0.5, patience=3, threshold=0.0)
    assert steps(plateau, [0.5, 0.5, 0.4, 0.5]) == [False, False, False, True]
    assert plateau.scale == 0.5 and plateau.drops == 1 and plateau.best == 0.5
    assert steps(plateau, [0.5, 0.5, 0.5]) == [False, False, True]
    assert plateau.scale == 0.25 and plateau.drops == 2


def test_an_improvement_resets_the_count():
    plateau = PlateauLR(factor=0.5, patience=2, threshold=0.0)
    assert steps(plateau, [0.5, 0.4, 0.6, 0.6, 0.7, 0.1, 0.7]) == [False] * 6 + [True]
    assert plateau.best == 0.7 and plateau.scale == 0.5


def test_threshold_is_an_absolute_margin():
    plateau = PlateauLR(patience=1, threshold=0.01)
    assert steps(plateau, [0.5, 0.505]) == [False, True]  # 0.505 is not more than 0.5 + 0.01
    assert plateau.best == 0.5
    assert steps(plateau, [0.5101]) == [False]
    assert plateau.best == 0.5101


def test_scale_stops_at_min_factor():
    plateau = PlateauLR(factor=0.1, patience=1, min_factor=1e-3)
    drops = steps(plateau, [0.5] + [0.5] * 6)
    assert drops == [False, True, True, True, False, False, False]
    assert plateau.scale == 1e-3 and plateau.drops == 3


def test_a_floor_between_two_drops_is_reached_and_kept():
    plateau = PlateauLR(factor=0.1, patience=1, min_factor=0.05)
    assert steps(plateau, [1.0, 1.0, 1.0, 1.0]) == [False, True, True, False]
    assert plateau.scale == 0.05


def test_mode_min():
    plateau = PlateauLR(mode="min", factor=0.5, patience=2, threshold=0.0)
    assert steps(plateau, [2.0, 1.0, 1.5, 0.9, 0.9, 1.0]) == [False, False, False, False, False, True]
    assert plateau.best == 0.9 and plateau.scale == 0.5


def test_a_resume_mid_plateau_continues_as_the_uninterrupted_schedule():
    metrics = [0.3, 0.5, 0.5, 0.4, 0.6, 0.6, 0.6, 0.6, 0.55, 0.6, 0.6, 0.7, 0.6]
    settings = dict(factor=0.5, patience=3, threshold=1e-3)
    uninterrupted = PlateauLR(**settings)
    expected = steps(uninterrupted, metrics)
    interrupted = PlateauLR(**settings)
    before = steps(interrupted, metrics[:7])  # two evaluations into a plateau
    assert interrupted.bad_evaluations == 2
    resumed = PlateauLR(**settings)
    resumed.load_state_dict(interrupted.state_dict())
    assert before + steps(resumed, metrics[7:]) == expected
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert uninterrupted.drops == 2


def test_state_dict_holds_the_progress():
    plateau = PlateauLR(mode="min", factor=0.5, patience=1)
    assert plateau.state_dict() == {"best": math.inf, "bad_evaluations": 0, "scale": 1.0, "drops": 0}
    steps(plateau, [1.0, 2.0])
    assert plateau.state_dict() == {"best": 1.0, "bad_evaluations": 0, "scale": 0.5, "drops": 1}


@pytest.mark.parametrize("name, value", [
    ("mode", "maximum"), ("factor", 0.0), ("factor", 1.0), ("factor", -0.5), ("factor", math.nan),
    ("patience", 0), ("patience", 1.5), ("patience", True), ("threshold", -1e-4), ("threshold", math.inf),
    ("min_factor", 0.0), ("min_factor", 1.5),
])
def test_bad_arguments_raise_naming_them(name, value):
    with pytest.raises(ValueError, match=name):
        PlateauLR(**{name: value})


def test_a_non_finite_metric_raises():
    with pytest.raises(ValueError, match="metric"):
        PlateauLR().step(math.nan)
