"""What a cassette keeps of a request and a response, and the key requests match on.

* **LM requests only**: a request is recorded (and replayed) when its host is the
  active endpoint (the simulator, the provider being recorded, the replay address), a
  known provider host (:data:`~afnio_pytest._types.KNOWN_LM_HOSTS`),
  ``simulator.invalid`` (what cassettes show for the simulator) or a host the marker
  names in ``lm_hosts``.
* **Requests**: every header but ``content-type`` is dropped, URL user info and
  credential query parameters too; a URL path segment that looks like a key is
  replaced by ``<redacted>`` (the rest of the path is kept); a credential in a JSON
  body is masked; any value of a credential the test holds is replaced by
  ``<redacted>`` wherever it appears (body, URL path and query). A ``Basic``
  authorization also holds its decoded ``user:password`` and password.
* **Responses**: only ``content-type``, ``retry-after``, ``retry-after-ms``,
  ``x-should-retry`` and ``x-afnio-simulator`` are kept; held credentials are redacted
  in the body.
* **Key**: ``(METHOD, path, sorted non-credential query pairs, body digest)``; the body
  digest ignores JSON key order, whitespace, credentials and the ignored fields.

The credential rules are afnio's own (:mod:`afnio._secrets`), imported lazily (importing
anything under ``afnio`` costs a quarter of a second).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit, urlunsplit

from afnio_pytest._types import (
    DEFAULT_IGNORED_FIELDS,
    KNOWN_LM_HOSTS,
    SIMULATOR_HOST,
    Unrecordable,
)

if TYPE_CHECKING:
    from afnio_pytest._types import ReplayState

__all__ = [
    "KEPT_RESPONSE_HEADERS",
    "body_bytes",
    "body_digest",
    "host_matches",
    "is_lm_netloc",
    "parse_field_path",
    "redact_literals",
    "redact_url_literals",
    "request_key",
    "scrub_live_request",
    "scrub_request",
    "scrub_response",
]

KEPT_RESPONSE_HEADERS = frozenset(
    {
        "content-type",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "x-afnio-simulator",
    }
)
"""Response headers a cassette keeps: the content type, what drives the SDKs' retry
decisions, and the simulator's marker. Everything else (dates, cookies, request ids,
rate-limit counters) changes every run or identifies the account."""

_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "api-key", "x-api-key", "x-goog-api-key", "anthropic-api-key"}
)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

Key = tuple[str, str, tuple[tuple[str, str], ...], str]


# -- hosts ----------------------------------------------------------------------------


def _netloc(uri: str) -> tuple[str, str]:
    """``(host, host[:port])`` of a URI, lower-cased, without user info."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2].lower()
    return (parts.hostname or "").lower(), netloc


def host_matches(host: str, netloc: str, pattern: str) -> bool:
    """Whether a host (or ``host:port``) matches ``pattern``: an exact name, a
    ``host:port``, or ``*.domain`` (any subdomain)."""
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern in (host, netloc)


def is_lm_netloc(uri: str, state: ReplayState | None = None) -> bool:
    """Whether a request to ``uri`` is an LM request (see the module docstring)."""
    host, netloc = _netloc(uri)
    if host == SIMULATOR_HOST:
        return True
    if state is not None:
        if netloc in (state.endpoint_netloc, state.simulator_netloc):
            return True
        if any(host_matches(host, netloc, p) for p in state.options.lm_hosts):
            return True
    return any(host_matches(host, netloc, p) for p in KNOWN_LM_HOSTS)


# -- literal redaction -----------------------------------------------------------------


def redact_literals(data: Any, secrets: Sequence[str]) -> Any:
    """``data`` (bytes or str) with every held credential replaced by ``<redacted>``;
    anything else unchanged. ``secrets`` should be longest first."""
    if not secrets or not isinstance(data, (bytes, str)) or not data:
        return data
    from afnio._secrets import REDACTED

    if isinstance(data, bytes):
        for secret in secrets:
            raw = secret.encode("utf-8")
            if raw in data:
                data = data.replace(raw, REDACTED.encode())
        return data
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, REDACTED)
    return data


# -- requests --------------------------------------------------------------------------


def _scrub_json_body(body: Any) -> Any:
    """A JSON body with its credentials masked; any other body as it is. A body with
    nothing to mask is returned unchanged (byte for byte)."""
    if not isinstance(body, (str, bytes)) or not body:
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body
    masked = mask_body(data)
    return body if masked == data else json.dumps(masked)


