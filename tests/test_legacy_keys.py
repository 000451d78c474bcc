"""Flat model keys of earlier versions (model.order=cell, model.cell=2, model.cond_tokens=0, ...)
still read, with a note naming the new key: in config files, on the command line, in the
config a weights file stores, and in the identity a checkpoint records."""

import json

import pytest

from ar.checkpoint import check_identity
from ar.config import GeneratorSpec
from common.config import from_yaml, load_config, to_yaml
from train_gen import RunConfig

OLD = """model:
  condition: {condition}
  order: cell
  cell: 4
  inputs: shuffle
  shuffle_blocks: 1
  cond_tokens: 3
  cond_prefix: table
  cond_add: true
  text_loss: {loss}
"""
NEW = """model:
  condition: {condition}
  order: {{name: cell, cell: 4}}
  inputs: {{name: shuffle, shuffle_blocks: 1}}
  class_condition: {{tokens: 3, prefix: table, add: {add}}}
  text_condition: {{loss: {loss}, pooled: {pooled}}}
"""


@pytest.mark.parametrize("condition", ["class", "text"])
def test_a_file_with_the_old_flat_keys_resolves_as_the_new_sections(tmp_path, capsys, condition):
    text = condition == "text"
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(OLD.format(condition=condition, loss=0.5 if text else 0.0))
    new.write_text(NEW.format(condition=condition, loss=0.5 if text else 0.0, add=not text, pooled=text))
    capsys.readouterr()
    a = load_config(RunConfig, [old], ["data.codes=x"])
    notes = capsys.readouterr().err
    b = load_config(RunConfig, [new], ["data.codes=x"])
    assert to_yaml(a) == to_yaml(b)
    assert "old.yaml: model.cell is now model.order.cell" in notes
    where = "text_condition.pooled" if text else "class_condition.add"  # cond_add follows the condition
    assert f"model.cond_add is now model.{where}" in notes
    assert capsys.readouterr().err == ""  # the new form reads silently


def test_old_keys_on_the_command_line_land_in_the_sections_of_a_new_file(tmp_path):
    new = tmp_path / "new.yaml"
    new.write_text("model:\n  condition: text\n")
    cfg = load_config(RunConfig, [new], ["data.codes=x", "model.order=subsample", "model.subsample=4",
                                         "model.cond_add=true"])
    assert (cfg.model.order.name, cfg.model.order.subsample) == ("subsample", 4)
    assert cfg.model.text_condition.pooled and not cfg.model.class_condition.add  # the file's condition


def test_a_stored_spec_and_a_recorded_identity_of_the_old_form_still_load(tmp_path):
    spec = from_yaml(GeneratorSpec, "model:\n  order: cell\n  cell: 2\n  cond_tokens: 0\n  "
                                    "backbone: {adaln: true}\ngrid_h: 4\ngrid_w: 4\n")
    assert (spec.model.order.name, spec.model.order.cell, spec.model.class_condition.tokens) == ("cell", 2, 0)
    cfg = load_config(RunConfig, [], ["data.codes=x", "model.order.name=cell"])
    from dataclasses import asdict
    now = {"model": asdict(cfg.model)}
    old_model = {k: v for k, v in now["model"].items() if k not in ("order", "inputs", "class_condition",
                                                                     "text_condition")}
    old_model.update(order="cell", cell=2, subsample=2, inputs="auto", shuffle_blocks=2, cond_tokens=1,
                     cond_prefix="table", cond_add=False, text_loss=0.0)
    ckpt = tmp_path / "step_0000004"
    ckpt.mkdir()
    (ckpt / "identity.json").write_text(json.dumps({"model": old_model}))
    assert check_identity(ckpt, now, tmp_path)  # the same run: resumes
    old_model["cell"] = 4
    (ckpt / "identity.json").write_text(json.dumps({"model": old_model}))
    with pytest.raises(ValueError, match=r"model.order.cell: checkpoint 4, now 2"):
        check_identity(ckpt, now, tmp_path)
