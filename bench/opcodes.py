"""Python bytecodes executed per request, per function: where a build's per-request work
is, at the level of the code we write (valgrind's counts name C functions only).

    .venv/bin/python bench/opcodes.py                    # the working tree against the bare proxy
    .venv/bin/python bench/opcodes.py HEAD~1 --top 40    # a revision

The target runs twice, for 200 and 1,200 requests from 20 client connections, with a
trace function that counts ``opcode`` events per code object (installed by a
``sitecustomize`` module this script writes); the difference of the two counts divided
by 1,000 is each function's bytecodes per request, start-up and shut-down cancelled out.
The bare proxy of ``overhead.py`` is counted the same way and the table lists each
function's count for both, largest difference first. C work (orjson, llhttp, multidict,
the event loop) is not counted: use ``instructions.py`` for the whole cost. Tracing slows
the process about 20 times, so batched work (the ledger's usage batches) batches less
and is over-counted. Every dataclass's generated ``__init__`` is named alike
(``<string>:2:__create_fn__.<locals>.__init__``): their sum is one row.
"""

from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import instructions as ins  # noqa: E402
from overhead_ab import extract  # noqa: E402

from tests.support.redis_server import free_port  # noqa: E402

SITECUSTOMIZE = '''
import atexit, collections, os, sys
_out = os.environ.get("TIERGATE_OPCODES_OUT")
if _out:
    _counts = collections.Counter()
    def _local(frame, event, arg, _c=_counts):
        if event == "opcode":
            _c[frame.f_code] += 1
        return _local
    def _global(frame, event, arg):
        frame.f_trace_opcodes = True
        return _local
    def _dump():
        sys.settrace(None)
        with open(_out, "w") as f:
            for code, n in _counts.items():
                f.write(f"{n}\\t{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}\\n")
    atexit.register(_dump)
    sys.settrace(_global)
'''
RUNS = (200, 1200)


def _short(name: str) -> str:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for prefix in (f"{sys.prefix}/lib/{version}/site-packages/", f"{sys.base_prefix}/lib/{version}/", f"{ROOT}/"):
        name = name.replace(prefix, "")
    return name


def count(cmd: list[str], env: dict[str, str], port: int, work: Path) -> collections.Counter[str]:
    """Bytecodes per request of each function of ``cmd`` (a server on ``port``)."""
    totals = []
    for n in RUNS:
        out = work / f"opcodes.{port}.{n}"
        proc = subprocess.Popen(cmd, env={**env, "TIERGATE_OPCODES_OUT": str(out)}, cwd=work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ins._wait_ready(port)
            ins._load(port, n)
            time.sleep(1.5)  # the last usage batch goes out
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        counts: collections.Counter[str] = collections.Counter()
        for line in out.read_text().splitlines():
            value, name = line.split("\t", 1)
            counts[_short(name)] += int(value)
        totals.append(counts)
    first, second = totals
    per = RUNS[1] - RUNS[0]
    return collections.Counter({k: (second[k] - first[k]) / per for k in second})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", nargs="?", default="WORKTREE", help="a git revision or WORKTREE")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    with ins.stack("tiergate-opcodes-") as st:
        site = st.work / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        port = free_port()
        bare = count(st.bare_command(port), {**st.env, "PYTHONPATH": f"{site}:{ROOT}"}, port, st.work)
        src = extract(args.target, st.work / "src")
        port = free_port()
        daemon = count(st.daemon_command(port), {**st.env, "PYTHONPATH": f"{site}:{src}:{ROOT}"}, port, st.work)
    print(f"bytecodes per request: bare proxy {sum(bare.values()):,.0f}, {args.target} {sum(daemon.values()):,.0f}")
    print(f"{'daemon - bare':>13} {'bare':>7} {'daemon':>7}  function")
    rows = sorted(((daemon[k] - bare[k], k) for k in set(bare) | set(daemon)), key=lambda r: -abs(r[0]))
    for diff, name in rows[: args.top]:
        print(f"{diff:13.1f} {bare[name]:7.1f} {daemon[name]:7.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
