"""Client CPU per LM call: one optimization step against a simulator in its own process.

The step is the README's (functional ``chat_completion``, ``exact_match_evaluator``,
``explanation.backward()``, ``TGD.step()``, with ``afnio.set_max_concurrency(256)``)
on the first ``batch`` Facility Support emails (``benchmarks/step_latency.py``'s data
loading), against the bundled simulator started as a **separate process**
(``python benchmarks/client_cpu.py _serve --latency 0.5``: the simulator of
``python -m afnio.testing serve``, plus a pipe on which this script asks for its
counters). So the client process's CPU time (``resource.getrusage(RUSAGE_SELF)``,
user + system, all threads) holds afnio, the openai SDK and its HTTP transport, and
none of the server's work.

After one untimed warm-up call (afnio's loop, the SDK's lazy imports, one
connection), it measures the step and reports per batch:

* ``cpu_ms_per_call``: the client's CPU time over the step / the LM calls the
  simulator answered in it (the issue-21 target is at most 5 ms);
* ``wall_s``, the ``critical_path_s`` (LM rounds x latency, the rounds counted by
  ``step_latency``'s analysis of the requests the simulator received) and their
  ``ratio`` (targets: 1.5 at batch 128, 3.0 at batch 512).

``--transport aiohttp|httpx`` picks afnio's HTTP transport (``OpenAI(transport=...)``;
omitted: afnio's default). ``--client langchain|dspy|dspy-litellm`` runs the same step
with ``LangChainChatModel(ChatOpenAI(...))`` or ``DSPyLM(dspy.LM(...))`` as every
client instead of afnio's ``OpenAI`` (their own HTTP stacks, called in worker
threads). ``--profile PATH`` writes a cProfile of afnio's event-loop thread (where
every request runs) over the step, and prints its top functions.

Run: ``python benchmarks/client_cpu.py [--batches 32 128 512] [--latency 0.5]
[--client openai] [--transport aiohttp] [--repeat 1] [--json PATH] [--profile PATH]``;
it exits 1 if the CPU per call at the largest batch is above ``--target-ms``
(default 5).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import pstats
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: afnio from this checkout
    sys.path.insert(0, str(HERE.parent))

from benchmarks.common import PipedProcess, answer_commands  # noqa: E402

TARGET_CPU_MS = 5.0
TARGET_RATIO = {128: 1.5, 512: 3.0}


def _step_module() -> ModuleType:
    """``benchmarks/step_latency.py`` (loaded by path, as ``benchmarks/__main__``
    does: the benchmarks are scripts, not a package API)."""
    name = "bench_step_latency"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "step_latency.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# -- the simulator's process -----------------------------------------------------------


def serve(latency: float) -> int:
    """The child: a simulator on a free port; prints its base URL, then answers one
    command per stdin line (:func:`benchmarks.common.answer_commands`): ``phase
    NAME`` (the requests since the last command, analysed by ``step_latency``, as one
    JSON line; then the counters restart), ``reset``, ``quit``."""
    from afnio.testing import Simulator

    step = _step_module()
    with Simulator(latency=latency) as sim:

        def phase(name: str) -> dict[str, Any]:
            row = asdict(step._analyse(name, 0.0, sim.stats, sim.requests, latency))
            sim.reset_stats()
            return row

        def reset(_: str) -> dict[str, Any]:
            sim.reset_stats()
            return {}

        answer_commands(sim.base_url, {"phase": phase, "reset": reset})
    return 0


class SimulatorProcess(PipedProcess):
    """The simulator in its own process (``serve``), with its counters over a pipe."""

    def __init__(self, latency: float) -> None:
        super().__init__(str(Path(__file__).resolve()), "_serve", str(latency))

    def reset(self) -> None:
        """Zero the counters and forget the requests."""
        self.ask("reset")

    def phase(self, name: str) -> dict[str, Any]:
        """The calls, kinds and rounds of the requests since the last command."""
        return self.ask(f"phase {name}")


# -- the measured step -----------------------------------------------------------------


@dataclass
class Row:
    """One measured step."""

    batch: int
    latency_s: float
    client: str
    transport: str
    calls: int
    rounds: int
    cpu_s: float
    cpu_ms_per_call: float
    wall_s: float
    critical_path_s: float
    ratio: float
    peak_in_flight: int
    calls_by_phase: dict[str, int]
    data: str


CLIENTS = ("openai", "langchain", "dspy", "dspy-litellm")
"""The clients ``--client`` measures: afnio's ``OpenAI``; ``LangChainChatModel`` of a
``ChatOpenAI``; ``DSPyLM`` of a ``dspy.LM`` with DSPy's default engine (lm15, its
own socket transport) or ``engine="litellm"`` (no cache, in both)."""


@contextmanager
def make_client(
    name: str, base_url: str, transport: str | None = None
) -> Iterator[Any]:
    """The afnio client ``name`` (one of :data:`CLIENTS`) on ``base_url``; closed on
    exit where it can be (the adapters' libraries own their connections)."""
    from afnio.models.openai import OpenAI

    if name == "openai":
        options: dict[str, Any] = {} if transport is None else {"transport": transport}
        with OpenAI(base_url=base_url, api_key="sk-sim", **options) as llm:
            yield llm
        return
    if transport is not None:
        raise ValueError(f"--transport applies to --client openai only, not {name}")
    from afnio.testing import SIMULATOR_MODEL

    if name == "langchain":
        from langchain_openai import ChatOpenAI

        from afnio_integrations.langchain import LangChainChatModel

        yield LangChainChatModel(
            ChatOpenAI(model=SIMULATOR_MODEL, base_url=base_url, api_key="sk-sim")
        )
        return
    if name in ("dspy", "dspy-litellm"):
        import dspy

        from afnio_integrations.dspy import DSPyLM

        engine = {"engine": "litellm"} if name == "dspy-litellm" else {}
        lm = dspy.LM(
            f"openai/{SIMULATOR_MODEL}",
            api_base=base_url,
            api_key="sk-sim",
            cache=False,
            **engine,
        )
        yield DSPyLM(lm)
        return
    raise ValueError(f"unknown client {name!r}: one of {', '.join(CLIENTS)}")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _data(batch: int, dataset: Path | None) -> tuple[list[str], list[str], str]:
    step = _step_module()
    return step.load_data(batch, dataset)


def measure(
    sim: SimulatorProcess,
    batch: int,
    latency: float,
    *,
    client: str = "openai",
    transport: str | None = None,
    dataset: Path | None = None,
    profile: cProfile.Profile | None = None,
) -> Row:
    """One README step at ``batch`` against ``sim`` (after a warm-up call), with
    ``client`` (see :data:`CLIENTS`) as the forward, backward and optimizer client."""
    import afnio
    from afnio import cognitive as cog
    from afnio._runtime import _runtime, run_sync
    from afnio.optim import TGD
    from afnio.testing import SIMULATOR_MODEL

    messages, targets, data = _data(batch, dataset)
    previous = afnio.get_max_concurrency()
    afnio.set_max_concurrency(256)
    try:
        with make_client(client, sim.base_url, transport) as llm:
            afnio.set_backward_model_client(
                llm, completion_args={"model": SIMULATOR_MODEL}
            )
            prompt = cog.Parameter(
                "Classify the sentiment of the message.", role="system prompt"
            )
            chat = [
                {"role": "system", "content": [prompt]},
                {
                    "role": "user",
                    "content": [afnio.Variable("{message}", role="message")],
                },
            ]
            optimizer = TGD([prompt], model_client=llm, model=SIMULATOR_MODEL)
            llm.chat([{"role": "user", "content": "ping"}], model=SIMULATOR_MODEL)
            sim.reset()
            if profile is not None:

                async def enable() -> None:
                    profile.enable()  # profiles the thread it runs on: afnio's loop

                run_sync(enable())
            cpu0, t0 = _cpu(), time.perf_counter()
            optimizer.zero_grad()
            prediction = cog.functional.chat_completion(
                llm, chat, inputs={"message": messages}, model=SIMULATOR_MODEL
            )
            score, explanation = cog.functional.exact_match_evaluator(
                prediction, targets
            )
            explanation.backward()
            optimizer.step()
            wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
            if profile is not None:
                _runtime.loop.call_soon_threadsafe(profile.disable)
                run_sync(_noop())
            phase = sim.phase("step")
            del score
    finally:
        afnio.set_max_concurrency(previous)
    calls, rounds = int(phase["calls"]), int(phase["rounds"])
    critical = rounds * latency
    return Row(
        batch=batch,
        latency_s=latency,
        client=client,
        transport=transport or "default",
        calls=calls,
        rounds=rounds,
        cpu_s=cpu,
        cpu_ms_per_call=1000 * cpu / max(1, calls),
        wall_s=wall,
        critical_path_s=critical,
        ratio=wall / critical if critical else float("inf"),
        peak_in_flight=int(phase["peak_in_flight"]),
        calls_by_phase=dict(phase["calls_by_kind"]),
        data=data,
    )


async def _noop() -> None:
    return None


def run(
    batches: tuple[int, ...] = (32, 128, 512),
    latency: float = 0.5,
    *,
    client: str = "openai",
    transport: str | None = None,
    repeat: int = 1,
    dataset: Path | None = None,
) -> list[dict[str, Any]]:
    """The rows for ``python -m benchmarks run``: one per batch (the best of
    ``repeat`` steps by CPU per call), each a :class:`Row` as a dict."""
    rows = []
    with SimulatorProcess(latency) as sim:
        for batch in batches:
            runs = [
                measure(
                    sim,
                    batch,
                    latency,
                    client=client,
                    transport=transport,
                    dataset=dataset,
                )
                for _ in range(repeat)
            ]
            best = min(runs, key=lambda r: r.cpu_ms_per_call)
            rows.append(asdict(best))
    return rows


def format_row(row: dict[str, Any]) -> str:
    """One line of the table."""
    return (
        f"{row['client']:<13}{row['transport']:<9}{row['batch']:>6}{row['calls']:>7}{row['rounds']:>7}"
        f"{row['cpu_s']:>9.2f}{row['cpu_ms_per_call']:>11.2f}{row['wall_s']:>9.2f}"
        f"{row['critical_path_s']:>9.2f}{row['ratio']:>8.2f}{row['peak_in_flight']:>7}"
    )


HEADER = (
    f"{'client':<13}{'transport':<9}{'batch':>6}{'calls':>7}{'rounds':>7}{'cpu (s)':>9}"
    f"{'ms/call':>11}{'wall (s)':>9}{'crit (s)':>9}{'ratio':>8}{'peak':>7}"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        return serve(float(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--client", choices=CLIENTS, default="openai")
    parser.add_argument("--transport", choices=("aiohttp", "httpx"), default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--target-ms", type=float, default=TARGET_CPU_MS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile of the largest batch"
    )
    args = parser.parse_args(argv)
    rows = []
    print(HEADER, flush=True)
    with SimulatorProcess(args.latency) as sim:
        for batch in args.batches:
            runs = []
            for _ in range(args.repeat):
                prof = (
                    cProfile.Profile()
                    if args.profile and batch == max(args.batches)
                    else None
                )
                row = asdict(
                    measure(
                        sim,
                        batch,
                        args.latency,
                        client=args.client,
                        transport=args.transport,
                        dataset=args.dataset,
                        profile=prof,
                    )
                )
                print(format_row(row), flush=True)
                runs.append(row)
                if prof is not None:
                    prof.dump_stats(str(args.profile))
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            rows.append(min(runs, key=lambda r: r["cpu_ms_per_call"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    worst = rows[-1]["cpu_ms_per_call"]
    ok = worst <= args.target_ms
    print(
        f"client CPU per LM call at batch {rows[-1]['batch']}: {worst:.2f} ms "
        f"(target <= {args.target_ms:.1f} ms): {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
