"""Config loading: YAML files merge in order, key=value overrides last, typos are errors."""

import pytest

from train_gen import RunConfig
from common.config import ConfigError, describe, from_yaml, load_config, to_yaml


def test_files_then_overrides_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  lr: 0.001\n  max_steps: 10\nmodel:\n  size: AR-B\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  max_steps: 20\n")
    cfg = load_config(RunConfig, [a, b], ["train.max_steps=30", "model.n_kv_head=4", "data.codes=x"])
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 30
    assert cfg.model.size == "AR-B" and cfg.model.n_kv_head == 4
    assert cfg.train.global_batch == 256  # untouched default


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("train:\n  lerning_rate: 0.1\n  max_stpes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, [f])
    msg = str(e.value)
    assert "typo.yaml" in msg and "max_stpes" in msg or "lerning_rate" in msg


def test_unknown_override_suggests_closest_key():
    with pytest.raises(ConfigError, match=r"train\.max_stpes.*train\.max_steps"):
        load_config(RunConfig, [], ["train.max_stpes=3"])


def test_wrong_type_and_invalid_choice_are_errors():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(RunConfig, [], ["train.lr=fast"])
    with pytest.raises(ConfigError, match="model.size"):
        load_config(RunConfig, [], ["model.size=AR-Huge", "data.codes=x"])
    with pytest.raises(ConfigError, match="data.codes' is required"):
        load_config(RunConfig, [], [])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, [], ["train.lr"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(RunConfig, [tmp_path / "nope.yaml"])


def test_yaml_round_trip_and_help_lists_comments():
    cfg = load_config(RunConfig, [], ["train.lr=0.5", "model.size=AR-L", "data.codes=x"])
    back = from_yaml(RunConfig, to_yaml(cfg))
    assert back == cfg
    lines = "\n".join(describe(RunConfig))
    assert "max_steps: int = 1000  # optimiser steps" in lines


def test_resume_identity_compares_what_the_checkpoint_recorded():
    """A setting added after a checkpoint was written (absent from it) does not block its
    resume; a recorded one that changed is listed by its dotted key."""
    from common.config import recorded_differences

    stored = {"model": {"dim": 64, "order": "raster"}, "train": {"lr": 0.001}}
    now = {"model": {"dim": 64, "order": "raster", "cell": 2}, "train": {"lr": 0.001}}
    assert recorded_differences(stored, now) == []
    now["train"]["lr"] = 0.01
    assert recorded_differences(stored, now) == ["train.lr: checkpoint 0.001, now 0.01"]
