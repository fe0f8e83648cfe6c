"""Credentials: what counts as one, masking them, and scanning text for them.

One place decides what afnio treats as a credential, wherever one could surface (a
client's ``get_config()`` and ``repr``, ``state_dict()`` checkpoints, test cassettes):

* **names**: a header or field whose name is a credential name (``Authorization``,
  ``api-key``, ``x-api-key``, ``Cookie``, ``password``, ``client_secret``, anything
  ending in ``api_key``/``_secret``/``_password``/``access_token``...). Names compare
  case-insensitively, with ``-``, ``.`` and spaces read as ``_``.
* **header names**: in a header dict (``default_headers``, ``extra_headers``,
  ``headers``), also any header whose name contains ``auth``, ``key``, ``token``,
  ``secret``, ``passw``, ``cookie``, ``session``, ``credential`` or ``signature``
  (``x-functions-key``, ``PRIVATE-TOKEN``, ``X-Vault-Token``): the same rule the
  response cache uses to tell which headers name the account.
* **query names**: in a query string (``default_query``, ``extra_query``, a URL),
  the header rule, and any parameter whose name ends in ``key``, ``token``,
  ``secret``, ``password``, ``sig``/``signature``, ``auth`` or ``credential(s)``, or
  is ``code`` (``?key=``, ``?api_key=``, ``?access_token=``, ``?sig=``, ``?code=``).
* **values**: a string that holds a provider key (``sk-...`` of any length,
  ``AIza...``, ``ghp_...``, ``AKIA...``, ``xox?-...``) or is an HTTP auth value
  (``Bearer <token>``, ``Basic <base64>``), under any name.

A masked value is replaced, whole, by :data:`REDACTED`; nothing of the secret is kept
(like the openai SDK, which never prints a key, and httpx, which shows a URL password
as ``[secure]``).

Example::

    >>> from afnio._secrets import mask_secrets, restore_secrets
    >>> args = {"temperature": 0, "extra_headers": {"Authorization": "Bearer sk-1"}}
    >>> saved = mask_secrets(args)
    >>> saved["extra_headers"]
    {'Authorization': '<redacted>'}
    >>> live = {"extra_headers": {"Authorization": "Bearer sk-live"}}
    >>> restore_secrets(saved, live)["extra_headers"]
    {'Authorization': 'Bearer sk-live'}
    >>> restore_secrets(saved, {})
    {'temperature': 0, 'extra_headers': {}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

__all__ = [
    "CREDENTIAL_MARKERS",
    "REDACTED",
    "SECRET_SCAN_PATTERNS",
    "find_secrets",
    "is_credential_name",
    "looks_like_credential",
    "mask_query_string",
    "mask_secrets",
    "mask_url",
    "redact_text",
    "restore_secrets",
]

REDACTED = "<redacted>"
"""What a masked credential is replaced with (never sent as a credential)."""

_CREDENTIAL_NAMES = frozenset(
    {
        "auth",
        "authorization",
        "proxy_authorization",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "cookie",
        "set_cookie",
        "ocp_apim_subscription_key",
        "subscription_key",
    }
)
# a name equal to one of these, or ending in "_" + one of them, is a credential name
_CREDENTIAL_SUFFIXES = (
    "api_key",
    "apikey",
    "api_token",
    "access_token",
    "auth_token",
    "refresh_token",
    "id_token",
    "bearer_token",
    "session_token",
    "secret",
    "secret_key",
    "secret_access_key",
    "private_key",
    "password",
    "passwd",
)
_QUERY_NAME_RE = re.compile(
    r"(key|token|secret|password|passwd|sig|signature|auth|authorization|"
    r"credentials?)$"
)
# containers whose items are query parameters, and headers
_QUERY_CONTAINERS = frozenset(
    {"default_query", "extra_query", "query", "params", "query_params"}
)
_HEADER_CONTAINERS = frozenset({"default_headers", "extra_headers", "headers"})
CREDENTIAL_MARKERS = (
    "auth",
    "key",
    "token",
    "secret",
    "passw",
    "cookie",
    "session",
    "credential",
    "signature",
)
"""A header or query parameter whose name contains one of these holds a credential."""

SECRET_VALUE_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"sk-[A-Za-z0-9_-]{4,}"  # OpenAI, Anthropic, DeepSeek... keys, short ones too
    r"|AIza[0-9A-Za-z_-]{20,}"  # Google API keys
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub tokens
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r")"
)
"""A provider key anywhere in a text."""

_AUTH_VALUE_RE = re.compile(
    r"^\s*(?:Bearer\s+\S+|Basic\s+[A-Za-z0-9+/]{4,}={0,2})\s*$", re.IGNORECASE
)

_HEADER_LINE_NAMES = (
    "authorization",
    "proxy-authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "x-auth-token",
    "cookie",
    "set-cookie",
)

SECRET_SCAN_PATTERNS: tuple[re.Pattern[str], ...] = (
    SECRET_VALUE_RE,
    # an HTTP auth value: "Bearer <token>"
    re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{4,}", re.IGNORECASE),
    # a credential header, as a YAML/HTTP line ("authorization:", "- api-key:")
    re.compile(
        r"^[\s-]*[\"']?(?:" + "|".join(map(re.escape, _HEADER_LINE_NAMES)) + r")"
        r"[\"']?\s*:",
        re.IGNORECASE | re.MULTILINE,
    ),
    # a credential in a query string: ?key=..., &api_key=..., ?access_token=...
    re.compile(
        r"[?&][A-Za-z0-9_.-]*(?:key|token|secret|password|passwd|sig|signature|auth"
        r"|authorization|credentials?)=[^&\s#'\"`<>]+",
        re.IGNORECASE,
    ),
    # a credential field of a JSON body: "api_key": "...", "Authorization": "..."
    re.compile(
        r"[\"'](?:[A-Za-z0-9_-]*api[_-]?key|authorization|access[_-]?token"
        r"|client[_-]?secret|password)[\"']\s*:\s*[\"']"
        r"(?!<redacted>[\"'])[^\"']+[\"']",  # a masked value is no credential
        re.IGNORECASE,
    ),
)

_URL_USERINFO_RE = re.compile(
    # scheme://user:password@ (the password: what is masked)
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:]*:)"
    r"(?P<secret>(?!<redacted>@)[^\s/?#@]+)(?P<tail>@)"
)
_ENV_ASSIGNMENT_RE = re.compile(
    # NAME=value / NAME: value where NAME ends in a credential word
    # (OPENAI_API_KEY=..., export GITHUB_TOKEN=..., DB_PASSWORD: ...)
    r"(?P<head>(?<![A-Za-z0-9_])[A-Za-z0-9_]*(?:API_?KEY|ACCESS_KEY|SECRET_KEY"
    r"|PRIVATE_KEY|TOKEN|SECRET|PASSWORD|PASSWD)(?![A-Za-z0-9_\"'])\s*[=:]\s*"
    r"[\"']?)(?P<secret>(?!<redacted>)(?!(?:None|null|true|false)\b)"
    r"[^\s\"'`<>,;]{8,})",
    re.IGNORECASE,
)
SECRET_SCAN_PATTERNS = (*SECRET_SCAN_PATTERNS, _URL_USERINFO_RE, _ENV_ASSIGNMENT_RE)
"""What :func:`find_secrets` looks for in a text (a cassette, a log, a file): also a
URL's password (``https://user:pass@host``) and an env-style assignment of a
key/token/secret/password name (``OPENAI_API_KEY=...``)."""
# the patterns whose hit is masked in place: only the ``secret`` group
_IN_PLACE = (_URL_USERINFO_RE, _ENV_ASSIGNMENT_RE)


def _normalize(name: str) -> str:
    return re.sub(r"[-.\s]+", "_", name.strip().lower())


def is_credential_name(name: str, *, query: bool = False, header: bool = False) -> bool:
    """Whether a field named ``name`` holds a credential; with ``header``, a header
    of that name; with ``query``, a query parameter of that name (the broader rules
    of the module docstring).

    Example::

        >>> is_credential_name("X-Api-Key"), is_credential_name("api-version")
        (True, False)
        >>> is_credential_name("key"), is_credential_name("key", query=True)
        (False, True)
        >>> is_credential_name("x-functions-key", header=True)
        True
        >>> is_credential_name("X-Request-Id", header=True)
        False
    """
    if not isinstance(name, str):
        return False
    norm = _normalize(name)
    if norm in _CREDENTIAL_NAMES or any(
        norm == s or norm.endswith("_" + s) for s in _CREDENTIAL_SUFFIXES
    ):
        return True
    if (header or query) and any(marker in norm for marker in CREDENTIAL_MARKERS):
        return True
    return query and (norm == "code" or _QUERY_NAME_RE.search(norm) is not None)


def looks_like_credential(value: Any) -> bool:
    """Whether the string ``value`` holds a provider key or is an HTTP auth value.

    Example::

        >>> looks_like_credential("sk-abcd"), looks_like_credential("Bearer x.y.z")
        (True, True)
        >>> looks_like_credential("gpt-4o-mini"), looks_like_credential("task-list")
        (False, False)
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return False
    return bool(SECRET_VALUE_RE.search(value) or _AUTH_VALUE_RE.match(value))


