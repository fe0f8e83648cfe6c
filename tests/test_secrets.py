"""``afnio._secrets``: which names and values are credentials, masking, restoring."""

from __future__ import annotations

import pytest

from afnio._secrets import (
    REDACTED,
    find_secrets,
    is_credential_name,
    looks_like_credential,
    mask_query_string,
    mask_secrets,
    mask_url,
    restore_secrets,
)


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "proxy-authorization",
        "api-key",
        "api_key",
        "X-Api-Key",
        "x-goog-api-key",
        "Ocp-Apim-Subscription-Key",
        "Cookie",
        "OPENAI_API_KEY",
        "client_secret",
        "password",
        "access_token",
        "x-auth-token",
    ],
)
def test_credential_names(name: str) -> None:
    assert is_credential_name(name) and is_credential_name(name, query=True)


@pytest.mark.parametrize(
    "name",
    ["model", "temperature", "max_tokens", "prompt_cache_key", "api-version", "user"],
)
def test_ordinary_names(name: str) -> None:
    assert not is_credential_name(name)


@pytest.mark.parametrize("name", ["key", "sig", "code_token", "subscription-key"])
def test_query_only_credential_names(name: str) -> None:
    assert is_credential_name(name, query=True)


@pytest.mark.parametrize(
    "value",
    ["sk-ab12", "sk-test-dummy-key", "Bearer abc", "basic dXNlcjpwdw==", "x sk-proj-1"],
)
def test_credential_values(value: str) -> None:
    assert looks_like_credential(value) and looks_like_credential(value.encode())


@pytest.mark.parametrize(
    "value", ["gpt-4o-mini", "task-list", "sk-", "Be brief.", "", "<redacted>"]
)
def test_ordinary_values(value: str) -> None:
    assert not looks_like_credential(value)


def test_mask_secrets_masks_nested_credentials_and_keeps_the_rest() -> None:
    marker = object()
    args = {
        "model": "m",
        "n": 1,
        "extra_headers": {"Authorization": "Bearer t", "X-Trace": "t-1"},
        "extra_query": {"key": "k", "api-version": "1"},
        "extra_body": {"nested": [{"api_key": "a"}, "sk-value1"], "keep": marker},
        "response_format": {"schema": {"properties": {"password": {"type": "string"}}}},
        "metadata": {"key": "not a query parameter"},
        "tuple": ("sk-value2", 2),
    }
    masked = mask_secrets(args)
    assert masked == {
        "model": "m",
        "n": 1,
        "extra_headers": {"Authorization": REDACTED, "X-Trace": "t-1"},
        "extra_query": {"key": REDACTED, "api-version": "1"},
        "extra_body": {"nested": [{"api_key": REDACTED}, REDACTED], "keep": marker},
        "response_format": {"schema": {"properties": {"password": {"type": "string"}}}},
        "metadata": {"key": "not a query parameter"},
        "tuple": (REDACTED, 2),
    }
    assert masked["extra_body"]["keep"] is marker  # other objects are not copied
    assert args["extra_headers"]["Authorization"] == "Bearer t"  # input untouched


def test_restore_secrets_takes_the_live_value_or_drops_the_mask() -> None:
    saved = {
        "h": {"Authorization": REDACTED, "X": "1"},
        "l": ["a", REDACTED, "c"],
        "top": REDACTED,
    }
    live = {"h": {"Authorization": "Bearer live"}, "l": ["x", "sk-live1"]}
    assert restore_secrets(saved, live) == {
        "h": {"Authorization": "Bearer live", "X": "1"},
        "l": ["a", "sk-live1", "c"],
    }
    assert restore_secrets(saved, None) == {"h": {"X": "1"}, "l": ["a", "c"]}
    # a live value that is itself masked is never restored
    assert restore_secrets({"k": REDACTED}, {"k": REDACTED}) == {}


def test_urls_and_query_strings() -> None:
    assert mask_query_string("") == ""
    assert mask_query_string("a=1&b=sk-abcd&Api-Key=z&flag") == (
        f"a=1&b={REDACTED}&Api-Key={REDACTED}&flag"
    )
    assert mask_query_string("a=1&access_token=z", drop=True) == "a=1"
    assert mask_url("http://127.0.0.1:9/v1/") == "http://127.0.0.1:9/v1/"
    assert mask_url("https://u:p@h.invalid/v1?sig=s") == (
        f"https://u:{REDACTED}@h.invalid/v1?sig={REDACTED}"
    )
    assert mask_url("https://sk-abcdef@h.invalid/") == f"https://{REDACTED}@h.invalid/"


def test_find_secrets_reports_each_leak() -> None:
    text = (
        "uri: https://h.invalid/v1?api-version=1&key=abc\n"
        "headers:\n  authorization:\n  - Bearer sk-1234\n"
    )
    found = find_secrets(text)
    assert "&key=abc" in found and "sk-1234" in found and "Bearer sk-1234" in found
    assert find_secrets("headers:\n  content-type:\n  - application/json\n") == []


def test_find_secrets_takes_a_masked_field_for_no_credential() -> None:
    assert find_secrets('{"api_key": "<redacted>", "password": "<redacted>"}') == []
    assert find_secrets('{"api_key": "abc-123-def"}') == ['"api_key": "abc-123-def"']
    assert find_secrets('{"api_key": "<redacted>x"}') != []
