"""Config loading, overrides and one-line errors that name the field."""

import json
import math

import pytest

from agm_fast import config
from agm_fast.config import ConfigError


def test_defaults_and_every_preset_validate():
    config.validate(config.Config())
    assert config.preset_names(), "configs/ holds no presets"
    for name in config.preset_names():
        cfg = config.load(name, ["data.path=/some/images"])
        if name in ("demo32", "res28", "res32"):  # runnable with the built-in dataset
            config.load(name)
        assert cfg.train.run_dir == f"runs/{'demo' if name == 'demo32' else name}"


def test_overrides_are_typed():
    cfg = config.load("demo32", ["train.steps=7", "weights.clip=inf", "model.channel_mult=[1,2]",
                                 "data.hflip=true", "bridge.sigma=0", "train.run_dir=/tmp/x"])
    assert cfg.train.steps == 7 and math.isinf(cfg.weights.clip) and cfg.model.channel_mult == [1, 2]
    assert cfg.data.hflip is True and cfg.bridge.sigma == 0.0 and cfg.train.run_dir == "/tmp/x"
    assert math.isinf(config.load("demo32", ["optim.grad_clip=inf"]).optim.grad_clip)  # inf = off, like 0


def test_round_trip_through_dict():
    cfg = config.load("demo32", ["weights.scheme=uniform"])
    assert config.from_dict(config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", r"unknown config key 'train.stepz'.*steps"),
    ("trian.steps=3", r"unknown config key 'trian.steps'; sections are"),
    ("train.steps=many", r"train.steps: expected an integer"),
    ("data.hflip=maybe", r"data.hflip: expected true or false"),
    ("weights.scheme=boltzmann", r"weights.scheme='boltzmann' is not allowed; choose one of: softmax, uniform"),
    ("train.kernels=cuda", r"train.kernels='cuda' is not allowed"),
    ("bridge.sigma=-0.1", r"bridge.sigma=-0.1 is out of range"),
    ("bridge.t_eps=0.5", r"bridge.t_eps=0.5 must be ≤ 1/sample.steps"),
    ("train.micro_batch=5", r"train.micro_batch=5 must divide train.batch_size=32"),
    ("potential.channels=[8,16]", r"potential.channels=\[8, 16\]: expected a list of exactly 3"),
    ("data.dataset=folder", r"data.path must name an image folder"),
    ("train.steps", r"must look like section.field=value"),
    ("weights.clip=-inf", r"weights.clip=-inf is out of range"),
    ("bridge.sigma=nan", r"bridge.sigma is NaN"),
    ("data.channels=2", r"data.channels=2: expected 1 \(grey\) or 3 \(RGB\)"),
    ("data.channels=4", r"data.channels=4: expected 1 \(grey\) or 3 \(RGB\)"),
    ("train.run_dir=", r"train.run_dir must name a directory"),
    ("optim.lr=inf", r"optim.lr=inf must be finite"),
    ("bridge.sigma=inf", r"bridge.sigma=inf must be finite"),
    # the nets' arguments are checked here, where the user sets them (the nets trust the config)
    ("model.time_injection=concat", r"model.time_injection='concat' is not allowed; choose one of: add, scale_shift"),
    ("model.attention=flash", r"model.attention='flash' is not allowed; choose one of: auto, xformers, sdpa, math"),
    ("model.channel_mult=[]", r"model.channel_mult=\[\]: expected a list of at least 1 integers ≥ 1"),
    ("model.channels=1", r"model.channels=1 is out of range \[2, ∞\]"),
    ("potential.time_input=concat", r"potential.time_input='concat' is not allowed; choose one of: channel, film"),
    ("potential.channels=[]", r"potential.channels=\[\]: expected a list of exactly 3"),
])
def test_bad_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        config.load("demo32", [override])


def test_bad_preset_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        config.load("nope")
    with pytest.raises(ConfigError, match="preset file .*missing.toml' does not exist"):
        config.load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(bad))
    flat = tmp_path / "flat.toml"
    flat.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match="inside a section"):
        config.load(str(flat))


def test_readme_table_matches_the_declarations():
    """README's configuration table: one row per field, with the config's default and allowed values."""
    import re
    from pathlib import Path
    readme = (Path(config.__file__).resolve().parent.parent / "README.md").read_text()
    rows = {k: (d, a) for k, d, a in re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `(.*?)` \| (.*?) \| .* \|$", readme, re.M)}
    assert sorted(rows) == sorted(config.field_names()), "README's configuration table lists other fields"
    defaults = config.Config()
    for key, (default, allowed) in rows.items():
        value = config._get(defaults, key)
        assert default == json.dumps(value) or default == repr(value), (key, default, value)
        if key != "train.device":  # free text checked by validate(); its row spells out the forms
            assert allowed == config.allowed_text(key), (key, allowed, config.allowed_text(key))
