"""Run a real tiergate daemon in the test's event loop (or as a subprocess) on free
ports, from TOML text."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from gateway.config import parse_config
from gateway.server import Server
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def render(toml: str, **values: object) -> str:
    for k, v in values.items():
        toml = toml.replace("{" + k + "}", str(v))
    return toml


class InProcessDaemon:
    """The daemon's Server started in this loop: same code path as ``tiergate serve``."""

    def __init__(self, toml: str, tmp: Path, environ: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.socket_path = tmp / "tg.sock"
        self.toml = render(toml, port=self.port, socket=self.socket_path, state=tmp / "state")
        self.config = parse_config(self.toml)
        self.server = Server(self.config, environ=dict(environ or {}))
        self.session: aiohttp.ClientSession | None = None
        self.unix_session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> InProcessDaemon:
        await self.server.start()
        self.session = aiohttp.ClientSession()
        if self.config.server.unix_socket:
            self.unix_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket_path))
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in (self.session, self.unix_session):
            if s is not None:
                await s.close()
        await self.server.stop()

    def post(self, path: str, **kw: object) -> aiohttp.client._RequestContextManager:
        assert self.session is not None
        return self.session.post(self.url + path, **kw)

    def get(self, path: str, **kw: object) -> aiohttp.client._RequestContextManager:
        assert self.session is not None
        return self.session.get(self.url + path, **kw)


class SubprocessDaemon:
    """``tiergate serve`` as its own process, as an operator runs it."""

    def __init__(self, toml: str, tmp: Path, env: Mapping[str, str] | None = None,
                 name: str = "tg") -> None:
        self.port = free_port()
        self.tmp = tmp
        self.socket_path = tmp / f"{name}.sock"
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(
            render(toml, port=self.port, socket=self.socket_path, state=tmp / f"{name}-state")
        )
        self.log_path = tmp / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.tmp),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited {self.process.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if not wait_ready or self.is_ready():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready in {timeout}s: {self.log()}")

    def is_ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        rc = self.process.returncode
        self.process = None
        return rc

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