def _mask_scalar(value: Any, credential_name: bool) -> Any:
    if (
        isinstance(value, (str, bytes))
        and value
        and (credential_name or looks_like_credential(value))
    ):
        return REDACTED
    return value


def _is_mask(value: Any) -> bool:
    return isinstance(value, str) and value == REDACTED


def mask_secrets(obj: Any, *, query: bool = False, header: bool = False) -> Any:
    """``obj`` (nested dicts, lists and tuples) with every credential replaced by
    :data:`REDACTED`: a string under a credential name (query names too with
    ``query`` and inside a ``default_query``/``extra_query``/``params`` dict; header
    names with ``header`` and inside a ``default_headers``/``extra_headers``/
    ``headers`` dict), and any string that looks like a credential. ``obj`` itself
    is never changed: a container holding a credential is copied (as a ``dict``,
    ``list`` or ``tuple``); one with nothing to mask, and any other object, is
    returned as it is.

    Example::

        >>> mask_secrets({"headers": {"api-key": "azure-1", "X-Trace": "t-1"}})
        {'headers': {'api-key': '<redacted>', 'X-Trace': 't-1'}}
        >>> mask_secrets({"PRIVATE-TOKEN": "glpat-1"}, header=True)
        {'PRIVATE-TOKEN': '<redacted>'}
        >>> mask_secrets(["ok", "sk-live-1234"])
        ['ok', '<redacted>']
        >>> args = {"temperature": 0}
        >>> mask_secrets(args) is args
        True
    """
    if isinstance(obj, Mapping):
        masked: dict[Any, Any] = {}
        for key, value in obj.items():
            if isinstance(value, (Mapping, list, tuple)):
                name = _normalize(key) if isinstance(key, str) else ""
                masked[key] = mask_secrets(
                    value,
                    query=query or name in _QUERY_CONTAINERS,
                    header=header or name in _HEADER_CONTAINERS,
                )
            else:
                masked[key] = _mask_scalar(
                    value, is_credential_name(key, query=query, header=header)
                )
        if all(masked[k] is v for k, v in obj.items()):
            return obj
        return masked
    if isinstance(obj, (list, tuple)):
        items = [mask_secrets(item, query=query, header=header) for item in obj]
        if all(new is old for new, old in zip(items, obj, strict=True)):
            return obj
        return items if isinstance(obj, list) else tuple(items)
    return _mask_scalar(obj, False)


