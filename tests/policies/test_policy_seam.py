"""The Policy seam: a policy sees read-only tier views and its order is the order tried."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import parse_config
from gateway.router import Router
from gateway.runtime import Runtime
from policies import FileOrder, TierView
from providers.schemas import ChatRequest

TOML = """
[server]
http = "127.0.0.1:1"
state_dir = "{state}"
[redis]
url = "redis://127.0.0.1:1/0"
[[tiers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
models = ["x"]
price = { input = 1.0, output = 2.0 }
[[tiers]]
name = "b"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
models = ["x"]
"""

REQ = ChatRequest(model="x", messages=({"role": "user", "content": "hi"},))


def views() -> list[TierView]:
    return [TierView(name="late", kind="openai", position=2, price_input=0, price_output=0),
            TierView(name="early", kind="local", position=0, price_input=0, price_output=0)]


def test_file_order_ranks_by_position_in_the_file():
    assert FileOrder().rank(REQ, views()) == ["early", "late"]


class CheapestFirst:
    name = "cheapest"

    def __init__(self) -> None:
        self.seen: list[TierView] = []

    def rank(self, request: ChatRequest, tiers: Sequence[TierView]) -> list[str]:
        self.seen = list(tiers)
        return [t.name for t in sorted(tiers, key=lambda t: (t.price_input + t.price_output, t.position))]


def test_the_router_tries_tiers_in_the_policys_order(tmp_path):
    rt = Runtime(parse_config(TOML.replace("{state}", str(tmp_path))))
    policy = CheapestFirst()
    router = Router(tiers=list(rt.router.tiers.values()), policy=policy, routing=rt.config.routing,
                    ledger=rt.ledger, prices=rt.prices, background=rt.background)
    ranked = router._ranked(REQ, router.candidates("x", None, "chat"))
    assert [t.name for t in ranked] == ["b", "a"]
    by_name = {v.name: v for v in policy.seen}
    assert by_name["a"].price_input == 1.0 and by_name["a"].position == 0
    assert by_name["b"].kind == "openai" and not by_name["b"].circuit_open
