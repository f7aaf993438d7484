"""Pipeline config: presets validate, errors name the key path, the value and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from coordinator.config import PRESETS_DIR, apply_overrides, load_config, parse_config, preset_names
from coordinator.errors import ConfigError


def test_the_three_presets_exist_and_validate():
    assert {"tiny", "small", "base"} <= set(preset_names())
    for name in preset_names():
        cfg, raw = load_config(preset=name)
        assert cfg.name == name
        # A dump of the validated config validates to the same config (resume relies on it).
        assert parse_config(cfg.model_dump(mode="json")) == cfg


def test_small_preset_targets_the_reference_parameter_count():
    cfg, _ = load_config(PRESETS_DIR / "small.yaml")
    assert cfg.cognate.target_params == 25_069_534


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"seed": -3, "wandb": {"mode": "sometimes"}, "cognat": {}, "ray": {"num_cpus": 0}}))
    with pytest.raises(ConfigError) as info:
        load_config(f)
    paths = [p for p, _ in info.value.problems]
    assert sorted(paths) == ["cognat", "ray.num_cpus", "seed", "wandb.mode"]
    msg = str(info.value)
    assert "'online'" in msg and "'offline'" in msg and "'disabled'" in msg, "allowed values are listed"
    assert "did you mean 'cognate'" in msg
    assert "sometimes" in msg, "the bad value is shown"


def test_unknown_nested_key_lists_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        parse_config({"wandb": {"projet": "x"}})
    (path, msg), = info.value.problems
    assert path == "wandb.projet" and "project" in msg and "entity" in msg


def test_overrides_are_typed_like_yaml():
    raw = apply_overrides({"seed": 1}, ["seed=5", "wandb.mode=disabled", "phases=[1, 2]"])
    assert raw == {"seed": 5, "wandb": {"mode": "disabled"}, "phases": [1, 2]}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["seed"])


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config(preset="huge")


def test_data_files_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """The corpus and phase 5's training files resolve against the config's folder (absolute
    paths, so a Ray worker with another working directory finds them)."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(
        {"data": {"corpus": ["docs/a.txt"]}, "forge": {"data": {"files": ["train.jsonl", str(tmp_path / "b.h5")]}}}))
    monkeypatch.chdir(tmp_path)
    cfg, _ = load_config(tmp_path / "cfg" / "run.yaml")
    assert cfg.data.corpus == (str(tmp_path / "cfg" / "docs" / "a.txt"),)
    assert cfg.forge.data.files == (str(tmp_path / "cfg" / "train.jsonl"), str(tmp_path / "b.h5"))


def test_a_forge_data_file_of_an_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match=r"forge.data.files.*\.pkl.*must end with one of \.txt"):
        parse_config({"forge": {"data": {"files": ["train.pkl"]}}})