def restore_secrets(saved: Any, current: Any) -> Any:
    """``saved`` (as :func:`mask_secrets` left it) with every :data:`REDACTED`
    credential put back from ``current``, the live value at the same place, or
    dropped (its dict key or list item removed) when ``current`` has none there: a
    masked placeholder is never restored, so it can never be sent as a credential.
    ``saved`` itself is never changed, and is returned as it is when it holds no
    mask.

    Example::

        >>> restore_secrets({"h": {"api-key": "<redacted>"}, "t": 0}, {})
        {'h': {}, 't': 0}
    """
    if isinstance(saved, Mapping):
        restored: dict[Any, Any] = {}
        live = current if isinstance(current, Mapping) else {}
        changed = False
        for key, value in saved.items():
            here = live.get(key)
            if _is_mask(value):
                changed = True
                if here is not None and not _is_mask(here):
                    restored[key] = here
                continue
            restored[key] = restore_secrets(value, here)
            changed = changed or restored[key] is not value
        return restored if changed else saved
    if isinstance(saved, (list, tuple)):
        live_items = current if isinstance(current, (list, tuple)) else []
        items = []
        changed = False
        for i, value in enumerate(saved):
            here = live_items[i] if i < len(live_items) else None
            if _is_mask(value):
                changed = True
                if here is not None and not _is_mask(here):
                    items.append(here)
                continue
            items.append(restore_secrets(value, here))
            changed = changed or items[-1] is not value
        if not changed:
            return saved
        return items if isinstance(saved, list) else tuple(items)
    return saved


