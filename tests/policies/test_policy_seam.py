"""The Policy seam and its registry: names, "package.module:Class", and what is refused."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config
from policies import POLICIES, FileOrder, PolicyError, TierView, load_policy
from providers.schemas import ChatRequest
from tests.support.throwaway import LastFirst

REQ = ChatRequest(model="x", messages=({"role": "user", "content": "hi"},))

TOML = """
[routing]
policy = "{policy}"
[[tiers]]
name = "a"
kind = "local"
model = "m"
"""


def views() -> list[TierView]:
    return [TierView(name="late", kind="openai", position=2, price_input=0, price_output=0),
            TierView(name="early", kind="local", position=0, price_input=0, price_output=0)]


def test_file_order_ranks_by_position_in_the_file_and_says_its_order_is_static():
    policy = load_policy("file_order")
    assert isinstance(policy, FileOrder)
    assert policy.rank(REQ, views()) == ["early", "late"]
    assert policy.static_order is True


def test_a_users_policy_loads_by_its_import_path():
    policy = load_policy("tests.support.throwaway:LastFirst")
    assert isinstance(policy, LastFirst)
    assert policy.rank(REQ, views()) == ["late", "early"]


def test_a_policy_registered_by_one_line_loads_by_name(monkeypatch):
    monkeypatch.setitem(POLICIES, "last_first", LastFirst)
    assert isinstance(load_policy("last_first"), LastFirst)
    assert parse_config(TOML.replace("{policy}", "last_first")).routing.policy == "last_first"


@pytest.mark.parametrize(("spec", "why"), [
    ("cheapest", "unknown policy 'cheapest'; known: file_order"),
    ("tests.support.no_such_module:X", "cannot import 'tests.support.no_such_module'"),
    ("tests.support.throwaway:Missing", "has no class 'Missing'"),
    ("tests.support.throwaway:NotAPolicy", "is not a policy: it has no rank"),
])
def test_a_bad_policy_name_is_a_config_error_naming_the_key(spec, why):
    with pytest.raises(PolicyError, match=why):
        load_policy(spec)
    with pytest.raises(ConfigError) as err:
        parse_config(TOML.replace("{policy}", spec))
    assert err.value.where == "<config>:3 [routing.policy]"
    assert why in err.value.message


def test_a_policy_that_fails_to_start_is_refused_with_its_reason():
    with pytest.raises(PolicyError, match="failed to start: RuntimeError: no config for me"):
        load_policy("tests.support.throwaway:Broken")
