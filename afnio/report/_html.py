"""The run report's single HTML file: inline style, inline script, the data as JSON.

Nothing in the page refers to the network: no external script, style, font or image.
The data is embedded in ``<script type="application/json" id="afnio-data">`` with
every ``<`` written as ``\\u003c`` (so no text of the run can close the element),
and the script draws everything (charts as inline SVG, the timeline with word
diffs) with plain DOM calls; run texts are only ever set as text, never parsed as
HTML.
"""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

from afnio.report._assets import PAGE, SCRIPT, STYLE

__all__ = ["render_html"]

_MARKER = re.compile(r"@@(TITLE|VERSION|STYLE|SCRIPT|DATA)@@")


def _clean(value: Any) -> Any:
    """``value`` with what JSON cannot carry replaced: a NaN or infinite float (which
    ``json.dumps`` would write as ``NaN``/``Infinity``, making the browser's
    ``JSON.parse`` fail and the page blank) becomes None, a non-string key a string,
    a tuple a list and any other object its ``str``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)


def _json_for_script(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element (and that
    ``JSON.parse`` accepts: no NaN or Infinity, see :func:`_clean`)."""
    text = json.dumps(
        _clean(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def render_html(data: dict[str, Any], *, title: str, version: str) -> str:
    """The report page for ``data`` (from :func:`afnio.report._data.build_data`)."""
    values = {
        "TITLE": html.escape(title),
        "VERSION": html.escape(version),
        "STYLE": STYLE,
        "SCRIPT": SCRIPT,
        "DATA": _json_for_script(data),
    }
    # one pass: a marker inside a filled-in value is never replaced again
    return _MARKER.sub(lambda m: values[m.group(1)], PAGE)
