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


def _write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_merges_first_child_overrides_and_sections_merge_key_by_key(tmp_path):
    _write(tmp_path, "fam/base.yaml", "model:\n  size: AR-L\n  n_kv_head: 4\n"
           "train:\n  lr: 0.001\n  max_steps: 10\n")
    child = _write(tmp_path, "run.yaml", "base: fam/base.yaml\ntrain:\n  max_steps: 20\n")
    cfg = load_config(RunConfig, [child], ["data.codes=x"])
    assert cfg.train.max_steps == 20 and cfg.train.lr == 0.001  # child wins; the rest of train kept
    assert cfg.model.size == "AR-L" and cfg.model.n_kv_head == 4
    # the command line still comes last, and `base` is the loader's, not a config key
    assert load_config(RunConfig, [child], ["data.codes=x", "train.lr=0.5"]).train.lr == 0.5
    assert not any(line.startswith("base:") for line in to_yaml(cfg).splitlines())


def test_a_base_of_a_base_and_a_list_of_bases_merge_in_order(tmp_path):
    _write(tmp_path, "a/grand.yaml", "train:\n  lr: 0.1\n  max_steps: 1\n  log_every: 7\n")
    # relative to the file that names it: a/sub/parent.yaml -> a/grand.yaml
    _write(tmp_path, "a/sub/parent.yaml", "base: ../grand.yaml\ntrain:\n  max_steps: 2\n")
    _write(tmp_path, "a/other.yaml", "base: grand.yaml\ntrain:\n  lr: 0.3\n")
    child = _write(tmp_path, "a/child.yaml", "base: [sub/parent.yaml, other.yaml]\ndata:\n  codes: c\n")
    t = load_config(RunConfig, [child]).train
    # grand, parent, (grand again is skipped: merged once), other, child
    assert (t.lr, t.max_steps, t.log_every) == (0.3, 2, 7)


def test_base_cycle_missing_file_and_bad_value_name_the_file_and_the_base(tmp_path):
    a = _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: base a\.yaml forms a cycle \(a\.yaml -> b\.yaml -> a\.yaml\)"):
        load_config(RunConfig, [a])
    selfish = _write(tmp_path, "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="self.yaml: base self.yaml forms a cycle"):
        load_config(RunConfig, [selfish])
    lost = _write(tmp_path, "lost.yaml", "base: fam/nope.yaml\n")
    with pytest.raises(ConfigError, match=r"lost\.yaml: base file not found: fam/nope\.yaml"):
        load_config(RunConfig, [lost])
    for value in ("3", "{x: 1}", "[a.yaml, 2]", "''", "null"):
        bad = _write(tmp_path, "bad.yaml", f"base: {value}\n")
        with pytest.raises(ConfigError, match=r"bad\.yaml: base=.*expected a file path"):
            load_config(RunConfig, [bad])


def test_unknown_key_in_a_base_names_the_base_file(tmp_path):
    _write(tmp_path, "families/fam.yaml", "train:\n  max_stpes: 3\n")
    child = _write(tmp_path, "run.yaml", "base: families/fam.yaml\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"families/fam\.yaml: unknown config key 'train\.max_stpes'"):
        load_config(RunConfig, [child], ["data.codes=x"])


def test_every_family_base_is_used_by_a_config():
    from common.config_files import files_to_merge
    from conftest import ROOT

    configs = ROOT / "configs"
    families = {p.resolve() for p in configs.rglob("families/*.yaml")}
    assert families, "no family bases found"
    used = {path.resolve() for p in configs.rglob("*.yaml") if "families" not in p.parts
            for path, _ in files_to_merge(p)}
    assert not families - used, f"family bases no config uses: {sorted(families - used)}"


def test_help_gives_every_field_its_comment_inherited_ones_too():
    from sampling.run import SampleRunConfig

    for schema in (RunConfig, SampleRunConfig):
        silent = [line for line in describe(schema) if line.rstrip().endswith("#")]
        assert not silent, silent
    assert any("softmax temperature" in line for line in describe(SampleRunConfig))  # DrawSettings'
