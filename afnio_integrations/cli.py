"""The ``afnio`` command: ``afnio demo`` (see :mod:`afnio_integrations.demo`) and
``afnio report RUN_DIR`` (see :mod:`afnio.report`)."""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """\
usage: afnio <command> [options]

commands:
  demo    watch an ordinary LangChain chain get better, offline
          (afnio demo --help for its options)
  report  write a run's HTML report (scores, cost, each prompt change
          with its feedback): afnio report RUN_DIR [--out FILE] [--open]
"""


def main(argv: list[str] | None = None) -> int:
    """Run the ``afnio`` command with ``argv`` (default: ``sys.argv``); returns the
    exit status (0 for help, 2 for a missing or unknown command)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "demo":
        from afnio_integrations.demo import main as demo

        return demo(args[1:])
    if args[0] == "report":
        from afnio.report.cli import main as report

        return report(args[1:])
    print(
        f"afnio: unknown command {args[0]!r}; try: afnio demo, "
        "afnio report RUN_DIR (or afnio --help)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
