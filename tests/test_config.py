"""Tests of the ``"hybridfc"`` config section: schema, error messages, loading, fingerprint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hybridfc.config import (
    ArcFaceMarginConfig,
    CommunicationConfig,
    CombinedMarginConfig,
    ConfigError,
    CosFaceMarginConfig,
    FullSelectionConfig,
    HFSelectionConfig,
    HybridFCConfig,
    KNNSelectionConfig,
    PartialSelectionConfig,
    SGDOptimizerConfig,
    SGDParams,
    SoftmaxMarginConfig,
    config_fingerprint,
    load_ds_config,
    parse_communication,
    parse_head_optimizer,
    parse_hybridfc_section,
    parse_margin,
    parse_selection,
    split_ds_config,
)
from hybridfc.head import ClassParallelFC

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"num_classes": 1000, "embedding_size": 64}
FULL = {
    "num_classes": 1000,
    "embedding_size": 64,
    "seed": 7,
    "margin": {"type": "combined", "scale": 32.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
    "selection": {"type": "knn", "budget": 0.2, "k": 8, "rebuild_interval": 50, "rebuild_delay": 5,
                  "late_rebuild": "wait", "index": "exact", "hard_fraction": 0.75, "min_recall": 0.95, "sampling_correction": False},
    "storage_dtype": "bf16",
    "logits": "recompute",
    "logits_budget_mb": 512.0,
    "optimizer": {"type": "adamw", "params": {"lr": 0.2, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 1e-4}},
    "gradient_clipping": 5.0,
    "evaluation": {"interval": 100, "top_k": [1, 5]},
    "communication": {"chunks": 4, "grad_topk": 0.01, "grad_topk_warmup_steps": 200, "grad_topk_value_dtype": "bf16",
                      "grad_topk_momentum_correction": True},
    "max_consecutive_skips": 5,
    "warm_start": {"imprint": True, "refresh_interval": 500},
    "schedule": {"plateau": {"patience": 3, "factor": 0.2, "threshold": 0.01, "min_factor": 0.01},
                 "batch_scaling": {"reference_batch": 256, "rule": "sqrt"}},
}


def section(**overrides: Any) -> dict[str, Any]:
    """The minimal section with some keys replaced or added."""
    return {**MINIMAL, **overrides}


def margin(**keys: Any) -> dict[str, Any]:
    """The minimal section with this margin."""
    return section(margin=keys)


def sgd(**keys: Any) -> dict[str, Any]:
    """The minimal section with these SGD params."""
    return section(optimizer={"params": keys})


def problems(bad: Any) -> list[str]:
    """The lines of the ConfigError that parsing ``bad`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_hybridfc_section(bad)
    return str(info.value).splitlines()


def test_defaults_are_filled() -> None:
    cfg = parse_hybridfc_section(MINIMAL)
    assert isinstance(cfg, HybridFCConfig)
    assert cfg.num_classes == 1000 and cfg.embedding_size == 64
    assert cfg.seed == 0
    assert cfg.margin == ArcFaceMarginConfig(scale=64.0, margin=0.5)
    assert cfg.selection == FullSelectionConfig(type="full")
    assert cfg.storage_dtype == "fp32"
    assert cfg.optimizer == SGDOptimizerConfig(
        type="sgd", params=SGDParams(lr=0.1, momentum=0.9, weight_decay=5e-4)
    )
    assert cfg.gradient_clipping == 0.0
    assert cfg.communication.chunks == 1
    assert cfg.max_consecutive_skips == 10


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"type": "softmax"}, SoftmaxMarginConfig()),
        ({"type": "cosface"}, CosFaceMarginConfig(scale=64.0, margin=0.35)),
        ({"type": "cosface", "scale": 30, "margin": 0.4}, CosFaceMarginConfig(scale=30.0, margin=0.4)),
        ({"type": "arcface"}, ArcFaceMarginConfig(scale=64.0, margin=0.5)),
        ({"type": "arcface", "scale": 64, "margin": 0}, ArcFaceMarginConfig(scale=64.0, margin=0.0)),
        ({"type": "combined"}, CombinedMarginConfig(scale=64.0, m1=1.0, m2=0.5, m3=0.0)),
        ({"type": "combined", "m1": 0.9, "m2": 0.4, "m3": 0.15},
         CombinedMarginConfig(scale=64.0, m1=0.9, m2=0.4, m3=0.15)),
    ],
)
def test_each_margin_type_parses(given: dict[str, Any], expected: Any) -> None:
    cfg = parse_hybridfc_section(section(margin=given))
    assert cfg.margin == expected
    assert type(cfg.margin) is type(expected)


def test_ints_are_accepted_for_floats_and_converted() -> None:
    cfg = parse_hybridfc_section({**margin(type="arcface", scale=64), "gradient_clipping": 1})
    assert isinstance(cfg.margin.scale, float) and isinstance(cfg.gradient_clipping, float)


@pytest.mark.parametrize("source", [MINIMAL, FULL])
def test_round_trip(source: dict[str, Any]) -> None:
    cfg = parse_hybridfc_section(source)
    assert parse_hybridfc_section(cfg.model_dump()) == cfg
    assert parse_hybridfc_section(json.loads(json.dumps(cfg.model_dump()))) == cfg


def test_full_section_keeps_every_value() -> None:
    assert parse_hybridfc_section(FULL).model_dump() == FULL


def test_config_is_frozen() -> None:
    cfg = parse_hybridfc_section(MINIMAL)
    with pytest.raises(ValueError):
        cfg.num_classes = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (margin(type="arcface", scale=-1), "hybridfc.margin.scale: must be > 0 (got -1)"),
        (margin(type="cosface", scale=0), "hybridfc.margin.scale: must be > 0 (got 0)"),
        (margin(type="cosface", margin=-0.1), "hybridfc.margin.margin: must be >= 0"),
        (margin(type="arcface", margin=3.2), "hybridfc.margin.margin: must be < 3.14159"),
        (margin(type="combined", m1=0), "hybridfc.margin.m1: must be > 0 (got 0)"),
        (margin(type="combined", m2=-1), "hybridfc.margin.m2: must be >= 0 (got -1)"),
        (margin(type="combined", m3=-1), "hybridfc.margin.m3: must be >= 0 (got -1)"),
        ({"num_classes": 0, "embedding_size": 4}, "hybridfc.num_classes: must be >= 1 (got 0)"),
        (section(embedding_size=-3), "hybridfc.embedding_size: must be >= 1 (got -3)"),
        (section(seed=-1), "hybridfc.seed: must be >= 0 (got -1)"),
        (section(gradient_clipping=-0.5), "hybridfc.gradient_clipping: must be >= 0 (got -0.5)"),
        (section(gradient_clipping=math.inf),
         "hybridfc.gradient_clipping: must be a finite number (got Infinity)"),
        (margin(type="arcface", scale=math.nan), "hybridfc.margin.scale: must be a finite"),
        (section(evaluation={"interval": -1}), "hybridfc.evaluation.interval: must be >= 0 (got -1)"),
        (section(evaluation={"top_k": [1, 0]}), "hybridfc.evaluation.top_k.1: must be >= 1 (got 0)"),
        (sgd(lr=0), "hybridfc.optimizer.params.lr: must be > 0 (got 0)"),
        (sgd(momentum=1),
         "hybridfc.optimizer.params.momentum: must be < 1 (got 1)"),
        (sgd(weight_decay=-1),
         "hybridfc.optimizer.params.weight_decay: must be >= 0 (got -1)"),
        (section(optimizer={"type": "lamb"}),
         'hybridfc.optimizer.type: "lamb" is not one of "sgd", "adam", "adamw"'),
        (section(selection={"type": "topk"}),
         'hybridfc.selection.type: "topk" is not one of "full", "partial", "knn", "hf"'),
        (section(selection={"type": "knn", "budget": 0}),
         "hybridfc.selection.budget: must be a row count (an integer >= 1) or a rate of the shard"),
        (section(selection={"type": "partial", "budget": 1.5}),
         "hybridfc.selection.budget: must be a row count (an integer >= 1) or a rate of the shard"),
        (section(selection={"type": "knn", "kk": 3}),
         "hybridfc.selection.kk: unknown key; allowed keys: budget, hard_fraction, index, k, late_rebuild, "
         "min_recall, rebuild_delay, rebuild_interval, sampling_correction, type"),
        (section(selection={"type": "partial", "k": 3}),
         "hybridfc.selection.k: unknown key; allowed keys: budget, sampling_correction, type"),
        (section(selection={"type": "hf", "hard_fraction": 0}),
         "hybridfc.selection.hard_fraction: must be > 0 (got 0)"),
        (section(selection={"type": "knn", "hard_fraction": 1.5}),
         "hybridfc.selection.hard_fraction: must be <= 1 (got 1.5)"),
        (section(selection={"type": "knn", "min_recall": 0}),
         "hybridfc.selection.min_recall: must be > 0 (got 0)"),
        (section(selection={"type": "hf", "min_recall": 1.2}),
         "hybridfc.selection.min_recall: must be <= 1 (got 1.2)"),
        (section(selection={"type": "hf", "index": "annoy"}),
         'hybridfc.selection.index: "annoy" is not one of "auto", "exact", "ivf", "hnsw"'),
        (section(selection={"type": "knn", "rebuild_interval": 10, "rebuild_delay": 11}),
         "hybridfc.selection: rebuild_delay (11) must be at most rebuild_interval (10)"),
        (section(storage_dtype="fp8"),
         'hybridfc.storage_dtype: "fp8" is not one of "fp32", "bf16", "fp16"'),
        (section(optimizer={"type": "adamw", "params": {"betas": [0.9, 1.0]}}),
         "hybridfc.optimizer.params.betas.1: must be < 1 (got 1.0)"),
        (margin(type="arc"),
         'hybridfc.margin.type: "arc" is not one of "softmax", "cosface", "arcface", "combined"'),
        (margin(scale=64),
         'hybridfc.margin.type: required key is missing; one of "softmax", "cosface", "arcface"'),
        ({"embedding_size": 4}, "hybridfc.num_classes: required key is missing"),
        (section(margin=5), "hybridfc.margin: must be an object (got 5)"),
        (section(selection="full"), 'hybridfc.selection: must be an object (got "full")'),
        (section(optimizer={"params": 0.1}),
         "hybridfc.optimizer.params: must be an object (got 0.1)"),
        (section(schedule={"batch_scaling": {"reference_batch": 0}}),
         "hybridfc.schedule.batch_scaling.reference_batch: must be >= 1 (got 0)"),
        (section(schedule={"batch_scaling": {"reference_batch": 256, "rule": "square"}}),
         'hybridfc.schedule.batch_scaling.rule: "square" is not one of "linear", "sqrt"'),
        (section(schedule={"batch_scaling": {"rule": "linear"}}),
         "hybridfc.schedule.batch_scaling.reference_batch: required key is missing"),
    ],
)
def test_bad_value_names_key_value_and_allowed(bad: dict[str, Any], expected: str) -> None:
    lines = problems(bad)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (margin(type="arcface", sclae=64),
         "hybridfc.margin.sclae: unknown key; allowed keys: margin, scale, type"),
        (margin(type="softmax", scale=64),
         "hybridfc.margin.scale: unknown key; allowed keys: type"),
        (margin(type="combined", m4=0),
         "hybridfc.margin.m4: unknown key; allowed keys: m1, m2, m3, scale, type"),
        (section(num_clases=10),
         "hybridfc.num_clases: unknown key; allowed keys: communication, embedding_size, evaluation, "
         "gradient_clipping, logits, logits_budget_mb, margin, max_consecutive_skips, num_classes, optimizer, "
         "schedule, seed, selection, storage_dtype, warm_start"),
        (section(selection={"type": "full", "budget": 0.1}),
         "hybridfc.selection.budget: unknown key; allowed keys: type"),
        (sgd(betas=[0.9, 0.99]),
         "hybridfc.optimizer.params.betas: unknown key; allowed keys: lars_coefficient, lr, momentum, weight_decay"),
        (section(optimizer={"lr": 0.1}),
         "hybridfc.optimizer.lr: unknown key; allowed keys: params, type"),
    ],
)
def test_unknown_key_lists_allowed_keys(bad: dict[str, Any], expected: str) -> None:
    assert expected in problems(bad)


@pytest.mark.parametrize("value", [True, False, "10", 1.5, 10.0, None, [10]])
@pytest.mark.parametrize("key", ["num_classes", "embedding_size", "seed"])
def test_ints_reject_bools_strings_and_floats(key: str, value: Any) -> None:
    lines = problems(section(**{key: value}))
    assert lines == [f"hybridfc.{key}: must be an integer (got {json.dumps(value)})"]


@pytest.mark.parametrize("value", [True, "64", None])
def test_floats_reject_bools_and_strings(value: Any) -> None:
    lines = problems(margin(type="cosface", scale=value))
    assert lines == [f"hybridfc.margin.scale: must be a number (got {json.dumps(value)})"]


def test_every_problem_is_reported_one_per_line() -> None:
    bad = {
        "embedding_size": True,
        "seed": -2,
        "margin": {"type": "arcface", "scale": -1, "sclae": 3},
        "selection": {"type": "knn", "k": 0},
        "optimizer": {"params": {"lr": "fast", "momentum": 2}},
        "gradient_clipping": -1,
        "communication": {"chunks": 0, "grad_topk": 0},
    }
    lines = problems(bad)
    keys = [line.split(":", 1)[0] for line in lines]
    assert sorted(keys) == sorted([
        "hybridfc.num_classes",
        "hybridfc.embedding_size",
        "hybridfc.seed",
        "hybridfc.margin.scale",
        "hybridfc.margin.sclae",
        "hybridfc.selection.k",
        "hybridfc.optimizer.params.lr",
        "hybridfc.optimizer.params.momentum",
        "hybridfc.gradient_clipping",
        "hybridfc.communication.chunks",
        "hybridfc.communication.grad_topk",
    ])


@pytest.mark.parametrize("bad", [None, [], "hybridfc", 3])
def test_section_must_be_a_dict(bad: Any) -> None:
    assert problems(bad) == [f"hybridfc: must be an object (got {json.dumps(bad)})"]


def test_non_string_key_is_reported() -> None:
    assert "hybridfc.3: keys must be strings (got 3)" in problems({**MINIMAL, 3: 4})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_load_ds_config_from_dict_is_a_deep_copy() -> None:
    source = {"train_batch_size": 8, "hybridfc": dict(MINIMAL)}
    loaded = load_ds_config(source)
    assert loaded == source
    loaded["hybridfc"]["num_classes"] = 1
    assert source["hybridfc"]["num_classes"] == 1000


def test_load_ds_config_from_file(tmp_path: Path) -> None:
    content = {"train_micro_batch_size_per_gpu": 4, "hybridfc": FULL}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content, indent=2))
    assert load_ds_config(path) == content
    assert load_ds_config(str(path)) == content


def test_load_ds_config_reads_files_as_deepspeed_does(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{\n  // Hjson, like DeepSpeed\n  "hybridfc": {"num_classes": 10,},\n}\n')
    assert load_ds_config(path) == {"hybridfc": {"num_classes": 10}}


def test_load_ds_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "ds.json"
    with pytest.raises(ConfigError, match="DeepSpeed config file not found: .*nope.*ds.json"):
        load_ds_config(path)


def test_load_ds_config_broken_json_names_path_and_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "hybridfc": {"num_classes": [10}\n}\n')
    with pytest.raises(ConfigError) as info:
        load_ds_config(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "column" in message


def test_load_ds_config_top_level_must_be_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load_ds_config(path)


def test_load_ds_config_rejects_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"hybridfc": {"num_classes": 10}, "hybridfc": {"num_classes": 20}}')
    with pytest.raises(ConfigError, match='duplicate keys .*"hybridfc"'):
        load_ds_config(path)


def test_load_ds_config_rejects_other_types() -> None:
    with pytest.raises(ConfigError, match="dict or the path of a JSON file"):
        load_ds_config(42)  # type: ignore[arg-type]


def test_split_ds_config_with_section() -> None:
    ds_config = {"train_batch_size": 8, "zero_optimization": {"stage": 2}, "hybridfc": FULL}
    rest, cfg = split_ds_config(ds_config)
    assert rest == {"train_batch_size": 8, "zero_optimization": {"stage": 2}}
    assert cfg == parse_hybridfc_section(FULL)
    assert "hybridfc" in ds_config
    rest["zero_optimization"]["stage"] = 3
    assert ds_config["zero_optimization"]["stage"] == 2


def test_split_ds_config_without_section_shows_example() -> None:
    with pytest.raises(ConfigError) as info:
        split_ds_config({"train_batch_size": 8})
    message = str(info.value)
    assert 'top-level "hybridfc" section' in message
    assert "num_classes" in message and "embedding_size" in message
    assert '"hybridfc": {"num_classes": ' in message


def test_split_ds_config_reports_bad_section() -> None:
    with pytest.raises(ConfigError, match="hybridfc.embedding_size: required key is missing"):
        split_ds_config({"hybridfc": {"num_classes": 10}})


def test_fingerprint_is_a_63_bit_int_equal_for_equal_configs() -> None:
    first = config_fingerprint(parse_hybridfc_section(margin(type="arcface", scale=64)))
    second = config_fingerprint(parse_hybridfc_section(MINIMAL))
    assert isinstance(first, int) and 0 <= first < 2**63
    assert first == second


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from hybridfc.config import config_fingerprint, parse_hybridfc_section\n"
        f"print(config_fingerprint(parse_hybridfc_section({FULL!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"},
    )
    assert int(result.stdout) == config_fingerprint(parse_hybridfc_section(FULL))


@pytest.mark.parametrize(
    "changed",
    [
        {"num_classes": 1001},
        {"embedding_size": 65},
        {"seed": 8},
        {"margin": {**FULL["margin"], "scale": 32.5}},
        {"margin": {**FULL["margin"], "m1": 0.99}},
        {"margin": {**FULL["margin"], "m2": 0.31}},
        {"margin": {**FULL["margin"], "m3": 0.21}},
        {"margin": {"type": "arcface"}},
        {"margin": {"type": "cosface"}},
        {"margin": {"type": "softmax"}},
        {"optimizer": {"type": "adamw", "params": {**FULL["optimizer"]["params"], "lr": 0.21}}},
        {"optimizer": {"type": "adamw", "params": {**FULL["optimizer"]["params"], "eps": 2e-6}}},
        {"optimizer": {"type": "adamw", "params": {**FULL["optimizer"]["params"], "weight_decay": 2e-4}}},
        {"optimizer": {"type": "adam", "params": FULL["optimizer"]["params"]}},
        {"selection": {**FULL["selection"], "budget": 0.25}},
        {"selection": {**FULL["selection"], "type": "hf"}},
        {"storage_dtype": "fp16"},
        {"gradient_clipping": 5.5},
        {"communication": {"chunks": 3}},
        {"max_consecutive_skips": 0},
    ],
)
def test_fingerprint_changes_when_any_value_changes(changed: dict[str, Any]) -> None:
    base = config_fingerprint(parse_hybridfc_section(FULL))
    assert config_fingerprint(parse_hybridfc_section({**FULL, **changed})) != base


def _readme_rows() -> set[str]:
    """The keys of the README's ``"hybridfc"`` table: ``| `key` |`` at the start of a row."""
    return {line.split("`")[1] for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `")}


