"""Load files under an address-space limit and report what it took (Linux).

``python -m tests.fixtures_serialization.memory_probe EXTRA_BYTES PATH...`` imports
afnio, warms ``afnio.load`` up, then loads each path in a forked child whose address
space may grow by at most ``EXTRA_BYTES`` (``RLIMIT_AS``) and prints one JSON line
per path: ``{"path", "outcome", "message", "seconds", "peak_extra_vm",
"peak_extra_rss"}``; ``outcome`` is ``"loaded"``, the exception's class name (a
``MemoryError`` when the limit was hit) or ``"crashed"``.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
from typing import Any


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure, in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError:
        pass


def _measure(path: str, extra: int) -> dict[str, Any]:
    import afnio

    base_vm, base_rss = _status("VmSize"), _status("VmRSS")
    _reset_peak_rss()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (base_vm + extra, hard))
    start = time.monotonic()
    result: dict[str, Any] = {"path": path, "message": ""}
    try:
        afnio.load(path)
        result["outcome"] = "loaded"
    except BaseException as e:  # reported, whatever it is
        result["outcome"] = type(e).__name__
        result["message"] = str(e)[:300]
    result["seconds"] = round(time.monotonic() - start, 3)
    # VmPeak is inherited from the parent: it counts only if this child raised it
    result["peak_extra_vm"] = max(0, _status("VmPeak") - base_vm)
    result["peak_extra_rss"] = max(0, _status("VmHWM") - base_rss)
    return result


def main(argv: list[str]) -> None:
    import afnio

    extra, paths = int(argv[0]), argv[1:]
    buf = io.BytesIO()
    afnio.save({"warm": [afnio.Variable("up")]}, buf)
    buf.seek(0)
    afnio.load(buf)  # import whatever loading imports lazily
    for path in paths:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report, leave without cleanup
            os.close(read)
            try:
                line = json.dumps(_measure(path, extra))
            except BaseException as e:  # the report must get out
                line = json.dumps(
                    {"path": path, "outcome": "crashed", "message": repr(e)}
                )
            os.write(write, line.encode())
            os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        os.waitpid(pid, 0)
        text = b"".join(chunks).decode() or json.dumps(
            {"path": path, "outcome": "crashed", "message": "no report"}
        )
        print(text, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
