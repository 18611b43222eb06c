from __future__ import annotations

from pathlib import Path

import pytest

from sft_engine.config import ConfigError, MaskStrategy, PipelineConfig, apply_overrides, load_config

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)


def test_demo_config_values() -> None:
    cfg = load_config(CONF / "demo.yaml")
    assert cfg.model == "smollm2-135m"
    assert cfg.train.zero_stage == 2
    assert cfg.prepare.mask is MaskStrategy.ALL_ASSISTANT
    assert [s.name for s in cfg.curate.sources] == ["chitchat", "tasks"]


def test_overrides_parse_yaml_values_and_nest() -> None:
    cfg = load_config(CONF / "demo.yaml", ["train.lr=3e-5", "train.grad_clip=null", "model=/tmp/m", "curate.sources.1.limit=7"])
    assert cfg.train.lr == 3e-5
    assert cfg.train.grad_clip is None
    assert cfg.model == "/tmp/m"
    assert cfg.curate.sources[1].limit == 7
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_unknown_key_names_key_and_suggests_fix() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(CONF / "demo.yaml", ["train.lrr=3"])
    msg = str(exc.value)
    assert "unknown key 'train.lrr'. Did you mean 'train.lr'?" in msg
    assert "Valid keys here: attn_implementation, betas," in msg


def test_bad_value_names_key_and_what_it_accepts() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(CONF / "demo.yaml", ["prepare.mask=assistant_only", "train.zero_stage=4"])
    msg = str(exc.value)
    assert "bad value for 'prepare.mask'" in msg
    assert "Accepts: all_assistant, last_assistant, everything." in msg
    assert "bad value for 'train.zero_stage'" in msg and "got 4" in msg


def test_source_must_have_exactly_one_origin() -> None:
    with pytest.raises(ConfigError, match="set exactly one of 'path'"):
        load_config(None, ["curate.sources=[{name: x}]"])


def test_missing_file_and_bad_override_form() -> None:
    with pytest.raises(ConfigError, match="does not exist; pass --config conf/demo.yaml"):
        load_config("conf/nope.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(CONF / "demo.yaml", ["train.lr"])
