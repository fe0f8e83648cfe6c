"""Command line: ``python -m afnio.testing serve [--host H] [--port P] [--latency S]``.

Starts the simulator (a deterministic stand-in, not a model), prints exactly one line,
``afnio simulator serving at http://127.0.0.1:<port>/v1``, and serves until SIGINT or
SIGTERM, then exits 0. ``--port 0`` picks a free port (read it from that line). Point
any OpenAI program at it with ``OPENAI_BASE_URL=http://127.0.0.1:<port>/v1``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from afnio.testing.simulator import Simulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m afnio.testing",
        description="afnio's OpenAI-compatible simulator: a deterministic stand-in "
        "for tests, not a model.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the simulator until interrupted")
    serve.add_argument("--host", default="127.0.0.1", help="loopback address only")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument(
        "--latency", type=float, default=0.0, help="seconds slept per request"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        sim = Simulator(host=args.host, port=args.port, latency=args.latency)
        sim.start()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {
        sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        print(f"afnio simulator serving at {sim.base_url}", flush=True)
        while not done.wait(0.2):
            pass
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
