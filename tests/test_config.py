import pytest

from protocols.config import ConfigError, RunConfig, load_config

from .conftest import REPO


def test_demo_config_is_valid():
    cfg = load_config(REPO / "simulations" / "configs" / "demo.toml")
    assert cfg.model == "smollm2-135m" and cfg.federation.num_clients == 4 and cfg.rounds == 3


def test_overrides_parse_types():
    cfg = load_config(None, ["rounds=5", "train.lr=1e-3", "lora.target_modules=['q_proj']", "name=x"])
    assert cfg.rounds == 5 and cfg.train.lr == 1e-3 and cfg.lora.target_modules == ["q_proj"] and cfg.name == "x"


def test_unknown_key_names_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'"):
        load_config(None, ["train.learning_rate=1"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["merger=median"])
    msg = str(e.value)
    assert "'merger'" in msg and "fedavg" in msg and "ties" in msg and "\n" not in msg


def test_bad_number_names_key():
    with pytest.raises(ConfigError, match=r"'rounds'"):
        load_config(None, ["rounds=0"])


def test_prompt_needs_placeholder():
    with pytest.raises(ConfigError, match=r"data.prompt.*\{text\}"):
        load_config(None, ["data.prompt='Review:'"])


def test_cross_check_clients_per_round():
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(None, ["federation.clients_per_round=1", "federation.min_clients=2"])


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rounds"])


def test_json_round_trip():
    cfg = RunConfig()
    assert RunConfig.model_validate_json(cfg.to_json()) == cfg


def test_min_available_clients_cannot_undercut_min_clients():
    with pytest.raises(ConfigError, match="min_available_clients"):
        load_config(None, ["federation.min_available_clients=1", "federation.min_clients=2"])
    cfg = load_config(None, ["federation.min_available_clients=3", "federation.min_clients=2"])
    assert cfg.federation.min_available_clients == 3
