"""params.yaml -> typed config: profiles, overrides, clear errors."""

from __future__ import annotations

import pytest

from components.config.sections import ConfigError, build_config, load_config, parse_override
from tests.conftest import REPO

RAW = {
    "data": {"dataset": "digits", "num_clients": 4},
    "federate": {"rounds": 5},
    "profiles": {"quick": {"federate": {"rounds": 2}, "registry": {"model_name": "q"}}},
}


def test_profiles_overlay_the_base_and_overrides_win():
    assert build_config(RAW).federate.rounds == 5
    quick = build_config(RAW, "quick")
    assert quick.federate.rounds == 2 and quick.registry.model_name == "q"
    assert quick.data.num_clients == 4  # untouched sections are inherited
    assert build_config(RAW, "quick", {"federate.rounds": 9}).federate.rounds == 9


def test_invalid_values_name_the_parameter():
    with pytest.raises(ConfigError, match=r"data.alpha"):
        build_config({**RAW, "data": {"alpha": 0}})
    with pytest.raises(ConfigError, match=r"data.num_clients"):
        build_config({**RAW, "data": {"num_clients": 1}})
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        build_config(RAW, "huge")
    with pytest.raises(ConfigError, match=r"federate.roundz"):
        build_config(RAW, overrides={"federate.roundz": 3})
    with pytest.raises(ConfigError, match="unknown dataset"):
        build_config({"data": {"dataset": "cifar"}})


def test_override_parsing():
    assert parse_override("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_override("data.max_train_examples=null") == ("data.max_train_examples", None)
    assert parse_override("model.args={channels: [4, 8]}") == ("model.args", {"channels": [4, 8]})
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("rounds=3")


def test_the_repository_params_validate_for_every_profile():
    assert load_config(REPO / "params.yaml").data.dataset == "fashion-mnist"
    quick = load_config(REPO / "params.yaml", "quick")
    assert quick.registry.model_name != load_config(REPO / "params.yaml").registry.model_name
