"""Typed config: values checked by type and range, errors say where the value came from, YAML round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flows.sft_config import DataConfig, PipelineConfig
from infra.config import ConfigError, dump_yaml, from_dict, load_config, to_dict


@pytest.mark.parametrize("override,needle", [
    ("train.steps=-5", "train.steps=-5: input should be greater than or equal to 1"),
    ("train.steps=2.5", "train.steps=2.5: input should be a valid integer"),
    ("train.batch_size=0", "train.batch_size=0"),
    ("train.learning_rate=0", "train.learning_rate=0: input should be greater than 0"),
    ("train.save_every=0", "train.save_every=0"),
    ("train.eval_every=-1", "train.eval_every=-1"),
    ("model.rank=0", "model.rank=0"),
    ("model.compute_dtype=float64", "model.compute_dtype='float64'"),
    ("data.replay_fraction=1.0", "data.replay_fraction=1.0"),
    ("data.max_length=x", "data.max_length='x'"),
    ("tracking_uri=null", "tracking_uri=null: input should be a valid string"),
    ("data.replay=no", "data.replay=False: input should be a valid string"),
    ("trian.steps=3", "trian: unknown key (override trian.steps=3)"),
    ("train.stepz=3", "train.stepz: unknown key"),
])
def test_bad_override_is_refused_naming_field_and_origin(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, [override])
    assert needle in str(e.value)
    assert f"override {override}" in str(e.value)


def test_string_fields_keep_the_text_as_written() -> None:
    cfg = load_config(PipelineConfig, None, ["name=2024", "tracking_uri=", "data.replay=007.jsonl"])
    assert cfg.name == "2024" and cfg.tracking_uri == "" and cfg.data.replay == "007.jsonl"
    assert load_config(PipelineConfig, None, ["model.lora_alpha=null"]).model.lora_alpha is None
    assert load_config(PipelineConfig, None, ["eval.guards=[]"]).eval.guards == []


def test_yaml_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  batch_size: 8\n  steps: -5\n")
    with pytest.raises(ConfigError, match=rf"train.steps=-5: .* \({p}:4\)"):
        load_config(PipelineConfig, p)
    p.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+:\d+: invalid YAML"):
        load_config(PipelineConfig, p)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(PipelineConfig, tmp_path)


def test_yaml_with_bom_and_crlf_loads(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xef\xbb\xbftrain:\r\n  steps: 7\r\n")
    assert load_config(PipelineConfig, p).train.steps == 7


def test_several_errors_are_listed_together() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, ["model.rank=0", "train.steps=0"])
    assert "2 invalid values" in str(e.value) and "model.rank=0" in str(e.value) and "train.steps=0" in str(e.value)


def test_round_trip_and_dataclass_helpers_keep_working() -> None:
    cfg = load_config(PipelineConfig, None, ["train.steps=3", "data.replay="])
    again = from_dict(PipelineConfig, to_dict(cfg))
    assert again == cfg and again.train.steps == 3 and again.model.base_model == "tiny"
    d = dataclasses.replace(cfg.data, replay="builtin:prose")  # tasks/prepare_data.py does this
    assert isinstance(d, DataConfig) and d.replay == "builtin:prose"
    assert dataclasses.asdict(d)["replay"] == "builtin:prose"
    with pytest.raises(ValueError):  # replace validates too
        dataclasses.replace(cfg.train, steps=0)


def test_describe_comments_every_knob_and_stays_loadable() -> None:
    cfg = load_config(PipelineConfig, None, ["train.steps=9"])
    text = dump_yaml(cfg, describe=True)
    assert "steps: 9  # optimizer steps" in text and "learning_rate: 0.002  # peak learning rate" in text
    assert from_dict(PipelineConfig, yaml.safe_load(text)) == cfg
    assert yaml.safe_load(dump_yaml(cfg)) == to_dict(cfg)


def test_yaml_replaces_a_dict_knob_but_merges_sections(tmp_path) -> None:
    """`data.task_kwargs: {digits: 2}` for addition must not keep the default's `length` (the task refuses it),
    exactly as the `data.task_kwargs={digits: 2}` override does; sections still merge key by key."""
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  task: addition\n  task_kwargs: {digits: 2}\ntrain:\n  steps: 7\n")
    cfg = load_config(PipelineConfig, p)
    assert cfg.data.task_kwargs == {"digits": 2}
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.n_train) == (7, 32, 4000)
    assert load_config(PipelineConfig, None, ["data.task_kwargs={digits: 2}"]).data.task_kwargs == {"digits": 2}
