"""Compare two folders of HTTP cassettes as sets of interactions.

Re-recording a cassette against the deterministic simulator must reproduce the same
interactions: the same request bodies with the same answers. Concurrent requests may be
recorded in another order, and hosts and ports differ between runs, so a cassette is
compared as a *multiset* of ``(method, path, request JSON, status, response JSON)``.

Usage::

    cp -r cassettes /tmp/cassettes-before
    python -m pytest -m afnio_replay --afnio-record=all
    python -m afnio.testing.cassettes compare /tmp/cassettes-before cassettes

The command prints every difference and exits 1 if there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["cassette_interactions", "compare_cassette_dirs", "main"]


def _canonical(body: Any) -> str:
    if isinstance(body, dict):  # a response body: {"string": ...}
        body = body.get("string", "")
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body is None:
        return ""
    try:
        return json.dumps(json.loads(body), sort_keys=True)
    except (TypeError, ValueError):
        return str(body)  # SSE streams and other text compare as they are


def cassette_interactions(path: str | Path) -> Counter[tuple[str, str, str, int, str]]:
    """The interactions of one YAML cassette, as a multiset."""
    try:
        import yaml  # installed with the test extras (vcrpy needs it)
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "Comparing cassettes needs PyYAML: pip install 'afnio-local[test]'."
        ) from e
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    found: Counter[tuple[str, str, str, int, str]] = Counter()
    for item in data.get("interactions", []):
        request, response = item["request"], item["response"]
        found[
            (
                request["method"],
                urlsplit(request["uri"]).path,
                _canonical(request.get("body")),
                int(response["status"]["code"]),
                _canonical(response.get("body")),
            )
        ] += 1
    return found


def compare_cassette_dirs(before: str | Path, after: str | Path) -> list[str]:
    """Every difference between two cassette folders (empty when they agree)."""
    before, after = Path(before), Path(after)
    names = {p.relative_to(before) for p in before.rglob("*.yaml")}
    names |= {p.relative_to(after) for p in after.rglob("*.yaml")}
    problems: list[str] = []
    for name in sorted(names):
        a, b = before / name, after / name
        if not a.exists() or not b.exists():
            problems.append(
                f"{name}: only in {'after' if not a.exists() else 'before'}"
            )
            continue
        old, new = cassette_interactions(a), cassette_interactions(b)
        if old == new:
            continue
        for key in sorted((old - new).keys()):
            problems.append(
                f"{name}: no longer recorded: {key[0]} {key[1]} {key[2][:120]}"
            )
        for key in sorted((new - old).keys()):
            problems.append(f"{name}: newly recorded: {key[0]} {key[1]} {key[2][:120]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m afnio.testing.cassettes compare BEFORE AFTER``."""
    parser = argparse.ArgumentParser(prog="python -m afnio.testing.cassettes")
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="compare two cassette folders as sets")
    compare.add_argument("before")
    compare.add_argument("after")
    args = parser.parse_args(argv)
    problems = compare_cassette_dirs(args.before, args.after)
    for line in problems:
        print(line)
    count = len(list(Path(args.after).rglob("*.yaml")))
    print(f"{count} cassettes compared, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
