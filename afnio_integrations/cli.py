"""The ``afnio`` command: ``afnio demo`` (see :mod:`afnio_integrations.demo`)."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: afnio demo [options]   (afnio demo --help for the options)")
        return 0 if args else 2
    if args[0] == "demo":
        from afnio_integrations.demo import main as demo

        return demo(args[1:])
    print(f"afnio: unknown command {args[0]!r}; try: afnio demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
