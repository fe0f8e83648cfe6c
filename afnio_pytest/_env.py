"""The environment inside a replay test: provider and tracing variables dropped (their
credential values remembered, so they can never be written), ``OPENAI_BASE_URL`` and
``OPENAI_API_KEY`` set, and everything restored afterwards. Standard library only (the
credential-name rule of :mod:`afnio._secrets` is imported when a test runs)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, MutableMapping

from afnio_pytest._types import (
    DROPPED_ENV_NAMES,
    PROVIDER_ENV_PREFIXES,
    TRACING_ENV_PREFIXES,
)

__all__ = ["EnvPatch", "credential_values", "names_to_drop"]

_MISSING = object()
# a variable named like a credential (HF_TOKEN, MY_SERVICE_SECRET, DB_PASSWORD); not
# the header rule, which would also catch SSH_AUTH_SOCK or TIKTOKEN_CACHE_DIR
_CREDENTIAL_ENV_NAME = re.compile(r"(key|token|secret|password|passwd|credentials?)$")


def names_to_drop(environ: Mapping[str, str], keep: Iterable[str] = ()) -> list[str]:
    """The variables a replay test runs without: provider and tracing prefixes, any
    name ending in ``_API_KEY`` and a few exact names, except those in ``keep``."""
    kept = set(keep)
    return sorted(
        name
        for name in environ
        if name not in kept
        and (
            name.startswith(PROVIDER_ENV_PREFIXES)
            or name.startswith(TRACING_ENV_PREFIXES)
            or name.endswith("_API_KEY")
            or name in DROPPED_ENV_NAMES
        )
    )


def credential_values(environ: Mapping[str, str]) -> list[str]:
    """The values of the environment's credential variables (``*_API_KEY``,
    ``*_TOKEN``, ``*_SECRET``..., or any value that looks like a key): credentials the
    test holds, which no cassette may contain."""
    from afnio._secrets import is_credential_name, looks_like_credential

    found = []
    for name, value in environ.items():
        if not value:
            continue
        if (
            is_credential_name(name)
            or _CREDENTIAL_ENV_NAME.search(name.lower()) is not None
            or looks_like_credential(value)
        ):
            found.append(value)
    return found


class EnvPatch:
    """Drops and sets environment variables, and restores them all (:meth:`restore`)."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._saved: dict[str, object] = {}

    def _remember(self, name: str) -> None:
        if name not in self._saved:
            self._saved[name] = self._environ.get(name, _MISSING)

    def drop(self, names: Iterable[str]) -> None:
        """Remove these variables (restored later)."""
        for name in names:
            self._remember(name)
            self._environ.pop(name, None)

    def set(self, values: Mapping[str, str]) -> None:
        """Set these variables (restored later)."""
        for name, value in values.items():
            self._remember(name)
            self._environ[name] = value

    def restore(self) -> None:
        """Put every changed variable back as it was."""
        for name, value in self._saved.items():
            if value is _MISSING:
                self._environ.pop(name, None)
            else:
                self._environ[name] = value  # type: ignore[assignment]
        self._saved.clear()
