from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.daemon import InProcessDaemon
from tests.support.redis_server import free_port
from tests.support.upstream import FakeUpstream

# Two OpenAI-compatible tiers in front of fake upstreams; the tests fill in the URLs.
TWO_TIERS = """
[server]
http = "127.0.0.1:{port}"
unix_socket = "{socket}"
state_dir = "{state}"
max_body_bytes = 65536
request_timeout_s = 20

[redis]
url = "{redis}"

[routing]
retries = 1
backoff_initial_s = 0.01
backoff_max_s = 0.05
first_token_timeout_s = 1.0
inter_token_timeout_s = 1.0
stream_failover = "{failover}"

[[tiers]]
name = "first"
kind = "openai"
base_url = "{first}"
model = "upstream-a"
models = ["gpt-test"]
api_key_env = "FIRST_KEY"
can_resume = true

[[tiers]]
name = "second"
kind = "openai"
base_url = "{second}"
model = "upstream-b"
models = ["gpt-test"]
can_resume = true
"""

SECRET = "sk-test-secret-value-0123456789"


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    async with FakeUpstream() as a, FakeUpstream(reply="Second tier answers here.") as b:
        yield a, b


@pytest.fixture
def make_daemon(
    tmp_path: Path, redis_url: str, upstreams: tuple[FakeUpstream, FakeUpstream]
) -> Callable[..., InProcessDaemon]:
    """A daemon in front of the two fake upstreams (``first=None``: a closed port)."""
    a, b = upstreams

    def make(*, failover: str = "error", first: str | None = "up", toml: str = TWO_TIERS,
             **extra: str) -> InProcessDaemon:
        first_url = a.base_url if first == "up" else f"http://127.0.0.1:{free_port()}/v1"
        text = (toml.replace("{redis}", redis_url).replace("{failover}", failover)
                .replace("{first}", first_url).replace("{second}", b.base_url))
        for k, v in extra.items():
            text = text.replace("{" + k + "}", v)
        return InProcessDaemon(text, tmp_path, environ={"FIRST_KEY": SECRET})

    return make