def mask_query_string(query: str, *, drop: bool = False) -> str:
    """A raw query string (``a=1&key=...``) with every credential parameter's value
    replaced by :data:`REDACTED` (or, with ``drop``, the parameter removed); the other
    parameters are kept byte for byte.

    Example::

        >>> mask_query_string("api-version=1&key=AIza-x&sig=abc")
        'api-version=1&key=<redacted>&sig=<redacted>'
        >>> mask_query_string("api-version=1&token=t", drop=True)
        'api-version=1'
    """
    kept = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        if is_credential_name(unquote_plus(name), query=True) or looks_like_credential(
            unquote_plus(value)
        ):
            if drop:
                continue
            part = f"{name}={REDACTED}"
        kept.append(part)
    return "&".join(kept)


def mask_url(url: str) -> str:
    """``url`` with its password (``https://user:<redacted>@host``) and credential
    query parameters masked.

    Example::

        >>> mask_url("https://me:pw@example.com/v1?key=k1&v=2")
        'https://me:<redacted>@example.com/v1?key=<redacted>&v=2'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            netloc = f"{user}:{REDACTED}@{host}"
        elif looks_like_credential(unquote_plus(user)):
            netloc = f"{REDACTED}@{host}"
    return urlunsplit(
        parts._replace(netloc=netloc, query=mask_query_string(parts.query))
    )


def find_secrets(text: str) -> list[str]:
    """Every stretch of ``text`` that looks like a credential (see
    :data:`SECRET_SCAN_PATTERNS`), in order of the patterns.

    Example::

        >>> find_secrets("uri: https://x.invalid/v1?key=abc123")
        ['?key=abc123']
        >>> find_secrets("model: gpt-4o-mini, uri: /v1?key=<redacted>")
        []
    """
    found: list[str] = []
    for pattern in SECRET_SCAN_PATTERNS:
        found.extend(m.group(0) for m in pattern.finditer(text))
    return found


def redact_text(text: str) -> str:
    """``text`` with every credential :func:`find_secrets` finds replaced by
    :data:`REDACTED`: a URL's password and an env-style assignment's value in
    place (the user name, the host and the variable name stay), any other hit
    whole.

    Example::

        >>> redact_text("proxy https://alice:hunter2secret@px.example.com/v1")
        'proxy https://alice:<redacted>@px.example.com/v1'
        >>> redact_text("OPENAI_API_KEY=abc123def456ghi789jkl; key sk-abcd1234")
        'OPENAI_API_KEY=<redacted>; key <redacted>'
    """
    for pattern in _IN_PLACE:
        text = pattern.sub(
            lambda m: (
                m.group("head") + REDACTED + m.group(0)[m.end("secret") - m.start(0) :]
            ),
            text,
        )
    for hit in find_secrets(text):
        text = text.replace(hit, REDACTED)
    return text
