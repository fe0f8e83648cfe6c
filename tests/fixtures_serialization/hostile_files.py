"""Hostile checkpoint files for ``afnio.load``'s limits, each at most 1 MB on disk.

They are written without ever building their inflated contents (up to 1 GiB):
:func:`raw_deflate` compresses one block of a repeated unit after a full flush and
repeats its compressed bytes, and :func:`write_zip` writes the archive by hand, so
a header may declare any size.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from afnio.serialization import LoadLimits

HEAD = b'{"format":"afnio","version":1,"data":'
_BLOCK = 1 << 20  # bytes of repeated units compressed once


def raw_deflate(parts: Sequence[tuple[bytes, int]]) -> tuple[bytes, int, int]:
    """The raw deflate stream of ``b"".join(unit * count for unit, count in parts)``,
    with its CRC-32 and size (never building that join)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    out: list[bytes] = []
    crc = size = 0
    for unit, count in parts:
        per_block = max(1, _BLOCK // len(unit))
        blocks, rest = divmod(count, per_block)
        if blocks:
            block = unit * per_block
            out.append(co.flush(zlib.Z_FULL_FLUSH))
            # after a full flush nothing refers back: the same block compresses to
            # the same bytes, which can be repeated
            packed = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
            out.append(packed * blocks)
            for _ in range(blocks):
                crc = zlib.crc32(block, crc)
            size += len(block) * blocks
        tail = unit * rest
        out.append(co.compress(tail))
        crc = zlib.crc32(tail, crc)
        size += len(tail)
    out.append(co.flush())
    return b"".join(out), crc, size


def write_zip(
    path: Path,
    deflated: bytes,
    crc: int,
    size: int,
    *,
    declared_size: int | None = None,
    name: bytes = b"data.json",
) -> Path:
    """A zip archive holding one deflated member whose header says
    ``declared_size`` (default: the true ``size``)."""
    declared = size if declared_size is None else declared_size
    common = struct.pack("<4H3L", 0, 8, 0, 0x21, crc, len(deflated), declared)
    local = b"PK\x03\x04" + struct.pack("<H", 20) + common
    local += struct.pack("<2H", len(name), 0) + name
    central = b"PK\x01\x02" + struct.pack("<2H", 20, 20) + common
    central += struct.pack("<5H2L", len(name), 0, 0, 0, 0, 0, 0) + name
    end = b"PK\x05\x06" + struct.pack(
        "<4H2LH", 0, 0, 1, 1, len(central), len(local) + len(deflated), 0
    )
    path.write_bytes(local + deflated + central + end)
    return path


def _document(path: Path, parts: Sequence[tuple[bytes, int]], **kw: int) -> Path:
    return write_zip(path, *raw_deflate(parts), **kw)


# -- the files of issue 16, item 2 ----------------------------------------------------


def empty_lists_48mib(path: Path, limits: LoadLimits) -> Path:
    """48 MiB of ``[],`` (a 49 KB file; it took 2.4 GB and 58 s to load)."""
    return _document(path, [(HEAD + b"[", 1), (b"[],", 16 << 20), (b"[]]}", 1)])


def string_1gib(path: Path, limits: LoadLimits) -> Path:
    """One string of 1 GiB (a 1 MB file; it took 3.1 GB)."""
    return _document(path, [(HEAD + b'"', 1), (b"a", 1 << 30), (b'"}', 1)])


def lying_header(path: Path, limits: LoadLimits) -> Path:
    """The 1 GiB string, with a header declaring 1 MiB (it took 2.1 GB before
    failing its CRC)."""
    return _document(
        path,
        [(HEAD + b'"', 1), (b"a", 1 << 30), (b'"}', 1)],
        declared_size=1 << 20,
    )


# -- files just within the default limits (the costliest the limits let through) -----


def _fill(limits: LoadLimits, unit: bytes, elements_per_unit: int) -> int:
    """How many ``unit``\\ s fit in the limits, leaving room for the document."""
    by_elements = (limits.max_elements - 64) // elements_per_unit
    by_bytes = (limits.max_bytes - 256) // len(unit)
    return min(by_elements, by_bytes)


def empty_lists_at_limits(path: Path, limits: LoadLimits) -> Path:
    """As many ``[]`` as the limits admit: loads as a list of empty lists."""
    n = _fill(limits, b"[],", 2)
    return _document(path, [(HEAD + b"[", 1), (b"[],", n), (b"[]]}", 1)])


def small_dicts_at_limits(path: Path, limits: LoadLimits) -> Path:
    """As many ``{"":0}`` (the costliest element per byte) as the limits admit."""
    n = _fill(limits, b'{"":0},', 4)
    return _document(path, [(HEAD + b"[", 1), (b'{"":0},', n), (b"0]}", 1)])


def floats_at_limits(path: Path, limits: LoadLimits) -> Path:
    """As many floats as the limits admit: loads as a list of floats."""
    n = _fill(limits, b"0.5,", 1)
    return _document(path, [(HEAD + b"[", 1), (b"0.5,", n), (b"0]}", 1)])


def variables_at_limits(path: Path, limits: LoadLimits) -> Path:
    """As many Variables as the limits admit: loads as a list of Variables."""
    unit = b'{"__afnio__":"variable","data":0,"role":"","requires_grad":false},'
    n = _fill(limits, unit, 12)
    return _document(path, [(HEAD + b"[", 1), (unit, n), (b"0]}", 1)])


def _wide_strings(limits: LoadLimits, room: int) -> list[tuple[bytes, int]]:
    """Strings within ``room`` bytes of JSON, each starting with an escaped emoji
    so that Python stores every character in 4 bytes."""
    length = min(limits.max_string_length - 1, 1 << 20)
    unit = b'"\\ud83d\\ude00' + b"a" * length + b'",'
    parts: list[tuple[bytes, int]] = []
    count, rest = divmod(room, len(unit))
    for _ in range(count):
        parts += [(b'"\\ud83d\\ude00', 1), (b"a", length), (b'",', 1)]
    if rest > 32:
        parts += [(b'"\\ud83d\\ude00', 1), (b"a", rest - 32), (b'",', 1)]
    return parts


def wide_strings_at_limits(path: Path, limits: LoadLimits) -> Path:
    """Strings filling the limits, stored 4 bytes per character: loads."""
    room = limits.max_bytes - 256
    parts = [(HEAD + b"[", 1), *_wide_strings(limits, room), (b"0]}", 1)]
    return _document(path, parts)


def dicts_and_wide_strings_at_limits(path: Path, limits: LoadLimits) -> Path:
    """Small dicts up to the element limit, then wide strings up to the byte limit:
    the most memory a file within the default limits can make ``json`` use."""
    n = (limits.max_elements - 4096) // 4
    room = limits.max_bytes - 256 - 7 * n
    parts = [(HEAD + b"[", 1), (b'{"":0},', n), *_wide_strings(limits, room)]
    return _document(path, [*parts, (b"0]}", 1)])


def wide_text(path: Path, limits: LoadLimits) -> Path:
    """Raw UTF-8 text of ``max_bytes`` bytes holding one emoji, so that Python
    would store it in 4 bytes per character: refused after decoding."""
    body = limits.max_bytes - len(HEAD) - 8
    parts = [(HEAD + '"😀'.encode(), 1), (b"a", body), (b'"}', 1)]
    return _document(path, parts)


def deep_nesting(path: Path, limits: LoadLimits) -> Path:
    """100,000 nested arrays."""
    return _document(path, [(HEAD, 1), (b"[", 100_000), (b"]", 100_000), (b"}", 1)])


def huge_int(path: Path, limits: LoadLimits) -> Path:
    """A 100,000-digit integer."""
    return _document(path, [(HEAD, 1), (b"7", 100_000), (b"}", 1)])


# name -> (builder, the outcome afnio.load must have)
CASES: dict[str, tuple[Callable[[Path, LoadLimits], Path], str]] = {
    "empty_lists_48mib": (empty_lists_48mib, "SerializationError"),
    "string_1gib": (string_1gib, "SerializationError"),
    "lying_header": (lying_header, "SerializationError"),
    "empty_lists_at_limits": (empty_lists_at_limits, "loaded"),
    "small_dicts_at_limits": (small_dicts_at_limits, "SerializationError"),
    "floats_at_limits": (floats_at_limits, "loaded"),
    "variables_at_limits": (variables_at_limits, "loaded"),
    "wide_strings_at_limits": (wide_strings_at_limits, "loaded"),
    "dicts_and_wide_strings_at_limits": (
        dicts_and_wide_strings_at_limits,
        "SerializationError",
    ),
    "wide_text": (wide_text, "SerializationError"),
    "deep_nesting": (deep_nesting, "SerializationError"),
    "huge_int": (huge_int, "SerializationError"),
}
