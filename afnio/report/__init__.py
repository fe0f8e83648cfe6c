"""The run report: one self-contained HTML page for a run's ``run_log.jsonl``.

``afnio report RUN_DIR`` (or :func:`write_report`) reads the run log that afnio's
Trainer writes into its root folder (``optimize(..., root_dir=...)`` and
``AfnioTGD(root_dir=...)`` write one too) and writes ``RUN_DIR/report.html``: score
curves, cost per step by phase, and a timeline of every parameter with a word diff
per step and, beside each change, the feedback that caused it with its sample
indices. The page works offline (no network reference at all) and stays under
10 MB (feedback is shortened evenly across steps when needed; the full texts stay in
``run_log.jsonl``). Writing it makes no LM call.
"""

from __future__ import annotations

from pathlib import Path

from afnio.report._data import MAX_BYTES, RUN_LOG_FILE, _read_records, build_data
from afnio.report._data import load_run_log as load_run_log
from afnio.report._html import render_html

__all__ = ["MAX_BYTES", "REPORT_FILE", "load_run_log", "write_report"]

REPORT_FILE = "report.html"


def _run_log_path(run_dir: Path) -> Path:
    """The run log of ``run_dir`` (a run folder, or the run_log.jsonl file itself)."""
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run_dir {str(run_dir)!r} does not exist; pass the root folder of a run, "
            "where afnio's Trainer wrote run_log.jsonl during trainer.fit(...) (its "
            "default_root_dir, or root_dir= of optimize()/AfnioTGD)"
        )
    path = run_dir / RUN_LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"run_dir {str(run_dir)!r} holds no {RUN_LOG_FILE}; a run log is written "
            "by afnio's Trainer into its root folder during trainer.fit(...) "
            "(optimize(..., root_dir=...) and AfnioTGD(root_dir=...) write one too)"
        )
    return path


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run in ``run_dir`` and return its path.

    ``run_dir`` is the run's root folder (holding ``run_log.jsonl``) or the run-log
    file itself; ``out`` is the file to write (default ``<run_dir>/report.html``;
    missing parent folders are created). Raises :class:`FileNotFoundError` when there
    is no run log and :class:`ValueError` when it cannot be read or is not an
    ``afnio.run_log/1`` log (a log whose fields have unexpected types is reported
    with a note in the page listing what was left out).
    """
    from afnio import __version__

    log = _run_log_path(Path(run_dir))
    records, torn = _read_records(log)
    folder = log.parent
    data = build_data(records, source=str(folder), torn=torn)
    where = folder.resolve()
    title = "/".join(part for part in (where.parent.name, where.name) if part)
    page = render_html(data, title=title or str(folder), version=__version__)
    target = Path(out) if out is not None else folder / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target
