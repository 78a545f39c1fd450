"""Config: TOML validated, the environment overrides it, secrets only by reference."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config
from providers.huggingface import HuggingFaceTierConfig
from providers.openai_compat import OpenAITierConfig

BASE = """
[server]
http = "127.0.0.1:8080"
[[tiers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key_env = "A_KEY"
"""


def test_environment_overrides_the_file(monkeypatch):
    monkeypatch.setenv("TIERGATE_SERVER__HTTP", "127.0.0.1:9999")
    monkeypatch.setenv("TIERGATE_ROUTING__RETRIES", "4")
    config = parse_config(BASE)
    assert config.server.http == "127.0.0.1:9999"
    assert config.routing.retries == 4
    assert config.tiers[0].name == "a"


def test_a_bad_environment_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TIERGATE_ROUTING__RETRIES", "many")
    with pytest.raises(ConfigError, match="retries"):
        parse_config(BASE)


def test_secrets_come_from_the_environment_or_a_systemd_credential(tmp_path):
    tier = OpenAITierConfig(name="a", base_url="http://x/v1", model="m", api_key_env="A_KEY")
    assert tier.resolve_api_key({"A_KEY": "sk-env"}) == "sk-env"
    assert tier.resolve_api_key({}) is None
    (tmp_path / "openai-key").write_text("sk-from-credential\n")
    cred = OpenAITierConfig(name="b", base_url="http://x/v1", model="m",
                      api_key_credential="openai-key")
    assert cred.resolve_api_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "sk-from-credential"
    assert cred.resolve_api_key({}) is None
    hf = HuggingFaceTierConfig(name="h", model="org/model")
    assert hf.resolve_api_key({"HF_TOKEN": "hf_x"}) == "hf_x"  # HF_TOKEN by default
    assert "sk-" not in repr(cred) and cred.key_source == "credential openai-key"


def test_inline_secrets_and_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="api_key"):
        parse_config(BASE.replace('api_key_env = "A_KEY"', 'api_key = "sk-inline"'))


def test_nothing_listening_is_refused():
    with pytest.raises(ConfigError, match="nothing would listen"):
        parse_config(BASE.replace('http = "127.0.0.1:8080"', 'http = ""'))
