"""Engine overhead: build and backward a chain of N trivial custom Functions.

No LM is involved: this measures what afnio itself adds per graph node (target: a
plain custom ``backward`` declaring nothing, an inline one and an async one, each
< 50 µs per node on 2 cores). Four kinds of backward are measured (the keys of
:data:`KINDS`):

* ``default``: a plain ``backward`` that declares nothing (what a user writes first);
  it runs directly on afnio's event loop after its first call;
* ``inline``: a plain ``backward`` with ``blocking = False`` (how afnio's own string
  ops run: on the loop from the first call);
* ``async``: an ``async def backward`` (how LM-backed ops run), one task per node,
  under the concurrency bound;
* ``thread``: a plain ``backward`` with ``blocking = True``, run in a worker thread
  (for backwards that block: synchronous LM or HTTP calls).

Each figure is wall time per node (best of ``--repeat``) and the process's CPU time
per node (``RUSAGE_SELF``, user + system, of the same run), which is steadier on a
loaded machine.

Run: ``python benchmarks/engine_overhead.py [--nodes 10000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from typing import Any, NamedTuple

import afnio
from afnio import Variable
from afnio.autodiff import Function

TARGET_US = 50.0
"""The chain backward of the kinds in :data:`TARGET_KINDS` must stay under this many
µs per node."""

TARGET_KINDS = ("default", "inline", "async")


class DefaultStep(Function):
    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data, role="step")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> Variable:
        return grad


class InlineStep(Function):
    blocking = False

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


class BlockingStep(Function):
    blocking = True

    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data, role="step")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> Variable:
        return grad


ThreadStep = BlockingStep  # the name before ``blocking`` existed

KINDS: dict[str, type[Function]] = {
    "default": DefaultStep,
    "inline": InlineStep,
    "async": AsyncStep,
    "thread": BlockingStep,
}
"""Backward kinds by row name (``python -m benchmarks run`` reports
``engine_<name>_us_per_node`` for each)."""

LABELS = {
    "default": "default (declares nothing)",
    "inline": "blocking = False",
    "async": "async def backward",
    "thread": "blocking = True (thread)",
}


class Figures(NamedTuple):
    """µs per node: wall time to build, wall time of backward, CPU time of
    backward (this process, user + system)."""

    build_us: float
    backward_us: float
    backward_cpu_us: float


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(fn: type[Function], nodes: int) -> Figures:
    """Build a chain of ``nodes`` calls of ``fn`` and backward it once."""
    leaf = Variable("x", role="leaf", requires_grad=True)
    t0 = time.perf_counter()
    out = leaf
    for _ in range(nodes):
        out = fn.apply(out)
    t1 = time.perf_counter()
    c1 = _cpu_s()
    out.backward(Variable("feedback"))
    t2 = time.perf_counter()
    c2 = _cpu_s()
    assert len(leaf.grad) == 1 and leaf.grad[0].data == "feedback"
    return Figures(
        (t1 - t0) / nodes * 1e6, (t2 - t1) / nodes * 1e6, (c2 - c1) / nodes * 1e6
    )


def measure_wide(fn: type[Function], nodes: int) -> Figures:
    """The same for ``nodes`` parallel branches joined by one Sum: all branches are
    ready at once."""
    leaves = [Variable(str(i), role="leaf", requires_grad=True) for i in range(nodes)]
    t0 = time.perf_counter()
    total = afnio.functional.sum([fn.apply(leaf) for leaf in leaves])
    t1 = time.perf_counter()
    c1 = _cpu_s()
    total.backward(Variable("feedback"))
    t2 = time.perf_counter()
    c2 = _cpu_s()
    assert all(len(leaf.grad) == 1 for leaf in leaves)
    return Figures(
        (t1 - t0) / nodes * 1e6, (t2 - t1) / nodes * 1e6, (c2 - c1) / nodes * 1e6
    )


def run(nodes: int = 10_000, repeat: int = 3) -> list[dict[str, Any]]:
    """One row per (kind, shape): ``kind``, ``shape`` (``chain``/``wide``),
    ``nodes``, best-of-``repeat`` ``build_us``, ``backward_us`` and
    ``backward_cpu_us`` per node, and ``spread_us`` (the backward's standard
    deviation over the repeats)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * nodes))
    for fn in KINDS.values():  # warm up the loop, the thread pool, first calls
        measure(fn, 100)
    rows: list[dict[str, Any]] = []
    for shape, one in (("chain", measure), ("wide", measure_wide)):
        for name, fn in KINDS.items():
            runs = [one(fn, nodes) for _ in range(repeat)]
            rows.append(
                {
                    "kind": name,
                    "shape": shape,
                    "nodes": nodes,
                    "build_us": min(r.build_us for r in runs),
                    "backward_us": min(r.backward_us for r in runs),
                    "backward_cpu_us": min(r.backward_cpu_us for r in runs),
                    "spread_us": statistics.pstdev(r.backward_us for r in runs),
                }
            )
    return rows


def target_met(rows: list[dict[str, Any]], target_us: float = TARGET_US) -> bool:
    """Whether the chain backward of every kind in :data:`TARGET_KINDS` (the default
    one included) is under ``target_us`` per node."""
    return all(
        r["backward_us"] < target_us
        for r in rows
        if r["kind"] in TARGET_KINDS and r["shape"] == "chain"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target-us", type=float, default=TARGET_US)
    args = parser.parse_args(argv)

    rows = run(args.nodes, args.repeat)
    print(f"{args.nodes} nodes, best of {args.repeat}, µs per node")
    print(
        f"{'backward kind':<28}{'shape':<8}{'build':>8}{'backward':>10}"
        f"{'cpu':>8}  spread"
    )
    for r in rows:
        print(
            f"{LABELS[r['kind']]:<28}{r['shape']:<8}{r['build_us']:>8.1f}"
            f"{r['backward_us']:>10.1f}{r['backward_cpu_us']:>8.1f}"
            f"  (±{r['spread_us']:.1f})"
        )
    print(f"max concurrency: {afnio.get_max_concurrency()}")
    met = target_met(rows, args.target_us)
    print(
        f"target (default, inline and async chain backward < "
        f"{args.target_us:.0f} µs/node): "
        f"{'met' if met else 'MISSED'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
