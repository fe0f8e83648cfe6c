"""Command line: ``python -m afnio.testing serve [--host H] [--port P] [--latency S]
[--rpm N] [--tpm N] [--rate-window S] [--batch-polls N] [--feedback-words N]``.

Starts the simulator (a deterministic stand-in, not a model), prints exactly one line,
``afnio simulator serving at http://127.0.0.1:<port>/v1``, and serves until SIGINT or
SIGTERM, then exits 0. ``--rpm``/``--tpm`` enforce OpenAI-style requests- and
tokens-per-minute limits per model (429s with ``retry-after``, ``x-ratelimit-*``
headers; see :mod:`afnio.testing.rate_limits`), refilled over ``--rate-window``
seconds (default 60). ``--batch-polls N``: a Batch API batch finishes at its N-th
poll (``GET /v1/batches/{id}``; default 1), the earlier polls answer ``in_progress``
(:attr:`~afnio.testing.Simulator.batch_polls`). ``--feedback-words N``: every
non-empty LM-written feedback string of a backward answer is padded to at least N
words with a neutral filler sentence
(:attr:`~afnio.testing.Simulator.feedback_words`; the learning is unchanged, the
optimizer prompt grows). ``--port 0`` picks a free port (read it from that line).
Point any OpenAI program at it with ``OPENAI_BASE_URL=http://127.0.0.1:<port>/v1``.
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
    serve.add_argument(
        "--rpm", type=int, default=None, help="requests per minute, per model"
    )
    serve.add_argument(
        "--tpm", type=int, default=None, help="tokens per minute, per model"
    )
    serve.add_argument(
        "--rate-window",
        type=float,
        default=60.0,
        help="seconds in which an RPM/TPM bucket refills (default 60)",
    )
    serve.add_argument(
        "--batch-polls",
        type=int,
        default=1,
        metavar="N",
        help="a Batch API batch completes at its N-th poll (default 1)",
    )
    serve.add_argument(
        "--feedback-words",
        type=int,
        default=None,
        metavar="N",
        help="pad every LM-written feedback of a backward answer to at least N words "
        "with a neutral filler sentence (default: no padding)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        sim = Simulator(
            host=args.host,
            port=args.port,
            latency=args.latency,
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            rate_limit_window=args.rate_window,
            feedback_words=args.feedback_words,
        )
        sim.batch_polls = args.batch_polls
        sim.start()
    except (TypeError, ValueError, OSError) as error:
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
