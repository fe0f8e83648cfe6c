"""Tracing overhead: traced vs untraced ``invoke`` of LangChain chains with an instant
fake chat model (no network, no real model).

Two cases:

* a 3-step chain (prompt | model | parser), one LM call per ``invoke``;
* a looped ``@chain`` function calling such a sub-chain N times per ``invoke``
  (``--loops``, default 30, 60 and 200): each sub-call's input is worked out from the
  function's input and its earlier sub-calls' outputs, so this is where the graph
  building could grow with N.

Reports the time added per traced LM call (µs) and the ratio traced/untraced.
Target: < 3 ms added per LM call in every case (negligible next to any real model
call).

Run: ``python benchmarks/tracing_overhead.py [--calls 300] [--repeat 3]
[--loops 30 60 200]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import chain

from afnio_integrations.langchain import trace

INPUTS = {"message": "The heater is broken again."}


def _chain() -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Classify the sentiment of the message."), ("human", "{message}")]
    )
    return prompt | FakeListChatModel(responses=["neutral"]) | StrOutputParser()


def _loop(n: int) -> Any:
    """A ``@chain`` function calling the 3-step chain ``n`` times (``n`` LM calls)."""
    sub = _chain()

    @chain
    def classify_each(inputs: dict[str, str]) -> str:
        return " ".join(
            sub.invoke({"message": f"{inputs['message']} ({i})"}) for i in range(n)
        )

    return classify_each


def _timed(run: Callable[[], Any], times: int) -> float:
    start = time.perf_counter()
    for _ in range(times):
        run()
    return time.perf_counter() - start


def measure(
    make: Callable[[], Any], invokes: int, lm_calls: int
) -> tuple[float, float]:
    """(untraced µs, traced µs) per LM call, over ``invokes`` invokes of the chain
    ``make()`` builds, each making ``lm_calls`` LM calls."""
    plain_chain = make()
    traced = trace(make())
    plain = _timed(lambda: plain_chain.invoke(INPUTS), invokes)
    tracing = _timed(lambda: traced.invoke(INPUTS), invokes)
    per = invokes * lm_calls
    return plain / per * 1e6, tracing / per * 1e6


def report(
    label: str, make: Callable[[], Any], invokes: int, lm_calls: int, args: Any
) -> bool:
    """Print one case (best of ``--repeat``); whether it met the target."""
    measure(make, 1, lm_calls)  # warm up imports and caches
    runs = [measure(make, invokes, lm_calls) for _ in range(args.repeat)]
    plain = min(r[0] for r in runs)
    traced = min(r[1] for r in runs)
    added = traced - plain
    spread = statistics.pstdev(r[1] - r[0] for r in runs)
    print(f"{label}, best of {args.repeat}")
    print(f"  untraced, per LM call: {plain:9.1f} µs")
    print(f"  traced, per LM call:   {traced:9.1f} µs")
    print(
        f"  added per traced LM call: {added:9.1f} µs (±{spread:.1f}), "
        f"ratio {traced / plain:.2f}x"
    )
    return added < args.target_ms * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loops", type=int, nargs="*", default=[30, 60, 200])
    parser.add_argument("--target-ms", type=float, default=3.0)
    args = parser.parse_args(argv)
    ok = report(
        f"3-step chain, 1 LM call per invoke, {args.calls} calls",
        _chain,
        args.calls,
        1,
        args,
    )
    for n in args.loops:
        invokes = max(1, args.calls // n)
        ok &= report(
            f"@chain loop, {n} LM calls per invoke, {invokes} invokes",
            lambda n=n: _loop(n),
            invokes,
            n,
            args,
        )
    verdict = "met" if ok else "MISSED"
    target = f"< {args.target_ms:.0f} ms added per LM call, every case"
    print(f"target ({target}): {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
