"""Compare the daemon's cost per request across builds, side by side in one run.

    .venv/bin/python bench/overhead_ab.py HEAD~3 HEAD [--rounds 3] [--seconds 3]

Each git revision is extracted (``git archive``) into a temporary directory and run as
its own ``tiergate serve`` (its packages first on PYTHONPATH) next to the bare proxy,
all in front of one zero-delay upstream and one redis-server, with the configuration
``bench/overhead.py`` uses. Rounds alternate the order of targets; the table gives the
median CPU time per request at 32 connections (from /proc, the steadiest figure on a
shared machine) and the median p50 latency one request at a time. A working tree with
uncommitted changes can be compared as the revision ``WORKTREE``. A revision may carry
environment variables for its daemon, ``REV+NAME=VALUE[+NAME=VALUE]``, to compare
settings of one build: ``WORKTREE WORKTREE+PYTHONGC=off``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import overhead as ov  # noqa: E402

from tests.support.redis_server import start_redis  # noqa: E402

PACKAGES = ("gateway", "providers", "policies", "tracking")


def extract(rev: str, into: Path) -> Path:
    if rev == "WORKTREE":
        return ROOT
    into.mkdir(parents=True)
    archive = into / "src.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev, *PACKAGES], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("revs", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tiergate-ab-"))
    loadgen = ov.LoadGen("wrk" if shutil.which("wrk") else "python", work, ov.chat_body(False))
    redis = start_redis()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        up_port = ov.free_port()
        upstream = f"http://127.0.0.1:{up_port}/v1"
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.support.upstream", "--port", str(up_port)],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
        bare_port = ov.free_port()
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "overhead.py"), "--bare-proxy",
                                       "--port", str(bare_port), "--upstream", upstream],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
        targets = {"bare": (f"http://127.0.0.1:{bare_port}/v1/chat/completions", procs[-1].pid)}
        tiergate = shutil.which("tiergate", path=str(Path(sys.executable).parent)) or "tiergate"
        for i, spec in enumerate(args.revs):
            rev, *settings = spec.split("+")
            extra = dict(s.split("=", 1) for s in settings)
            src = extract(rev, work / f"rev{i}")
            port = ov.free_port()
            config = work / f"rev{i}.toml"
            config.write_text(ov.DAEMON_TOML.format(port=port, state=work / f"state{i}", redis=redis.url,
                                                    upstream=upstream, model=ov.MODEL))
            log = (work / f"rev{i}.log").open("wb")
            procs.append(subprocess.Popen([tiergate, "serve", "--config", str(config)], cwd=work,
                                          env={**env, **extra, "PYTHONPATH": f"{src}:{ROOT}"}, stdout=log, stderr=log))
            targets[spec] = (f"http://127.0.0.1:{port}/v1/chat/completions", procs[-1].pid)
        for url, _ in targets.values():
            ov.wait_http(url, ov.chat_body(False))
        for url, pid in targets.values():  # warm-up, not counted: pools fill, caches settle
            loadgen.run("warmup", url, 32, 1.0, pid)
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        p50: dict[str, list[float]] = {name: [] for name in targets}
        for r in range(args.rounds):
            names = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in names:
                url, pid = targets[name]
                cpu[name].append(loadgen.run(name, url, 32, args.seconds, pid).cpu_us_per_request)
                p50[name].append(loadgen.run(name, url, 1, args.seconds, pid).p50_ms)
        print(f"{'target':28} {'cpu us/req @32':>15} {'p50 ms @1':>10}  rounds (cpu)")
        for name in targets:
            print(f"{name:28} {statistics.median(cpu[name]):15.1f} {statistics.median(p50[name]):10.3f}"
                  f"  {[round(x) for x in cpu[name]]}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
