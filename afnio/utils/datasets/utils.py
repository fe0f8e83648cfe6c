"""Download and integrity helpers for the bundled datasets.

Files are fetched with :mod:`urllib.request` (User-Agent ``afnio``), shown with a
``rich`` progress bar when ``rich`` is installed, written atomically (a temporary
file in the destination folder, renamed into place only once complete and
verified), and checked against their published MD5.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "calculate_md5",
    "check_integrity",
    "check_md5",
    "dataset_folder",
    "default_data_root",
    "download_from_mirrors",
    "download_url",
    "ensure_file",
]

USER_AGENT = "afnio"
DATA_DIR_ENV = "AFNIO_DATA_DIR"
_CHUNK = 1024 * 1024


def _choices(options: Iterable[str]) -> str:
    return ", ".join(repr(o) for o in options)


def default_data_root() -> str:
    """Where datasets are stored by default: ``$AFNIO_DATA_DIR`` if set, else
    ``~/.cache/afnio/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "afnio", "data")


def calculate_md5(fpath: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """The hexadecimal MD5 digest of a file."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(fpath, "rb") as f:
        while chunk := f.read(chunk_size):
            md5.update(chunk)
    return md5.hexdigest()


def check_md5(fpath: str | os.PathLike[str], md5: str, **kwargs: Any) -> bool:
    """Whether the file's MD5 digest is ``md5`` (case-insensitive).

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = Path(d) / "f.txt"
        ...     _ = p.write_bytes(b"afnio")
        ...     check_md5(p, calculate_md5(p)), check_md5(p, "0" * 32)
        (True, False)
    """
    return calculate_md5(fpath, **kwargs) == md5.lower()


def check_integrity(fpath: str | os.PathLike[str], md5: str | None = None) -> bool:
    """Whether the file exists and, if ``md5`` is given, has that digest."""
    if not os.path.isfile(fpath):
        return False
    if md5 is None:
        return True
    return check_md5(fpath, md5)


@contextlib.contextmanager
def _progress(total: int | None, description: str, enabled: bool) -> Iterator[Any]:
    """Yields ``advance(n)``: a rich progress bar if rich is importable and
    ``enabled``, else a no-op."""
    if enabled:
        try:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
        except ImportError:  # rich is optional here
            enabled = False
    if not enabled:
        yield lambda n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.update(task, advance=n)


def _copy_response(response: Any, out: BinaryIO, description: str, show: bool) -> None:
    length = response.headers.get("Content-Length") if response.headers else None
    total = int(length) if length and str(length).isdigit() else None
    received = 0
    with _progress(total, description, show) as advance:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
            advance(len(chunk))
    if total is not None and received != total:
        # http.client's read(n) returns short data, without an error, when the
        # connection closes early
        raise OSError(
            f"Incomplete download: received {received} of {total} bytes "
            "(the connection closed early)."
        )


def download_url(
    url: str,
    root: str | os.PathLike[str],
    filename: str | None = None,
    md5: str | None = None,
    *,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Download ``url`` to ``root/filename`` and return that path.

    If the file is already there with the right ``md5``, nothing is downloaded. The
    download goes to a temporary file in ``root`` that is renamed into place only
    when complete and (if ``md5`` is given) verified, so an interrupted or corrupted
    download never leaves a file at the destination.

    Args:
        url: the address (``https://``, ``http://`` or ``file://``).
        root: the destination folder (created if needed).
        filename: the file name; defaults to the last part of the URL.
        md5: the expected MD5 digest; ``None`` skips verification.
        timeout: the network timeout, in seconds.
        progress: show a rich progress bar (if rich is installed).

    Raises:
        RuntimeError: ``"File not found or corrupted."`` if the downloaded file
            does not have the expected MD5 digest.
        urllib.error.URLError, OSError, http.client.HTTPException: if the download
            itself fails, including a body shorter than its Content-Length
            (nothing is left at the destination).

    Example::

        >>> download_url(  # doctest: +SKIP
        ...     "https://example.org/data/file.json", "/tmp/data", md5="0123..."
        ... )
        '/tmp/data/file.json'
    """
    root = os.path.expanduser(os.fspath(root))
    if not filename:
        filename = os.path.basename(url.split("?", 1)[0].rstrip("/"))
    if not filename:
        raise ValueError(
            f"Cannot derive a file name from url {url!r}; pass `filename`."
        )
    fpath = os.path.join(root, filename)
    if md5 is not None and check_integrity(fpath, md5):
        return fpath

    os.makedirs(root, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as e:
                e.close()  # it holds the connection open
                raise
            with response:
                _copy_response(response, out, f"Downloading {filename}", progress)
        if md5 is not None and not check_md5(tmp, md5):
            raise RuntimeError("File not found or corrupted.")
        os.chmod(tmp, 0o644)  # mkstemp creates it private (0o600)
        os.replace(tmp, fpath)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fpath


def download_from_mirrors(
    mirrors: list[str] | tuple[str, ...],
    root: str | os.PathLike[str],
    filename: str,
    md5: str | None,
    *,
    progress: bool = True,
) -> str:
    """Try ``mirror + filename`` for each mirror in turn; return the file's path.

    Raises:
        RuntimeError: ``"Error downloading {filename}"`` if every mirror fails (the
            last error is chained).
    """
    errors: list[str] = []
    last: BaseException | None = None
    for mirror in mirrors:
        url = f"{mirror}{filename}"
        try:
            return download_url(url, root, filename, md5, progress=progress)
        # URLError is an OSError; a truncated body raises http.client.IncompleteRead
        except (OSError, http.client.HTTPException, RuntimeError, ValueError) as e:
            errors.append(f"{url}: {e}")
            last = e
    raise RuntimeError(
        f"Error downloading {filename}" + "".join(f"\n  {e}" for e in errors)
    ) from last


def dataset_folder(root: str | os.PathLike[str] | None, name: str) -> tuple[str, Path]:
    """``(root, root/name/raw)`` with ``root`` defaulting to
    :func:`default_data_root`."""
    root = default_data_root() if root is None else os.path.expanduser(os.fspath(root))
    return root, Path(root) / name / "raw"


def ensure_file(
    raw_folder: str | os.PathLike[str],
    filename: str,
    md5: str,
    mirrors: list[str] | tuple[str, ...],
    *,
    download: bool,
    verify: bool,
    dataset: str,
) -> Path:
    """Return the path of ``raw_folder/filename``, downloading it if needed.

    * A present file is used if it has the published ``md5`` or if ``verify`` is
      False (a local copy used as is, e.g. a test fixture).
    * Otherwise, with ``download`` it is downloaded from ``mirrors`` (always verified
      against ``md5``); without, a ``RuntimeError`` explains what to do.
    """
    path = Path(raw_folder) / filename
    if path.is_file() and (not verify or check_md5(path, md5)):
        return path
    if download:
        download_from_mirrors(mirrors, raw_folder, filename, md5)
        return path
    if not path.is_file():
        raise RuntimeError(
            f"{dataset}: {filename} not found at {path}. Pass download=True to "
            f"download it, or place the file there (the data root is the `root` "
            f"argument, else ${DATA_DIR_ENV}, else ~/.cache/afnio/data)."
        )
    raise RuntimeError(
        f"File not found or corrupted. {dataset}: {path} does not have the expected "
        f"MD5 {md5}. Delete it and pass download=True to fetch a fresh copy, or pass "
        "verify=False to use the local file as is."
    )
