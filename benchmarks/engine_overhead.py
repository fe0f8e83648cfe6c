"""Engine overhead: build and backward a chain of N trivial custom Functions.

No LM is involved: this measures what afnio itself adds per graph node (target:
backward < 50 µs per node on 2 cores). Three kinds of backward are measured:

* ``inline``: a plain ``backward`` marked ``run_backward_inline = True`` (how afnio's
  own string ops run);
* ``async``: an ``async def backward`` (how LM-backed ops run), one task per node,
  under the concurrency bound;
* ``thread``: a plain ``backward`` without the flag, run in a worker thread (safe for
  blocking code).

Run: ``python benchmarks/engine_overhead.py [--nodes 10000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import afnio
from afnio import Variable
from afnio.autodiff import Function


class InlineStep(Function):
    run_backward_inline = True

    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data, role="step")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> Variable:
        return grad


class AsyncStep(Function):
    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data, role="step")

    @staticmethod
    async def backward(ctx: Any, grad: Variable) -> Variable:
        return grad


class ThreadStep(Function):
    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data, role="step")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> Variable:
        return grad


KINDS: dict[str, type[Function]] = {
    "inline": InlineStep,
    "async": AsyncStep,
    "thread": ThreadStep,
}


def measure(fn: type[Function], nodes: int) -> tuple[float, float]:
    """Return (build µs/node, backward µs/node) for one chain."""
    leaf = Variable("x", role="leaf", requires_grad=True)
    t0 = time.perf_counter()
    out = leaf
    for _ in range(nodes):
        out = fn.apply(out)
    t1 = time.perf_counter()
    out.backward(Variable("feedback"))
    t2 = time.perf_counter()
    assert len(leaf.grad) == 1 and leaf.grad[0].data == "feedback"
    return (t1 - t0) / nodes * 1e6, (t2 - t1) / nodes * 1e6


def measure_wide(fn: type[Function], nodes: int) -> tuple[float, float]:
    """Return (build µs/node, backward µs/node) for ``nodes`` parallel branches
    joined by one Sum: all branches are ready at once."""
    leaves = [Variable(str(i), role="leaf", requires_grad=True) for i in range(nodes)]
    t0 = time.perf_counter()
    total = afnio.functional.sum([fn.apply(leaf) for leaf in leaves])
    t1 = time.perf_counter()
    total.backward(Variable("feedback"))
    t2 = time.perf_counter()
    assert all(len(leaf.grad) == 1 for leaf in leaves)
    return (t1 - t0) / nodes * 1e6, (t2 - t1) / nodes * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target-us", type=float, default=50.0)
    args = parser.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * args.nodes))

    measure(InlineStep, 100)  # warm up the loop and the thread pool
    print(f"{args.nodes} nodes, best of {args.repeat}, µs per node")
    print(f"{'backward kind':<14}{'shape':<8}{'build':>10}{'backward':>12}")
    failures = []
    for shape, run in (("chain", measure), ("wide", measure_wide)):
        for name, fn in KINDS.items():
            runs = [run(fn, args.nodes) for _ in range(args.repeat)]
            build = min(r[0] for r in runs)
            back = min(r[1] for r in runs)
            spread = statistics.pstdev(r[1] for r in runs)
            print(f"{name:<14}{shape:<8}{build:>10.1f}{back:>12.1f}  (±{spread:.1f})")
            if (
                shape == "chain"
                and name in ("inline", "async")
                and back >= args.target_us
            ):
                failures.append(f"{name} {shape}")
    print(f"max concurrency: {afnio.get_max_concurrency()}")
    verdict = "met" if not failures else "MISSED by " + ", ".join(failures)
    print(
        f"target (inline and async chain backward < {args.target_us:.0f} µs/node): "
        f"{verdict}"
    )
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
