"""Tracing overhead: a traced vs an untraced ``invoke`` of a 3-step LangChain chain
(prompt | instant fake chat model | parser). No network, no real model.

Reports the time added per traced LM call (µs) and the ratio traced/untraced.
Target: < 3 ms added per LM call (negligible next to any real model call).

Run: ``python benchmarks/tracing_overhead.py [--calls 300] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import statistics
import time

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from afnio_integrations.langchain import trace


def _chain() -> object:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Classify the sentiment of the message."), ("human", "{message}")]
    )
    return prompt | FakeListChatModel(responses=["neutral"]) | StrOutputParser()


def measure(calls: int) -> tuple[float, float]:
    """(untraced µs per call, traced µs per call)."""
    chain = _chain()
    inputs = {"message": "The heater is broken again."}
    t0 = time.perf_counter()
    for _ in range(calls):
        chain.invoke(inputs)
    t1 = time.perf_counter()
    traced = trace(chain)
    for _ in range(calls):
        traced.invoke(inputs)
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t1) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target-ms", type=float, default=3.0)
    args = parser.parse_args(argv)
    measure(20)  # warm up imports and caches
    runs = [measure(args.calls) for _ in range(args.repeat)]
    plain = min(r[0] for r in runs)
    traced = min(r[1] for r in runs)
    added = traced - plain
    spread = statistics.pstdev(r[1] - r[0] for r in runs)
    print(
        f"3-step chain, 1 LM call per invoke, {args.calls} calls, best of {args.repeat}"
    )
    print(f"untraced invoke: {plain:9.1f} µs")
    print(f"traced invoke:   {traced:9.1f} µs")
    ratio = traced / plain
    print(
        f"added per traced LM call: {added:9.1f} µs (±{spread:.1f}), ratio {ratio:.2f}x"
    )
    ok = added < args.target_ms * 1000
    verdict = "met" if ok else "MISSED"
    print(f"target (< {args.target_ms:.0f} ms added per LM call): {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