def mask_body(data: Any) -> Any:
    """A parsed JSON body with its credentials masked: a provider key inside a text
    is replaced where it stands (``"my key <redacted> fails"``: the rest of a prompt
    is kept, for matching and for the reader), a value under a credential name or a
    whole HTTP auth value entirely (:func:`afnio._secrets.mask_secrets`)."""
    from afnio._secrets import REDACTED, SECRET_VALUE_RE, mask_secrets

    def in_place(obj: Any) -> Any:
        if isinstance(obj, str):
            return SECRET_VALUE_RE.sub(REDACTED, obj)
        if isinstance(obj, dict):
            return {key: in_place(value) for key, value in obj.items()}
        if isinstance(obj, list):
            return [in_place(item) for item in obj]
        return obj

    return mask_secrets(in_place(data))


def _auth_token(value: str) -> str:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() in ("bearer", "basic", "token") and token.strip():
        return token.strip()
    return value


def _basic_credentials(value: str) -> list[str]:
    """The secrets a ``Basic`` authorization value carries besides its base64 token:
    the decoded ``user:password`` and the password (the user name alone is not a
    secret). Decoded tolerantly (missing padding, URL-safe alphabet); an empty list
    for any other scheme or for a token that is not base64 of UTF-8 text."""
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "basic" or not token:
        return []
    padded = token + "=" * (-len(token) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"))
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return []
    _user, sep, password = text.partition(":")
    if not sep or not password:
        return [text] if text else []
    return [text, password]


def _credential_values(value: str) -> list[str]:
    """What a credential header value holds: the value, its token without the auth
    scheme, and for ``Basic`` the decoded ``user:password`` and password."""
    return [value, _auth_token(value), *_basic_credentials(value)]


def _url_forms(secret: str) -> list[str]:
    """The forms a held credential takes in a URL: as is and percent-encoded."""
    forms = {secret, quote(secret, safe=""), quote(secret)}
    return sorted(forms, key=len, reverse=True)


def _redact_url_part(text: str, held: Sequence[str], sep: str, plus: bool) -> str:
    """A URL path (``sep="/"``) or query (``sep="&"``) with every held credential
    replaced by ``<redacted>``: literally (as is or percent-encoded), then any piece
    (a segment, a ``name=value`` pair's value) that holds one once decoded, whatever
    its encoding, is redacted whole."""
    from afnio._secrets import REDACTED

    for secret in held:
        for form in _url_forms(secret):
            if form in text:
                text = text.replace(form, REDACTED)
    decode = unquote_plus if plus else unquote
    pieces = text.split(sep)
    for i, piece in enumerate(pieces):
        name, eq, value = piece.partition("=") if plus else ("", "", piece)
        if any(secret in decode(value) for secret in held):
            pieces[i] = f"{name}{eq}{REDACTED}"
        elif plus and any(secret in decode(name) for secret in held):
            pieces[i] = f"{REDACTED}{eq}{value}"
    return sep.join(pieces)


def redact_url_literals(uri: str, held: Sequence[str]) -> str:
    """``uri`` with every held credential in its path and query replaced by
    ``<redacted>`` (see :func:`_redact_url_part`); scheme, host, the rest of the path
    and the other query parameters are kept. ``held`` should be longest first."""
    if not held or not isinstance(uri, str):
        return uri
    parts = urlsplit(uri)
    path = _redact_url_part(parts.path, held, "/", plus=False)
    query = _redact_url_part(parts.query, held, "&", plus=True)
    if (path, query) == (parts.path, parts.query):
        return uri
    return urlunsplit(parts._replace(path=path, query=query))


def _redact_path_segments(path: str, collect: set[str] | None) -> str:
    """``path`` with each segment that looks like a credential (a provider key, an
    auth value) replaced by ``<redacted>``; the value is added to ``collect`` (when
    given) so that it is redacted from the body too."""
    from afnio._secrets import REDACTED, looks_like_credential

    if not path:
        return path
    segments = path.split("/")
    changed = False
    for i, segment in enumerate(segments):
        if not segment or segment == REDACTED:
            continue
        value = unquote(segment)
        if looks_like_credential(value):
            if collect is not None:
                collect.add(value)
            segments[i] = REDACTED
            changed = True
    return "/".join(segments) if changed else path


def scrub_request(
    request: Any,
    *,
    simulator_netloc: str | None = None,
    held: list[str] | None = None,
    collect: set[str] | None = None,
) -> Any:
    """What a cassette records of a vcr ``Request`` (changed in place and returned):
    no header but ``content-type``, no user info or credential query parameter in the
    URL, no key-like path segment, no credential in a JSON body, no held credential
    anywhere in the body, the URL path or the query, and the simulator under one stable
    host (``simulator.invalid``).

    Args:
        request: a vcr request (vcr hands filters a deep copy).
        simulator_netloc: the simulator's ``127.0.0.1:<port>``; ``None`` maps any
            loopback host to ``simulator.invalid`` (how afnio's own cassettes were
            recorded).
        held: credentials to redact literally from the body, the URL path and the
            query (longest first).
        collect: when given, credential values found in headers (for ``Basic``
            auth also the decoded ``user:password`` and password), user info, the
            query string and the URL path are added to it before they are dropped.
    """
    from afnio._secrets import is_credential_name, looks_like_credential

    for name, value in list(request.headers.items()):
        if collect is not None and isinstance(value, str) and value:
            lower = name.lower()
            if (
                lower in _CREDENTIAL_HEADERS
                or is_credential_name(name, header=True)
                or looks_like_credential(value)
            ):
                collect.update(_credential_values(value))
    # names in lower case: httpx and aiohttp spell them differently, and a cassette
    # must not depend on the transport that recorded it
    request.headers = {
        k.lower(): v for k, v in request.headers.items() if k.lower() == "content-type"
    }
    parts = urlsplit(request.uri)
    userinfo, _, netloc = parts.netloc.rpartition("@")
    if collect is not None and userinfo:
        collect.add(unquote_plus(userinfo.partition(":")[2] or userinfo))
    if simulator_netloc is None:
        if (parts.hostname or "") in _LOOPBACK:
            netloc = SIMULATOR_HOST
    elif netloc.lower() == simulator_netloc:
        netloc = SIMULATOR_HOST
    kept = []
    for part in parts.query.split("&") if parts.query else []:
        name, _, value = part.partition("=")
        if is_credential_name(unquote_plus(name), query=True) or looks_like_credential(
            unquote_plus(value)
        ):
            if collect is not None and value:
                collect.add(unquote_plus(value))
            continue
        kept.append(part)
    path = _redact_path_segments(parts.path, collect)
    uri = urlunsplit(parts._replace(netloc=netloc, path=path, query="&".join(kept)))
    request.uri = redact_url_literals(uri, held) if held else uri
    body = request.body
    if isinstance(body, (str, bytes)):  # never a file or an iterator
        body = _scrub_json_body(body)
        if held:
            body = redact_literals(body, held)
        request.body = body
    return request


def scrub_live_request(request: Any, state: ReplayState) -> Any:
    """:func:`scrub_request` for a request a marked test sends: ``None`` when it is not
    an LM request (vcr then neither records nor replays it), else scrubbed with the
    test's held credentials (the ones found in it are added to them first), in the
    body and in the URL path and query. The request key is computed from what this
    returns, so recording and replay compute it from the same redacted URL."""
    if not is_lm_netloc(request.uri, state):
        return None
    found: set[str] = set()
    simulator = state.simulator_netloc or ""
    # collect first: a credential sent in a header must also vanish from the body
    scrub_request(request, simulator_netloc=simulator, held=None, collect=found)
    for value in found:
        state.add_secret(value)
    held = state.held_secrets()
    if held:
        request.uri = redact_url_literals(request.uri, held)
        if isinstance(request.body, (str, bytes)):
            request.body = redact_literals(request.body, held)
    return request


# -- responses -------------------------------------------------------------------------


def _decode_zstd(response: dict[str, Any], state: ReplayState | None) -> None:
    headers = response.get("headers") or {}
    encoding = next(
        (v for k, v in headers.items() if k.lower() == "content-encoding"), None
    )
    values = encoding if isinstance(encoding, list) else [encoding]
    if not any(isinstance(v, str) and "zstd" in v.lower() for v in values):
        return
    body = response.get("body", {}).get("string")
    try:
        import zstandard  # type: ignore[import-not-found]

        data = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    except Exception:
        if state is not None:
            state.add_problem(
                Unrecordable(
                    "a response came back zstd-compressed and cannot be stored "
                    "readably",
                    "install the zstandard package, or send Accept-Encoding without "
                    "zstd",
                )
            )
        return
    response["body"]["string"] = data
    for name in [
        k for k in headers if k.lower() in ("content-encoding", "content-length")
    ]:
        del headers[name]


def scrub_response(response: dict[str, Any], state: ReplayState | None = None) -> Any:
    """What a cassette records of a response (a vcr response dict, changed in place):
    the allowed headers only, and no held credential in the body."""
    _decode_zstd(response, state)
    response["headers"] = {
        k.lower(): v  # as for requests: the same file whatever the transport
        for k, v in (response.get("headers") or {}).items()
        if k.lower() in KEPT_RESPONSE_HEADERS
    }
    if state is not None:
        body = response.get("body")
        held = state.held_secrets()
        if held and isinstance(body, dict):
            body["string"] = redact_literals(body.get("string"), held)
    return response


# -- matching key ----------------------------------------------------------------------

_FIELD_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+|\*)\]")


