"""ModelConfig and the strict dict loader: unknown keys, coercion, presets, validation, save/load."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from featherlm.config import ModelConfig, coerce, from_dict, preset
from featherlm.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    amp: bool = False
    mode: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'n_layers'.*did you mean 'n_layer'") as info:
        ModelConfig.from_dict({"n_layers": 4})
    assert "model config" in str(info.value)


def test_unknown_key_in_nested_config_names_where():
    with pytest.raises(ConfigError, match=r"run\.optim: unknown key 'lrr'.*'lr'"):
        from_dict(Run, {"optim": {"lrr": 1}}, where="run")


def test_unknown_key_without_a_close_match():
    with pytest.raises(ConfigError, match="unknown key 'zzzzzz'") as info:
        ModelConfig.from_dict({"zzzzzz": 1})
    assert "did you mean" not in str(info.value)


def test_strings_are_coerced_by_annotation():
    run = from_dict(Run, {"steps": "12", "amp": "true", "optim": {"lr": "3e-4", "betas": "0.8, 0.99"}})
    assert run.steps == 12 and isinstance(run.steps, int)
    assert run.amp is True
    assert run.optim.lr == 3e-4 and isinstance(run.optim.lr, float)
    assert run.optim.betas == [0.8, 0.99]
    assert from_dict(Run, {"amp": "off"}).amp is False
    assert from_dict(Run, {"amp": 1}).amp is True
    assert from_dict(Run, {"steps": 4.0}).steps == 4
    assert from_dict(Run, {"mode": None}).mode is None


def test_model_config_coercion():
    cfg = ModelConfig.from_dict({"n_layer": "3", "rope_theta": "5e5", "tie_embeddings": "yes",
                                 "norm_eps": "1e-6", "eos_token_id": "2", "head_dim": None})
    assert cfg.n_layer == 3 and cfg.rope_theta == 5e5 and cfg.tie_embeddings is True
    assert cfg.norm_eps == 1e-6 and cfg.eos_token_id == 2 and cfg.head_dim == 8
    assert ModelConfig.from_dict({"eos_token_id": [2, 7]}).eos_token_id == [2, 7]


@pytest.mark.parametrize("key,value,words", [
    ("n_layer", "two", "expected int"),
    ("n_layer", 2.5, "integer"),
    ("n_layer", True, "number"),
    ("rope_theta", "fast", "expected float"),
    ("causal", "maybe", "true/false"),
    ("causal", 2, "true/false"),
    ("norm", "batchnorm", "'rmsnorm'"),
    ("rope_scaling", [1, 2], "mapping"),
])
def test_bad_values_raise_with_the_key(key, value, words):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({key: value})
    message = str(info.value)
    assert f"model config.{key}" in message and words in message, message


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        ModelConfig.from_dict(["n_layer", 2])
    with pytest.raises(ConfigError, match="expected a list"):
        coerce(3, list[int], where="x")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_presets_are_consistent(family):
    cfg = preset(family)
    assert cfg.family == family
    if family == "bert":
        assert not cfg.causal and cfg.pooler and cfg.norm_position == "post" and cfg.type_vocab_size == 2
    else:
        assert cfg.causal and not cfg.pooler
    if family == "gpt2":
        assert cfg.position == "learned" and cfg.tie_embeddings and cfg.mlp == "plain" and cfg.attn_bias
    if family == "llama":
        assert cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "gated" and not cfg.attn_bias


def test_preset_overrides_and_unknown_family():
    cfg = preset("gpt2", n_layer=6, vocab_size=1000)
    assert (cfg.n_layer, cfg.vocab_size, cfg.family) == (6, 1000, "gpt2")
    with pytest.raises(ConfigError, match="unknown family 'mamba'"):
        preset("mamba")


def test_head_dim_and_gqa_validation():
    assert ModelConfig(d_model=64, n_head=8).head_dim == 8
    assert ModelConfig(d_model=64, n_head=8, head_dim=16).head_dim == 16  # explicit head_dim wins
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="even head_dim"):
        ModelConfig(d_model=36, n_head=4)  # head_dim 9 cannot be rotated in pairs
    assert ModelConfig(d_model=36, n_head=4, position="learned").head_dim == 9
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        ModelConfig.from_dict({"n_head": "4", "n_kv_head": "3"})


def test_save_load_round_trip(tmp_path):
    cfg = preset("llama", n_kv_head=2, eos_token_id=[1, 2], rope_theta=5e5,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg.save(tmp_path / "sub" / "featherlm.json")
    assert ModelConfig.load(tmp_path / "sub" / "featherlm.json") == cfg
    for family in ("gpt2", "bert"):
        preset(family).save(tmp_path / f"{family}.json")
        assert ModelConfig.load(tmp_path / f"{family}.json") == preset(family)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        ModelConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "n_layer": 2,\n  "n_head": \n}')
    with pytest.raises(ConfigError, match=r"bad\.json: line 4: invalid JSON"):
        ModelConfig.load(bad)
    typo = tmp_path / "typo.json"
    typo.write_text('{"d_modle": 64}')
    with pytest.raises(ConfigError, match=r"typo\.json: unknown key 'd_modle'.*'d_model'"):
        ModelConfig.load(typo)
