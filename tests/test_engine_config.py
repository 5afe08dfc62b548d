"""Start-up checks of ``hybridfc.initialize`` that need no DeepSpeed engine: reading the config
and the cross-rank agreement on the ``"hybridfc"`` section."""

import argparse
import json

import pytest

from distributed import run_distributed
from hybridfc.config import ConfigError, parse_hybridfc_section
from hybridfc import initialize
from hybridfc.runtime.initialize import check_same_config, read_ds_config


def _agreement_worker(rank: int, world_size: int, classes_by_rank: list[int]) -> str:
    cfg = parse_hybridfc_section({"num_classes": classes_by_rank[rank], "embedding_size": 8})
    check_same_config(cfg, None)
    return "agreed"


def test_same_config_on_every_rank_passes():
    assert run_distributed(_agreement_worker, 3, args=([100, 100, 100],)) == ["agreed"] * 3


def test_config_differing_on_one_rank_fails_on_every_rank():
    results = run_distributed(_agreement_worker, 3, args=([100, 100, 99],), timeout=60, allow_errors=True)
    for text in (str(r) for r in results):
        assert "ConfigError" in text and "differs across ranks" in text
        assert "rank 2: num_classes=99" in text


def test_config_read_from_args_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "hybridfc": {"num_classes": 5, "embedding_size": 3}}))
    config = read_ds_config(argparse.Namespace(deepspeed_config=str(path)), None, None)
    assert config["hybridfc"]["num_classes"] == 5


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="not found: .*nope.json"):
        read_ds_config(argparse.Namespace(deepspeed_config=str(missing)), None, None)


def test_no_config_and_two_configs_are_errors():
    with pytest.raises(ConfigError, match="no DeepSpeed config"):
        read_ds_config(argparse.Namespace(deepspeed_config=None), None, None)
    with pytest.raises(ConfigError, match="more than once"):
        read_ds_config(argparse.Namespace(deepspeed_config="a.json"), {"x": 1}, None)


@pytest.mark.parametrize("warm_start", [{"imprint": True}, {"refresh_interval": 5}])
def test_warm_start_without_training_data_fails_at_initialize(warm_start):
    """Imprinting reads the training data: without it, an error before anything starts (it used
    to come at the first forward, or at step refresh_interval)."""
    config = {"train_micro_batch_size_per_gpu": 4,
              "hybridfc": {"num_classes": 10, "embedding_size": 4, "warm_start": warm_start}}
    key = next(iter(warm_start))
    with pytest.raises(ConfigError, match=rf"hybridfc\.warm_start\.{key}: .*pass training_data="):
        initialize(model=None, config=config)