def parse_field_path(path: str) -> tuple[str | int, ...]:
    """``"messages[0].name"`` → ``("messages", 0, "name")``; ``[*]`` is any item
    (``"*"``). ``ValueError`` for an empty or malformed path."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"an ignore_fields entry must be a dotted path, got {path!r}")
    parts: list[str | int] = []
    pos = 0
    for match in _FIELD_TOKEN.finditer(path):
        gap = path[pos : match.start()]
        if gap not in ("", "."):
            raise ValueError(f"cannot parse the ignore_fields path {path!r}")
        name, index = match.groups()
        if name is not None:
            parts.append(name)
        else:
            parts.append("*" if index == "*" else int(index))
        pos = match.end()
    if pos != len(path) or not parts:
        raise ValueError(f"cannot parse the ignore_fields path {path!r}")
    return tuple(parts)


_DROPPED = object()
"""A list item removed by :func:`_drop`, until :func:`_compact` takes it out."""


def _compact(obj: Any) -> Any:
    """``obj`` without the list items :func:`_drop` marked (in place)."""
    if isinstance(obj, dict):
        for value in obj.values():
            _compact(value)
    elif isinstance(obj, list):
        obj[:] = [_compact(item) for item in obj if item is not _DROPPED]
    return obj


def _drop(obj: Any, parts: tuple[str | int, ...]) -> None:
    """Remove the field at ``parts`` from parsed JSON (in place); absent is fine."""
    head, rest = parts[0], parts[1:]
    if isinstance(obj, dict):
        if isinstance(head, str) and head in obj:
            if rest:
                _drop(obj[head], rest)
            else:
                del obj[head]
        return
    if isinstance(obj, list):
        if head == "*":
            indices = range(len(obj))
        elif isinstance(head, int) and head < len(obj):
            indices = range(head, head + 1)
        else:
            return
        if not rest:  # marked, removed by _compact: later indices keep their items
            for i in indices:
                obj[i] = _DROPPED
            return
        for i in indices:
            _drop(obj[i], rest)


def body_bytes(request: Any) -> bytes:
    """A vcr request's body as bytes (``b""`` when empty)."""
    raw = getattr(request, "body_bytes", None)
    if raw is None:
        raw = request.body
    if hasattr(raw, "read"):
        raw = raw.read()
    elif raw is not None and not isinstance(raw, (bytes, str)):
        try:
            raw = b"".join(raw)
        except TypeError:
            raw = repr(raw)
    if raw is None:
        return b""
    return raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)


