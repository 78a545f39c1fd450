"""CPU instructions per request, counted by valgrind (cachegrind): a figure that does not
move with the load other processes put on a shared machine, for comparing builds.

    .venv/bin/python bench/instructions.py HEAD~1 WORKTREE [--requests 2000] [--bare]
    .venv/bin/python bench/instructions.py WORKTREE WORKTREE+TIERGATE_SERVER__ACCESS_LOG=false

Each target runs twice under ``valgrind --tool=cachegrind --cache-sim=no``: once for 200
requests and once for 200 + N, and the difference of the two totals divided by N is its
cost per request, start-up and shut-down cancelled out. The requests come from 20 client
connections at once (threads of this process, outside valgrind), so that the ledger
batches usage as it does under load; the upstream and redis-server are real processes
outside valgrind too. A target is a git revision (or ``WORKTREE``), optionally with
environment settings for its daemon (``REV+NAME=VALUE``), as in ``overhead_ab.py``;
``--bare`` adds the bare aiohttp proxy of ``overhead.py``.

Needs valgrind (``apt-get install valgrind``). Python runs about 50 times slower under
it: a target takes about 40 s at the default 2000 requests. Repeated runs of one build
agree within about 1%.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import overhead as ov  # noqa: E402
from overhead_ab import extract  # noqa: E402

from tests.support.redis_server import free_port, start_redis  # noqa: E402

WARM_REQUESTS = 200
CONNECTIONS = 20
BODY = ov.chat_body(False)


def _post(conn: http.client.HTTPConnection) -> None:
    conn.request("POST", "/v1/chat/completions", body=BODY, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise RuntimeError(f"answered {resp.status}")


def _load(port: int, requests: int) -> None:
    def worker(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            for _ in range(count):
                _post(conn)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(requests // CONNECTIONS,)) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _wait_ready(port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            _post(conn)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            conn.close()


def instructions(cmd: list[str], env: dict[str, str], port: int, requests: int, work: Path) -> int:
    """Total instructions of ``cmd`` serving ``requests`` requests (and starting, stopping)."""
    out = work / f"cachegrind.{port}"
    vg = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]
    proc = subprocess.Popen(vg + cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(port)
        _load(port, requests)
        time.sleep(1.0)  # the last usage batch goes out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {out}")


@dataclass
class Stack:
    """What the targets of one run share: a redis-server and a zero-delay upstream."""

    work: Path
    redis_url: str
    upstream_url: str
    env: dict[str, str]  # the environment every process starts from

    def bare_command(self, port: int) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / "overhead.py"), "--bare-proxy",
                "--port", str(port), "--upstream", self.upstream_url]

    def daemon_command(self, port: int) -> list[str]:
        """``tiergate serve`` on a config of its own (``overhead.py``'s) at ``port``."""
        config = self.work / f"t{port}.toml"
        config.write_text(ov.DAEMON_TOML.format(port=port, state=self.work / f"state{port}",
                                                redis=self.redis_url, upstream=self.upstream_url,
                                                model=ov.MODEL))
        tiergate = shutil.which("tiergate", path=str(Path(sys.executable).parent)) or "tiergate"
        return [sys.executable, tiergate, "serve", "--config", str(config)]


@contextlib.contextmanager
def stack(prefix: str) -> Iterator[Stack]:
    """A work directory, a redis-server and the upstream, all gone afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    redis = start_redis()
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    upstream = subprocess.Popen([sys.executable, "-m", "tests.support.upstream", "--port", str(up_port)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        ov.wait_http(f"{upstream_url}/chat/completions", BODY)
        yield Stack(work, redis.url, upstream_url, env)
    finally:
        upstream.terminate()
        upstream.wait()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="+")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--bare", action="store_true", help="also the bare aiohttp proxy")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with stack("tiergate-instr-") as st:
        specs = (["bare"] if args.bare else []) + args.targets
        for i, spec in enumerate(specs):
            rev, *settings = spec.split("+")
            src = extract(rev, st.work / f"src{i}") if spec != "bare" else ROOT
            counts = []
            for n in (WARM_REQUESTS, WARM_REQUESTS + args.requests):
                port = free_port()
                if spec == "bare":
                    cmd, env = st.bare_command(port), st.env
                else:
                    cmd = st.daemon_command(port)
                    env = {**st.env, **dict(s.split("=", 1) for s in settings), "PYTHONPATH": f"{src}:{ROOT}"}
                counts.append(instructions(cmd, env, port, n, st.work))
            per_request = (counts[1] - counts[0]) / args.requests
            print(f"{spec:40} {per_request:12,.0f} instructions per request", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
