"""afnio's cassette: vcrpy's ``Cassette`` with an index of request keys, a thread-safe
play order, cheap miss reports, and an atomic persister that refuses to write a
credential.

vcrpy's own lookup walks every stored request and re-parses both JSON bodies per
comparison (``Cassette._responses``), twice per request: about 116 s for 1,000
lookups in a 1,000-interaction cassette. Here each request is scrubbed and hashed once
(:func:`afnio_pytest._scrub.request_key`) and looked up in a dict of deques, in recorded
order, under a lock: identical requests replay in the order they were recorded, the
(k+1)th of k recorded is a miss, and N concurrent identical requests with N recorded
all play.

vcrpy is imported lazily: :class:`AtomicPersister` is referenced at collection time,
and ``AfnioCassette`` is built on first access (``_cassette.AfnioCassette``).
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afnio_pytest._types import (
    CassetteSecretError,
    Miss,
    ReplayUsageError,
    Unrecordable,
)

if TYPE_CHECKING:
    from afnio_pytest._types import ReplayState

__all__ = [  # and AfnioCassette, built on first access
    "AtomicPersister",
    "canonical_order",
    "make_body_matcher",
    "upgrade",
]

_SCAN_KINDS = (
    "a provider key",
    "an HTTP auth value",
    "a credential header",
    "a credential query parameter",
    "a credential field of a JSON body",
)

# -- persister -------------------------------------------------------------------------


def _secret_kind(text: str, held: list[str]) -> str | None:
    """What credential ``text`` would hold (never the value), or ``None``."""
    for secret in held:
        if secret in text:
            return "a credential this test holds"
    from afnio._secrets import SECRET_SCAN_PATTERNS

    for i, pattern in enumerate(SECRET_SCAN_PATTERNS):
        if pattern.search(text):
            return _SCAN_KINDS[i] if i < len(_SCAN_KINDS) else "a credential"
    return None


def save_atomically(
    cassette_path: Any, cassette_dict: dict[str, Any], serializer: Any, held: list[str]
) -> None:
    """Serialize a cassette, refuse it (:class:`CassetteSecretError`, nothing written)
    when it would hold a credential, else write it to a temporary file and rename it
    over the cassette (an interrupted recording never leaves half a cassette)."""
    from vcr.serialize import serialize

    data = serialize(cassette_dict, serializer)
    kind = _secret_kind(data, held)
    if kind is not None:
        where = "its metadata"
        requests = cassette_dict.get("requests", [])
        responses = cassette_dict.get("responses", [])
        for i, pair in enumerate(zip(requests, responses, strict=False)):
            one = serialize({"requests": [pair[0]], "responses": [pair[1]]}, serializer)
            found = _secret_kind(one, held)
            if found is not None:
                kind, where = found, f"interaction {i + 1}"
                break
        raise CassetteSecretError(
            f"refusing to write {cassette_path}: {where} would hold a credential "
            f"({kind}); nothing was written. Check what the test sends (a key in a "
            "prompt, a header the scrubber does not know) or the vcr_config hooks."
        )
    path = Path(cassette_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per writer: two processes (xdist workers) saving the same
    # cassette never write into one temporary file; the last replace wins whole
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def canonical_order(
    cassette_dict: dict[str, Any], state: ReplayState
) -> dict[str, Any]:
    """The interactions sorted by request key (method, path, query, body digest),
    identical requests kept in the order they were sent: concurrent requests arrive
    in a different order on every run, and the order of different requests means
    nothing to the replay (each request finds its own; identical ones, such as polls,
    replay in order). So recording the same program twice writes the same file."""
    from afnio_pytest._scrub import ignored_paths, request_key

    requests = list(cassette_dict.get("requests", []))
    responses = list(cassette_dict.get("responses", []))
    if len(requests) != len(responses) or len(requests) < 2:
        return cassette_dict
    ignored = ignored_paths(state.options.ignore_fields)

    def key(i: int) -> Any:
        method, path, query, digest = request_key(requests[i], ignored)
        return (path, method, query, digest)

    order = sorted(range(len(requests)), key=key)  # stable: polls keep their order
    return {
        **cassette_dict,
        "requests": [requests[i] for i in order],
        "responses": [responses[i] for i in order],
    }


class AtomicPersister:
    """A vcrpy persister: loads like vcrpy's filesystem persister (cassette metadata
    included, which pytest-recording's ``CombinedPersister`` cannot load) and saves
    with :func:`save_atomically`. The class itself scans for credential patterns only;
    :meth:`bound` gives one that also knows the credentials a test holds."""

    def __init__(self, state: ReplayState | None = None) -> None:
        self._state = state

    @classmethod
    def load_cassette(cls, cassette_path: Any, serializer: Any) -> Any:
        from vcr.persisters.filesystem import FilesystemPersister

        return FilesystemPersister.load_cassette(cassette_path, serializer)

    @classmethod
    def save_cassette(
        cls, cassette_path: Any, cassette_dict: dict[str, Any], serializer: Any
    ) -> None:
        save_atomically(cassette_path, cassette_dict, serializer, [])

    @classmethod
    def bound(cls, state: ReplayState) -> _BoundPersister:
        """A persister whose save also refuses any credential ``state`` holds."""
        return _BoundPersister(state)


class _BoundPersister:
    def __init__(self, state: ReplayState) -> None:
        self._state = state

    def load_cassette(self, cassette_path: Any, serializer: Any) -> Any:
        return AtomicPersister.load_cassette(cassette_path, serializer)

    def save_cassette(
        self, cassette_path: Any, cassette_dict: dict[str, Any], serializer: Any
    ) -> None:
        save_atomically(
            cassette_path,
            canonical_order(cassette_dict, self._state),
            serializer,
            self._state.held_secrets(),
        )


# -- matcher ---------------------------------------------------------------------------


def make_body_matcher(state: ReplayState) -> Any:
    """vcrpy's ``afnio_body`` matcher for one test: the query and body parts of the
    request keys must be equal (vcr uses it only to compare stored requests; lookups
    go through the index)."""
    from afnio_pytest._scrub import ignored_paths, request_key

    ignored = ignored_paths(state.options.ignore_fields)

    def afnio_body(r1: Any, r2: Any) -> None:
        k1, k2 = (
            _cached_key(r1, ignored, request_key),
            _cached_key(r2, ignored, request_key),
        )
        if k1[2:] != k2[2:]:
            raise AssertionError("the query or the JSON body differs")

    return afnio_body


def _cached_key(request: Any, ignored: Any, request_key: Any) -> Any:
    key = getattr(request, "_afnio_key", None)
    if key is None:
        key = request_key(request, ignored)
        request._afnio_key = key
    return key


# -- the cassette ----------------------------------------------------------------------


def _build_class() -> type:
    from vcr.cassette import Cassette
    from vcr.errors import CannotOverwriteExistingCassetteException
    from vcr.record_mode import RecordMode

    from afnio_pytest import _report
    from afnio_pytest._scrub import _netloc, body_bytes, ignored_paths, request_key

    class AfnioCassette(Cassette):
        """vcrpy's cassette with an index of request keys (see the module docstring).

        Installed by class swap on the cassette pytest-recording opened
        (:func:`upgrade`), so vcrpy's patchers, which hold that instance, call it.
        """

        def _afnio_init(self, state: ReplayState) -> None:
            self._afnio_lock = threading.Lock()
            self._afnio_state = state
            self._afnio_ignored = ignored_paths(state.options.ignore_fields)
            self._index: dict[Any, deque[int]] = defaultdict(deque)
            self._positions: dict[Any, list[int]] = defaultdict(list)
            # what this test sent, in the order answered (recorded or replayed)
            self.sent_requests: list[Any] = []
            for i, (stored, _) in enumerate(self.data):
                key = self._stored_key(stored)
                self._positions[key].append(i)
                if self.play_counts[i] == 0:
                    self._index[key].append(i)

        # keys -------------------------------------------------------------------------

        def _stored_key(self, request: Any) -> Any:
            return _cached_key(request, self._afnio_ignored, request_key)

        def _key(self, request: Any) -> Any:
            """The key of a live request (scrubbed once; ``None`` when it is not an LM
            request). Cached on the request object, which vcr's stubs pass to every
            call for one request."""
            if hasattr(request, "_afnio_key"):
                return request._afnio_key
            scrubbed = self._before_record_request(request)
            if not scrubbed:
                request._afnio_key = None
                request._afnio_scrubbed = None
                return None
            key = request_key(scrubbed, self._afnio_ignored)
            scrubbed._afnio_key = key
            request._afnio_scrubbed = scrubbed
            request._afnio_key = key
            return key

        # misses -----------------------------------------------------------------------

        def _note_miss(self, request: Any, key: Any) -> Miss:
            state = self._afnio_state
            known = state._miss_index.get(key)
            if known is not None:
                return state.add_miss(known)
            scrubbed = getattr(request, "_afnio_scrubbed", None) or request
            raw = body_bytes(scrubbed)
            recorded = len(self._positions.get(key, ()))
            if not self.rewound:
                reason = "no_cassette"
            elif recorded:
                reason = "already_played"
            else:
                reason = "no_match"
            method, path = key[0], key[1]
            index = None
            if reason == "no_match":
                index = _report.closest(
                    method,
                    path,
                    raw,
                    [r for r, _ in self.data],
                    [self.play_counts[i] for i in range(len(self.data))],
                    self._afnio_ignored,
                )
            return state.add_miss(
                Miss(key, method, path, raw, reason, index, recorded=recorded)
            )

        def _refuse_foreign_host(self, request: Any) -> None:
            """Recording against the simulator, an LM request to another host means a
            client was not configured from ``OPENAI_BASE_URL``: refuse it before it
            is sent (it would carry the dummy key, or a real one, elsewhere)."""
            state = self._afnio_state
            if state.mode != "record" or state.simulator_netloc is None:
                return
            host, netloc = _netloc(request.uri)
            if netloc == state.simulator_netloc:
                return
            message = (
                "a client was not configured from OPENAI_BASE_URL (it sent to "
                f"{host}): build it inside the test or a fixture"
            )
            state.add_problem(
                Unrecordable(
                    f"an LM request to {host} while recording against the simulator",
                    "build the client inside the test or a fixture, so it reads "
                    "OPENAI_BASE_URL",
                )
            )
            raise ReplayUsageError(message)

        # vcr's lookup API -------------------------------------------------------------

        def can_play_response_for(self, request: Any) -> bool:
            key = self._key(request)
            if key is None:
                return False
            self._refuse_foreign_host(request)
            if self.record_mode == RecordMode.ALL or not (
                self.rewound or self.allow_playback_repeats
            ):
                if self.write_protected:
                    self._note_miss(request, key)
                return False
            with self._afnio_lock:
                ok = bool(self._index.get(key))
            if not ok and self.write_protected:
                self._note_miss(request, key)
            return ok

        def play_response(self, request: Any) -> Any:
            key = self._key(request)
            index = None
            with self._afnio_lock:
                queue = self._index.get(key)
                if queue:
                    index = queue.popleft()
                    if self.play_counts[index] == 0 and index < self._loaded_count:
                        self._played_interactions.append(self.data[index])
                    self.play_counts[index] += 1
                    self.sent_requests.append(self.data[index][0])
            if index is None:  # lost a race, or one more than recorded
                self._note_miss(request, key)
                raise CannotOverwriteExistingCassetteException(
                    cassette=self, failed_request=request
                )
            return self.data[index][1]

        def append(self, request: Any, response: Any) -> None:
            before = len(self.data)
            super().append(request, response)
            if len(self.data) > before:
                key = self._stored_key(self.data[-1][0])
                with self._afnio_lock:
                    self.sent_requests.append(self.data[-1][0])
                    self._positions[key].append(before)
                    if self.rewound:  # vcr plays new interactions only then
                        self._index[key].append(before)

        def __contains__(self, request: Any) -> bool:
            key = self._key(request)
            with self._afnio_lock:
                return key is not None and bool(self._index.get(key))

        def _responses(self, request: Any) -> Any:
            key = self._key(request)
            for index in list(self._positions.get(key, ())) if key is not None else ():
                yield index, self.data[index][1]

        def find_requests_with_most_matches(self, request: Any) -> list[Any]:
            """The closest stored request, as vcrpy's error message wants it:
            ``[(request, succeeded matchers, [(failed matcher, diff)])]``; cheap on a
            large cassette (vcrpy's own compares every stored request)."""
            key = self._key(request)
            if key is None or not self.data:
                return []
            positions = self._positions.get(key)
            if positions:
                stored = self.data[positions[0]][0]
                return [(stored, ["method", "path", "afnio_body"], [])]
            # the miss was noted by the lookup that failed: do not count it twice
            miss = self._afnio_state._miss_index.get(key) or self._note_miss(
                request, key
            )
            if miss.closest_index is None:
                return []
            stored = self.data[miss.closest_index][0]
            diff = "\n".join(
                _report.body_diff(
                    miss.body or b"", body_bytes(stored), self._afnio_ignored
                )
            )
            same = _report._method_path(stored) == (key[0], key[1])
            succeeded = ["method", "path"] if same else []
            return [(stored, succeeded, [("afnio_body", diff)])]

    return AfnioCassette


_CLASS: type | None = None
_CLASS_LOCK = threading.Lock()


def cassette_class() -> type:
    """:class:`AfnioCassette` (built on first use: it imports vcrpy)."""
    global _CLASS
    with _CLASS_LOCK:
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS


def upgrade(cassette: Any, state: ReplayState) -> Any:
    """Turn the cassette pytest-recording opened into an :class:`AfnioCassette` for
    ``state`` (in place: vcrpy's patchers hold this instance) and bind the persister
    that knows the test's credentials."""
    cassette.__class__ = cassette_class()
    cassette._afnio_init(state)
    cassette._persister = AtomicPersister.bound(state)
    return cassette


def __getattr__(name: str) -> Any:
    if name == "AfnioCassette":
        return cassette_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
