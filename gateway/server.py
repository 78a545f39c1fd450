"""Run the daemon: one aiohttp runner, a TCP site and/or a Unix-socket site (or the
sockets systemd hands over), sd_notify, graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

import structlog
from aiohttp import web

from gateway.accesslog import AccessLogger
from gateway.api import build_server
from gateway.config import Config
from gateway.runtime import Runtime

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START = 3


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd about our state (READY=1, STOPPING=1, STATUS=...). No-op off systemd."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))
        return False


def inherited_sockets(environ: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS), if they are ours."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(env.get("LISTEN_FDS", "0") or 0)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


# Fast path: docs/BENCHMARKS.md "cycle collector settings".
# Objects allocated, net, between young-generation collections (CPython's default: 700).
# A request allocates a few hundred objects that nearly all die by reference counting,
# so the default runs the cycle collector every other request for almost nothing.
GC_YOUNG_THRESHOLD = 7000


def settle_gc() -> tuple[int, int, int]:
    """Once started: move what startup built (modules, config, pools) out of the cycle
    collector's sight, and collect young objects less often. Returns the thresholds
    before, for ``unsettle_gc``."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, before[1], before[2])
    return before


def unsettle_gc(thresholds: tuple[int, int, int]) -> None:
    """Undo ``settle_gc`` (a process that goes on after the server, tests say)."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def prepare_unix_socket(path: Path) -> None:
    """Replace a stale socket left by a crash; refuse to take over a live one or a
    file that is not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("stale_socket_removed", path=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")


def address(sockname: object) -> str:
    """A listening socket's name (``getsockname()``) as a URL, or ``unix:<path>``."""
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return f"unix:{sockname}"


class Server:
    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.runtime = Runtime(config, environ=self.environ)
        self.runner: web.ServerRunner | None = None
        self._stop = asyncio.Event()
        self._socket_path: Path | None = None
        self.addresses: list[str] = []
        self._gc_thresholds: tuple[int, int, int] | None = None

    async def start(self) -> None:
        rt = self.runtime
        activated = inherited_sockets(self.environ)
        if not activated:
            rt.check_bind_safety()
        await rt.start()
        web_server = build_server(
            rt,
            handler_cancellation=True,
            # aiohttp hands ``access_log`` to ``access_log_class``: our AccessLogger gets
            # the runtime's AccessLog and writes the line once the response is sent.
            access_log_class=AccessLogger,
            access_log=rt.access_log if self.config.server.access_log else None,
        )
        self.runner = web.ServerRunner(web_server, shutdown_timeout=self.config.server.drain_timeout_s)
        await self.runner.setup()
        server = self.config.server
        sites: list[web.BaseSite] = []
        socket_path: Path | None = None
        if activated:
            sites = [web.SockSite(self.runner, s) for s in activated]
        else:
            if server.listen is not None:
                host, port = server.listen
                sites.append(web.TCPSite(self.runner, host, port, reuse_address=True))
            if server.unix_socket:
                socket_path = Path(server.unix_socket)
                prepare_unix_socket(socket_path)
                sites.append(web.UnixSite(self.runner, str(socket_path)))
        for site in sites:
            if isinstance(site, web.UnixSite):
                # Bind owner-only, then open up to the configured mode: the socket is
                # never more open than asked, not even for a moment.
                old = os.umask(0o177)
                try:
                    await site.start()
                finally:
                    os.umask(old)
            else:
                await site.start()
        if socket_path is not None:
            # Ours from here on: removed on exit (never a live socket we failed to take).
            self._socket_path = socket_path
            os.chmod(socket_path, server.socket_mode)
        self.addresses = [address(name) for name in self.runner.addresses]
        self._gc_thresholds = settle_gc()
        sd_notify("READY=1\nSTATUS=serving", self.environ)
        log.info("listening", addresses=self.addresses)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        sd_notify("STOPPING=1", self.environ)
        log.info("shutting_down", drain_timeout_s=self.config.server.drain_timeout_s)
        if self.runner is not None:
            # Stops accepting, then waits up to shutdown_timeout for in-flight requests.
            await self.runner.cleanup()
        await self.runtime.stop(self.config.server.drain_timeout_s)
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
        if self._gc_thresholds is not None:
            unsettle_gc(self._gc_thresholds)
            self._gc_thresholds = None
        log.info("stopped")


async def serve(config: Config, *, environ: Mapping[str, str] | None = None) -> int:
    server = Server(config, environ=environ)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    # Reloading the TOML in place is not built yet; a SIGHUP must not kill the daemon
    # (its default action), so it is noted and ignored until it is.
    loop.add_signal_handler(
        signal.SIGHUP, lambda: log.warning("reload_unsupported", hint="restart to apply config changes")
    )
    try:
        await server.start()
        await server.wait()
    finally:
        await server.stop()
    return 0