def canonical_json(data: Any) -> str:
    """One text per JSON value: sorted keys, no whitespace."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def normalized_json(raw: bytes, ignored: Iterable[tuple[str | int, ...]]) -> Any:
    """The parsed JSON body as matching sees it (credentials masked, ignored fields
    removed), or raises ``ValueError`` when it is not JSON."""
    stripped = raw.lstrip()
    if not stripped or stripped[:1] not in b'{["':
        raise ValueError("not a JSON object or array")
    # our own fresh parse, copied by mask_body: editing it below is safe
    data = mask_body(json.loads(raw))
    for parts in ignored:
        _drop(data, parts)
    _compact(data)  # list items are removed after all fields: indices do not shift
    return data


def body_digest(raw: bytes, ignored: Iterable[tuple[str | int, ...]]) -> str:
    """The body part of a request key (see the module docstring)."""
    try:
        text = canonical_json(normalized_json(raw, ignored)).encode("utf-8")
        prefix = "json:"
    except ValueError:
        text, prefix = raw, "raw:"
    return prefix + hashlib.blake2b(text, digest_size=16).hexdigest()


def ignored_paths(ignore_fields: Iterable[str]) -> tuple[tuple[str | int, ...], ...]:
    """The parsed paths matching ignores: the defaults plus ``ignore_fields``."""
    return tuple(parse_field_path(p) for p in (*DEFAULT_IGNORED_FIELDS, *ignore_fields))


def request_key(request: Any, ignored: Iterable[tuple[str | int, ...]] = ()) -> Key:
    """The matching key of an already scrubbed request: method, path, the sorted
    non-credential query pairs and the body digest. Host, port, scheme and headers are
    never part of it."""
    from afnio._secrets import is_credential_name, looks_like_credential

    parts = urlsplit(request.uri)
    query = tuple(
        sorted(
            (name, value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
            if not is_credential_name(name, query=True)
            and not looks_like_credential(value)
        )
    )
    return (
        str(request.method).upper(),
        parts.path or "/",
        query,
        body_digest(body_bytes(request), tuple(ignored)),
    )
