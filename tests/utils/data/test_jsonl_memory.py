"""Data larger than memory: a JsonlDataset streams a file several times larger than
the address-space bound its process runs under (where reading the file whole fails),
and a Trainer fit frees each step's graph (by reference counting alone) and keeps its
resident memory growth bounded (benchmarks/memory_growth.py, scaled down)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import memory_growth
from tests._helpers import collect_what_earlier_tests_left

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS"
)

BOUND_MB = 12  # the address space the reading process may add after its imports
FILE_MB = 3 * BOUND_MB

READER = textwrap.dedent(
    """
    import json, resource, sys
    from afnio.utils.data import DataLoader, JsonlDataset

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    path, bound = sys.argv[1], int(sys.argv[2]) * 2**20
    dataset = JsonlDataset(path, input="text", target="label", buffer_size=64, seed=0)
    loader = DataLoader(dataset, batch_size=16)
    next(iter(loader))  # everything the loop needs is imported and allocated once
    limit = vm_size() + bound
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    ids = []
    for epoch in range(2):
        seen = 0
        for x, y in loader:
            seen += len(x.data)
            ids.append(int(x.data[0].split()[1]))
        print("epoch", seen, flush=True)
    try:
        with open(path, "rb") as f:
            whole = f.read()
        print("whole file read", len(whole))
    except MemoryError:
        print("whole file: MemoryError")
    print(json.dumps({"distinct_first_ids": len(set(ids))}))
    """
)


@linux_only
def test_a_file_three_times_the_memory_bound_streams_for_two_epochs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.jsonl"
    pad = "x" * 1000
    rows = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < FILE_MB * 2**20:
            f.write(json.dumps({"text": f"row {rows} {pad}", "label": "a"}) + "\n")
            rows += 1
    assert path.stat().st_size >= 3 * BOUND_MB * 2**20
    out = subprocess.run(
        [sys.executable, "-c", READER, str(path), str(BOUND_MB)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[:2] == [f"epoch {rows}", f"epoch {rows}"]  # every row, twice
    # the bound is real: the file does not fit in it
    assert lines[2] == "whole file: MemoryError"
    assert json.loads(lines[3])["distinct_first_ids"] > 1


@linux_only
def test_a_fit_frees_every_step_graph_and_its_memory_growth_is_bounded() -> None:
    left = collect_what_earlier_tests_left()
    print("left by earlier tests:", left)
    row = memory_growth.measure(steps=30, batch=4, gc_off=True)
    assert row["steps"] == 30 and row["calls"] >= 30 * 5
    # the cyclic collector was off: reference counting alone freed each graph
    assert row["graphs_alive_max"] == 1
    assert row["graphs_alive_after"] == 0
    # a graph left in a cycle every step would leave thousands of objects
    assert row["cyclic_garbage"] < 300
    assert row["growth_mb"] < 50  # generous: about 5 MB measured for 30 steps
