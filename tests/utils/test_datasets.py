"""Datasets and download helpers, fully offline.

* FacilitySupport reads a copy of the real file from ``../shared/data`` (next to the
  project), placed in a temporary root; without that folder (a fresh clone) those
  tests are skipped.
* Downloads are exercised against ``file://`` URLs and a tiny HTTP server on
  127.0.0.1; ``urllib.request.urlopen`` is replaced by a tripwire wherever no
  download may happen.
* TREC uses small fixture files in the upstream format, with verification handled
  explicitly (``verify=False``: their MD5 is not the published one).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import shutil
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from afnio import Variable
from afnio.utils.data import DataLoader, get_batch_size
from afnio.utils.datasets import TREC, FacilitySupport
from afnio.utils.datasets import utils as dl
from afnio.utils.datasets.trec import parse_trec_lines

SHARED_FACILITY = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "facility-support"
)
FACILITY_MD5 = "530dc66b1b07c9b15b19f08891e9bfa0"


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any urlopen call fails the test (and is recorded)."""
    calls: list[str] = []

    def tripwire(request: Any, *args: Any, **kwargs: Any) -> Any:
        url = getattr(request, "full_url", request)
        calls.append(url)
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(urllib.request, "urlopen", tripwire)
    return calls


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}  # noqa: RUF012 (set per server)
    seen: list[tuple[str, str | None]] = []  # noqa: RUF012

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("User-Agent")))
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only a little")
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    """An HTTP server on 127.0.0.1 serving ``handler.files`` (path -> bytes)."""
    handler = type("Handler", (_Handler,), {"files": {}, "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# -- download helpers --------------------------------------------------------------


def test_download_url_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(b"hello afnio")
    out = dl.download_url(src.as_uri(), tmp_path / "dst", md5=md5_of(b"hello afnio"))
    assert out == str(tmp_path / "dst" / "data.bin")
    assert Path(out).read_bytes() == b"hello afnio"
    renamed = dl.download_url(src.as_uri(), tmp_path / "dst", filename="x.bin")
    assert Path(renamed).name == "x.bin" and leftovers(tmp_path / "dst") == []


def test_download_url_skips_when_md5_matches(
    tmp_path: Path, no_network: list[str]
) -> None:
    (tmp_path / "f.txt").write_bytes(b"cached")
    out = dl.download_url(
        "https://example.invalid/f.txt", tmp_path, md5=md5_of(b"cached")
    )
    assert out == str(tmp_path / "f.txt") and no_network == []


def test_download_url_md5_mismatch_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(b"tampered")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "data.bin").write_bytes(b"previous content")
    with pytest.raises(RuntimeError, match=r"^File not found or corrupted\.$"):
        dl.download_url(src.as_uri(), dst, md5=md5_of(b"original"))
    # atomic: the previous file is untouched and no temporary file is left behind
    assert (dst / "data.bin").read_bytes() == b"previous content"
    assert leftovers(dst) == []


def test_download_url_over_http_with_progress(
    tmp_path: Path, server: tuple[str, type[_Handler]]
) -> None:
    base, handler = server
    body = bytes(range(256)) * 5000  # > 1 MiB: several chunks
    handler.files["/files/blob.bin"] = body
    out = dl.download_url(f"{base}/files/blob.bin", tmp_path, md5=md5_of(body))
    assert Path(out).read_bytes() == body
    assert handler.seen == [("/files/blob.bin", "afnio")]
    out = dl.download_url(f"{base}/files/blob.bin", tmp_path, "b2", progress=False)
    assert Path(out).read_bytes() == body


def test_download_url_interrupted_is_atomic(
    tmp_path: Path, server: tuple[str, type[_Handler]]
) -> None:
    base, _ = server
    with pytest.raises(OSError, match="Incomplete download: received 13 of 1000"):
        dl.download_url(f"{base}/truncated/f.bin", tmp_path)
    assert not (tmp_path / "f.bin").exists() and leftovers(tmp_path) == []


def test_download_from_mirrors(
    tmp_path: Path, server: tuple[str, type[_Handler]]
) -> None:
    base, handler = server
    handler.files["/good/f.txt"] = b"content"
    out = dl.download_from_mirrors(
        [f"{base}/missing/", f"{base}/truncated/", f"{base}/good/"],
        tmp_path,
        "f.txt",
        md5_of(b"content"),
        progress=False,
    )
    assert Path(out).read_bytes() == b"content"
    with pytest.raises(RuntimeError, match=r"^Error downloading f2\.txt") as info:
        dl.download_from_mirrors([f"{base}/missing/"], tmp_path, "f2.txt", None)
    assert "404" in str(info.value)


def test_check_md5_and_integrity(tmp_path: Path) -> None:
    p = tmp_path / "a"
    p.write_bytes(b"abc")
    assert dl.check_md5(p, md5_of(b"abc").upper())
    assert not dl.check_md5(p, md5_of(b"abd"))
    assert dl.check_integrity(p) and dl.check_integrity(p, md5_of(b"abc"))
    assert not dl.check_integrity(tmp_path / "missing", md5_of(b"abc"))


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AFNIO_DATA_DIR", str(tmp_path / "data"))
    assert dl.default_data_root() == str(tmp_path / "data")
    monkeypatch.delenv("AFNIO_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dl.default_data_root() == str(tmp_path / ".cache" / "afnio" / "data")


# -- FacilitySupport ---------------------------------------------------------------


@pytest.fixture
def facility_root(tmp_path: Path) -> Path:
    source = SHARED_FACILITY / "dataset.json"
    if not source.is_file():
        pytest.skip(
            "../shared/data is not available (a fresh clone): the Facility Support "
            "dataset tests need it"
        )
    raw = tmp_path / "FacilitySupport" / "raw"
    raw.mkdir(parents=True)
    shutil.copyfile(source, raw / "dataset.json")
    return tmp_path


def test_facility_splits(facility_root: Path, no_network: list[str]) -> None:
    splits = {
        s: FacilitySupport(s, root=str(facility_root)) for s in ("train", "val", "test")
    }
    assert {s: len(d) for s, d in splits.items()} == {
        "train": 66,
        "val": 66,
        "test": 68,
    }
    # the split is random.Random(0).shuffle of the records, then 66 / 66 / rest
    records = json.loads(
        (facility_root / "FacilitySupport/raw/dataset.json").read_text()
    )
    random.Random(0).shuffle(records)
    emails = [r["fields"]["input"] for r in records]
    got = [
        ds[i][0].data
        for s in ("train", "val", "test")
        for ds in [splits[s]]
        for i in range(len(ds))
    ]
    assert got == emails
    assert no_network == []


def test_facility_items(facility_root: Path) -> None:
    ds = FacilitySupport("val", root=str(facility_root), download=False)
    email, targets = ds[0]
    assert isinstance(email, Variable) and isinstance(targets, tuple)
    urgency, sentiment, categories = targets
    assert (email.role, urgency.role, sentiment.role, categories.role) == (
        "input email or message",
        "output urgency",
        "output sentiment",
        "output categories",
    )
    assert all(not v.requires_grad for v in (email, urgency, sentiment, categories))
    flags = json.loads(categories.data)
    assert len(flags) == 10 and all(isinstance(f, bool) for f in flags.values())
    assert "routine_maintenance_requests" in flags and "general_inquiries" in flags
    assert ds[-1][0].data == ds[len(ds) - 1][0].data
    assert ds[0][0] is not email  # fresh Variables on every access
    for bad in (len(ds), -len(ds) - 1):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    with pytest.raises(TypeError, match="integers"):
        ds["0"]  # type: ignore[index]


def test_facility_labels(facility_root: Path) -> None:
    sentiments: Counter[str] = Counter()
    urgencies: Counter[str] = Counter()
    for split in ("train", "val", "test"):
        ds = FacilitySupport(split, root=str(facility_root))
        for _, (u, s, _) in (ds[i] for i in range(len(ds))):
            sentiments[s.data] += 1
            urgencies[u.data] += 1
    assert sentiments == {"neutral": 113, "positive": 61, "negative": 26}
    assert urgencies == {"low": 84, "medium": 63, "high": 53}


def test_facility_is_deterministic(facility_root: Path) -> None:
    a = FacilitySupport("test", root=str(facility_root))
    b = FacilitySupport("test", root=str(facility_root))
    assert [a[i][1][2].data for i in range(len(a))] == [
        b[i][1][2].data for i in range(len(b))
    ]


def test_facility_with_dataloader(facility_root: Path) -> None:
    loader = DataLoader(FacilitySupport("train", root=str(facility_root)), batch_size=8)
    assert len(loader) == 9
    x, (u, s, c) = next(iter(loader))
    assert len(x.data) == len(u.data) == len(s.data) == len(c.data) == 8
    assert u.role == "output urgency"
    assert get_batch_size((x, (u, s, c))) == 8


def test_facility_repr(facility_root: Path) -> None:
    ds = FacilitySupport("val", root=str(facility_root))
    assert repr(ds) == (
        "Dataset FacilitySupport\n"
        "    Number of datapoints: 66\n"
        f"    Root location: {facility_root}\n"
        "    Split: Validation"
    )
    assert repr(FacilitySupport("train", root=str(facility_root))).endswith(
        "Split: Train"
    )
    assert repr(FacilitySupport("test", root=str(facility_root))).endswith(
        "Split: Test"
    )


def test_facility_root_from_environment(
    facility_root: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    monkeypatch.setenv("AFNIO_DATA_DIR", str(facility_root))
    ds = FacilitySupport("train", download=False)
    assert ds.root == str(facility_root) and len(ds) == 66


def test_facility_missing_without_download(
    tmp_path: Path, no_network: list[str]
) -> None:
    expected = tmp_path / "FacilitySupport" / "raw" / "dataset.json"
    with pytest.raises(RuntimeError, match="AFNIO_DATA_DIR") as info:
        FacilitySupport("train", root=str(tmp_path), download=False)
    assert str(expected) in str(info.value)
    assert no_network == []


def test_facility_corrupted_refused_without_network(
    facility_root: Path, no_network: list[str]
) -> None:
    path = facility_root / "FacilitySupport" / "raw" / "dataset.json"
    path.write_bytes(path.read_bytes() + b"\n")  # still valid JSON, wrong MD5
    with pytest.raises(RuntimeError, match="corrupted") as info:
        FacilitySupport("train", root=str(facility_root), download=False)
    assert FACILITY_MD5 in str(info.value) and "verify=False" in str(info.value)
    assert no_network == []
    # explicit opt-out: the local file is used as is
    assert len(FacilitySupport("train", root=str(facility_root), verify=False)) == 66


def test_facility_downloads_and_verifies(
    facility_root: Path,
    tmp_path: Path,
    server: tuple[str, type[_Handler]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, handler = server
    good = (facility_root / "FacilitySupport" / "raw" / "dataset.json").read_bytes()
    handler.files["/mirror/dataset.json"] = good
    handler.files["/bad/dataset.json"] = good + b" "
    monkeypatch.setattr(
        FacilitySupport,
        "mirrors",
        (f"{base}/missing/", f"{base}/bad/", f"{base}/mirror/"),
    )
    root = tmp_path / "fresh"
    ds = FacilitySupport("test", root=str(root))
    assert len(ds) == 68
    assert (root / "FacilitySupport" / "raw" / "dataset.json").read_bytes() == good
    assert [p for p, _ in handler.seen] == [
        "/missing/dataset.json",
        "/bad/dataset.json",
        "/mirror/dataset.json",
    ]
    # all mirrors failing
    monkeypatch.setattr(FacilitySupport, "mirrors", (f"{base}/bad/",))
    with pytest.raises(RuntimeError, match=r"^Error downloading dataset\.json"):
        FacilitySupport("test", root=str(tmp_path / "other"))
    assert leftovers(tmp_path / "other" / "FacilitySupport" / "raw") == []


def test_facility_invalid_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        FacilitySupport("validation", root=str(tmp_path), download=False)


# -- TREC --------------------------------------------------------------------------

TRAIN_LINES = [
    b"DESC:manner How did serfdom develop in and then leave Russia ?",
    b"DESC:def What is a\xf0fjord ?",
    b"DESC:manner How do you cook rice ?",
    b"DESC:def What is a caldera ?",
    b"DESC:manner How did serfdom develop in and then leave Russia ?",  # duplicate
    b"DESC:def What is an atoll ?",
    b"DESC:reason Why is the sky blue ?",
    b"DESC:def What is a fjord ?",  # the same as line 2 once 0xF0 becomes a space
    b"LOC:city What is the capital of Peru ?",
    b"LOC:country Which country has the most lakes ?",
    b"",
    b"LOC:city Where is Timbuktu ?",
    b"LOC:other Where do penguins live ?",
    b"NUM:date When did WWII end ?",
    b"NUM:count How many moons does Mars have ?",
    b"NUM:date When was the Magna Carta signed ?",
    b"NUM:count How many legs has a spider ?",
    b"NUM:date When did the Berlin Wall fall ?",
    b"NUM:money How much is a stamp ?",
    b"HUM:ind Who wrote Hamlet ?",
    b"HUM:ind Who painted the Mona Lisa ?",
    b"HUM:ind Who discovered penicillin ?",
]
TEST_LINES = [
    b"NUM:dist How far is it from Denver to Aspen ?",
    b"LOC:city What county is Modesto , California in ?",
    b"NUM:dist How far is it from Denver to Aspen ?",  # the test file is not deduped
    b"HUM:desc Who was Galileo ?",
]


@pytest.fixture
def trec_root(tmp_path: Path) -> Path:
    raw = tmp_path / "TREC" / "raw"
    raw.mkdir(parents=True)
    (raw / "train_5500.label").write_bytes(b"\n".join(TRAIN_LINES) + b"\n")
    (raw / "TREC_10.label").write_bytes(b"\r\n".join(TEST_LINES) + b"\r\n")
    return tmp_path


def trec(root: Path, task: str, split: str, validation_split: float = 0.0) -> TREC:
    return TREC(
        task, split, validation_split, root=str(root), download=False, verify=False
    )


def items(ds: TREC) -> list[tuple[str, tuple[str, str]]]:
    return [ds[i] for i in range(len(ds))]


def test_parse_trec_lines() -> None:
    parsed = parse_trec_lines(
        [
            b"DESC:def What is a\xf0fjord ?\n",
            b"  \n",
            b"ABBR:exp What does NASA stand for ?",
        ]
    )
    assert parsed == [
        ("What is a fjord ?", ("DESC:def", "DESC")),
        ("What does NASA stand for ?", ("ABBR:exp", "ABBR")),
    ]


def test_trec_train_parsing_and_dedup(trec_root: Path, no_network: list[str]) -> None:
    train = trec(trec_root, "coarse", "train")
    got = items(train)
    assert len(got) == 19  # 21 non-blank lines, 2 duplicates
    assert len(set(got)) == 19
    assert ("What is a fjord ?", ("DESC:def", "DESC")) in got
    assert all(
        isinstance(t, str) and isinstance(f, str) and isinstance(c, str)
        for t, (f, c) in got
    )
    assert {c for _, (_, c) in got} == {"DESC", "LOC", "NUM", "HUM"}
    assert len({f for _, (f, _) in got}) == 10
    assert all(f.split(":")[0] == c for _, (f, c) in got)
    assert no_network == []


def test_trec_test_split_is_in_file_order_without_dedup(trec_root: Path) -> None:
    test = trec(trec_root, "fine", "test")
    assert items(test) == [
        ("How far is it from Denver to Aspen ?", ("NUM:dist", "NUM")),
        ("What county is Modesto , California in ?", ("LOC:city", "LOC")),
        ("How far is it from Denver to Aspen ?", ("NUM:dist", "NUM")),
        ("Who was Galileo ?", ("HUM:desc", "HUM")),
    ]


def test_trec_stratified_split_coarse(trec_root: Path) -> None:
    train = items(trec(trec_root, "coarse", "train", 0.25))
    val = items(trec(trec_root, "coarse", "val", 0.25))
    everything = items(trec(trec_root, "coarse", "train"))
    assert sorted(train + val) == sorted(everything)
    assert not set(train) & set(val)
    # per coarse label: DESC 6 -> 4 + 2, LOC 4 -> 3 + 1, NUM 6 -> 4 + 2, HUM 3 -> 2 + 1
    assert Counter(c for _, (_, c) in train) == {
        "DESC": 4,
        "LOC": 3,
        "NUM": 4,
        "HUM": 2,
    }
    assert Counter(c for _, (_, c) in val) == {"DESC": 2, "LOC": 1, "NUM": 2, "HUM": 1}
    # labels in first-seen order
    assert [c for _, (_, c) in train] == ["DESC"] * 4 + ["LOC"] * 3 + ["NUM"] * 4 + [
        "HUM"
    ] * 2


def test_trec_stratified_split_fine(trec_root: Path) -> None:
    train = items(trec(trec_root, "fine", "train", 0.5))
    val = items(trec(trec_root, "fine", "val", 0.5))
    # per fine label: n -> int(n * 0.5) for train, the rest for val
    everything = Counter(f for _, (f, _) in items(trec(trec_root, "fine", "train")))
    assert Counter(f for _, (f, _) in train) == {
        f: n // 2 for f, n in everything.items() if n // 2
    }
    assert Counter(f for _, (f, _) in val) == {
        f: n - n // 2 for f, n in everything.items()
    }


def test_trec_split_matches_upstream_global_seed_procedure(trec_root: Path) -> None:
    """The private Random(42) gives exactly what upstream's random.seed(42) gave."""
    state = random.getstate()
    try:
        everything = items(trec(trec_root, "coarse", "train"))  # file order, deduped
        # (the train split with validation_split=0 is itself shuffled per label; redo
        # upstream's procedure from the deduplicated file order)
        with open(trec_root / "TREC" / "raw" / "train_5500.label", "rb") as f:
            deduped = list(dict.fromkeys(parse_trec_lines(f)))
        assert sorted(deduped) == sorted(everything)
        groups: dict[str, list[Any]] = {}
        for item in deduped:
            groups.setdefault(item[1][1], []).append(item)
        random.seed(42)
        expected_train: list[Any] = []
        expected_val: list[Any] = []
        for group in groups.values():
            random.shuffle(group)
            cut = int(len(group) * (1 - 0.3))
            expected_train += group[:cut]
            expected_val += group[cut:]
        random.setstate(state)
        before = random.getstate()
        assert items(trec(trec_root, "coarse", "train", 0.3)) == expected_train
        assert items(trec(trec_root, "coarse", "val", 0.3)) == expected_val
        assert random.getstate() == before  # the global state is left alone
    finally:
        random.setstate(state)


def test_trec_is_deterministic(trec_root: Path) -> None:
    assert items(trec(trec_root, "fine", "val", 0.4)) == items(
        trec(trec_root, "fine", "val", 0.4)
    )


@pytest.mark.parametrize(
    ("task", "split", "validation_split", "match"),
    [
        ("medium", "train", 0.0, "'coarse', 'fine'"),
        ("coarse", "dev", 0.0, "'train', 'val', 'test'"),
        ("coarse", "train", 1.0, r"validation_split.*\[0, 1\)"),
        ("coarse", "train", -0.1, r"validation_split"),
        ("coarse", "train", "0.2", r"validation_split"),
        ("coarse", "val", 0.0, "validation_split > 0"),
        ("coarse", "train", 0.9, "training split .* is empty"),  # int(n * 0.1) == 0
        ("coarse", "val", 1e-17, "validation split .* is empty"),  # 1 - 1e-17 == 1.0
    ],
)
def test_trec_errors(
    trec_root: Path, task: str, split: str, validation_split: Any, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        trec(trec_root, task, split, validation_split)


def test_trec_verification_is_explicit(
    trec_root: Path,
    no_network: list[str],
) -> None:
    # the fixtures are not the published files: refused unless verify=False
    with pytest.raises(RuntimeError, match="corrupted") as info:
        TREC("coarse", "train", root=str(trec_root), download=False)
    assert "073462e3fcefaae31e00edb1f18d2d02" in str(info.value)
    with pytest.raises(RuntimeError, match="not found"):
        TREC("coarse", "test", root=str(trec_root / "empty"), download=False)
    assert no_network == []


def test_trec_downloads_are_always_verified(
    trec_root: Path,
    server: tuple[str, type[_Handler]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    base, handler = server
    fixture = (trec_root / "TREC" / "raw" / "TREC_10.label").read_bytes()
    handler.files["/QC/TREC_10.label"] = fixture
    monkeypatch.setattr(TREC, "mirrors", (f"{base}/QC/",))
    root = tmp_path / "download"
    # verify=False does not relax the check of a download
    with pytest.raises(RuntimeError, match=r"^Error downloading TREC_10\.label"):
        TREC("coarse", "test", root=str(root), verify=False)
    assert not (root / "TREC" / "raw" / "TREC_10.label").exists()
    # once the published digest matches (patched here), the download is used
    monkeypatch.setattr(
        TREC,
        "resources",
        {**TREC.resources, "test": ("TREC_10.label", md5_of(fixture))},
    )
    assert len(TREC("coarse", "test", root=str(root))) == 4
    assert handler.seen[-1] == ("/QC/TREC_10.label", "afnio")


def test_trec_repr_and_loader(trec_root: Path) -> None:
    ds = trec(trec_root, "fine", "val", 0.5)
    assert repr(ds) == (
        "Dataset TREC\n"
        f"    Number of datapoints: {len(ds)}\n"
        f"    Root location: {trec_root}\n"
        "    Split: Validation\n"
        "    Task: Classify Fine Labels"
    )
    assert repr(trec(trec_root, "coarse", "test")).endswith(
        "Split: Test\n    Task: Classify Coarse Labels"
    )
    texts, (fine, coarse) = next(iter(DataLoader(ds, batch_size=3)))
    assert len(texts) == len(fine) == len(coarse) == 3
    assert all(isinstance(t, str) for t in texts)
    assert get_batch_size((texts, (fine, coarse))) == 3
    with pytest.raises(IndexError):
        ds[len(ds)]