def test_readme_documents_every_key_of_the_section():
    """Every key of the section and every key of each selection type has a row in the README."""
    rows = _readme_rows()
    assert set(HybridFCConfig.model_fields) <= rows
    for model in (PartialSelectionConfig, KNNSelectionConfig, HFSelectionConfig):
        assert {f"selection.{key}" for key in model.model_fields if key != "type"} <= rows, model.__name__
    assert {f"communication.{key}" for key in CommunicationConfig.model_fields} <= rows


def test_parsed_sections_reach_the_head_as_they_are():
    """``initialize`` hands the typed sections to the head and its optimizer (no dict round trip);
    a section of the wrong kind is a ConfigError naming the parameter."""
    cfg = parse_hybridfc_section({"num_classes": 10, "embedding_size": 4,
                                  "margin": {"type": "cosface", "scale": 16.0, "margin": 0.1},
                                  "selection": {"type": "partial", "budget": 0.5}})
    assert parse_margin(cfg.margin) is cfg.margin
    assert parse_selection(cfg.selection) is cfg.selection
    assert parse_head_optimizer(cfg.optimizer) is cfg.optimizer
    assert parse_communication(cfg.communication) is cfg.communication
    with pytest.raises(ConfigError, match="margin: got a parsed PartialSelectionConfig section"):
        parse_margin(cfg.selection)
    head = ClassParallelFC(10, 4, margin=cfg.margin, selection=cfg.selection,
                           communication=cfg.communication)
    assert (head.margin.scale, head.margin.m3) == (16.0, 0.1) and head.selection.budget == 5


@pytest.mark.parametrize("key, value", [("grad_topk_value_dtype", "fp32"), ("grad_topk_momentum_correction", True),
                                        ("grad_topk_warmup_steps", 0)])
def test_grad_topk_keys_without_grad_topk_are_errors(key: str, value: Any) -> None:
    """They would parse and do nothing while DeepSpeed reduces densely."""
    with pytest.raises(ConfigError, match=rf"hybridfc\.communication: {key} without grad_topk: no effect"):
        parse_hybridfc_section({**MINIMAL, "communication": {key: value}})
    parsed = parse_hybridfc_section({**MINIMAL, "communication": {key: value, "grad_topk": 0.01}})
    assert getattr(parsed.communication, key) == value

