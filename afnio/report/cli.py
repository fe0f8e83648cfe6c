"""``afnio report RUN_DIR [--out FILE] [--open]``: write a run's HTML report."""

from __future__ import annotations

import argparse
import sys
import webbrowser

from afnio.report import REPORT_FILE, write_report

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afnio report",
        description=(
            "Write one self-contained HTML page (works offline) for a run: score "
            "curves, cost per step by phase, and each parameter's changes with a "
            "word diff and the feedback (and samples) that caused them. Prints the "
            "path of the page."
        ),
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the run's root folder, holding run_log.jsonl (the Trainer's "
        "default_root_dir, or root_dir= of optimize()/AfnioTGD)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help=f"the HTML file to write (default: RUN_DIR/{REPORT_FILE})",
    )
    parser.add_argument(
        "--open",
        action="store_true",
        help="open the page in the default web browser",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``afnio report`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    status: 0 when the report was written, 2 when RUN_DIR has no usable run log, 1
    when the report cannot be written."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"afnio report: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. --out in a folder that cannot be written
        print(f"afnio report: cannot write the report: {error}", file=sys.stderr)
        return 1
    print(path)
    if args.open:
        webbrowser.open(path.resolve().as_uri())
    return 0
