"""``import afnio`` stays light: the openai SDK (about 0.5 s to import, several seconds
on a loaded machine) is imported when a client is built, on the caller's thread."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> dict[str, bool]:
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps({m: m in sys.modules for m in ('openai', 'httpx')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_afnio_does_not_import_the_openai_sdk() -> None:
    assert _modules_after("import afnio, afnio.models.openai, afnio.testing") == {
        "openai": False,
        "httpx": False,
    }


def test_building_a_client_imports_it() -> None:
    code = (
        "from afnio.models.openai import OpenAI\n"
        "OpenAI(api_key='sk-test', base_url='http://127.0.0.1:9/v1')"
    )
    assert _modules_after(code)["openai"] is True


def test_the_default_retry_count_is_the_sdks() -> None:
    import openai

    from afnio.models.openai import DEFAULT_MAX_RETRIES

    assert DEFAULT_MAX_RETRIES == openai.DEFAULT_MAX_RETRIES
