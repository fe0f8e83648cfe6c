"""``afnio.save`` / ``afnio.load``: checkpoints as JSON in a zip, never pickle.

File format (version 1). A zip archive (deflated) with exactly one member,
``data.json``, holding::

    {"format": "afnio", "version": 1, "data": <value>}

``<value>`` is JSON where ``null``, booleans, numbers, strings and arrays (Python
lists) stand for themselves, and every other value is an object tagged by the key
``"__afnio__"``:

==============  ================================================================
tag             fields
==============  ================================================================
``dict``        ``items``: ``[[key, value], ...]`` (keys may be any value here)
``state_dict``  ``items`` as for dict, plus ``metadata`` (a state dict's ``_metadata``)
``tuple``       ``items``: ``[value, ...]``
``variable``    ``data``, ``role``, ``requires_grad``
``parameter``   ``data``, ``role``, ``requires_grad``
``model``       ``class_type``, ``provider``, ``usage`` (a model client; loads as
                that dict, and the live client is passed back to
                ``load_state_dict(model_clients=...)``)
``function``    ``path``: ``"module:qualname"`` of an importable function
==============  ================================================================

Loading executes nothing from the file: there is no pickle, and a function comes back
as an inert :class:`~afnio.cognitive.modules.module.FunctionReference` unless the
caller passes ``allow_functions=True`` (import any) or a list of module names (import
only from those). The ``.hf`` extension is conventional.

Loading is bounded (:class:`LoadLimits`): a file is refused with a
:class:`~afnio.errors.SerializationError` before it can take much memory or time,
whatever it holds. A path must name a regular file (never a FIFO or a device, which
could block). Anything that is not an intact afnio file raises
``SerializationError``; only a wrong argument (``TypeError``), a missing file
(``FileNotFoundError``) and an unreadable one (``PermissionError``) raise otherwise.

Saving to a path is atomic: the bytes go to a hidden temporary file in the same
folder (``.<name>.afnio.<host>.<pid>.<random>.tmp``), then replace the target. A save
killed in between leaves its temporary file behind; the next save into that folder
removes those whose process (on this host) no longer runs.

Example::

    >>> import io, afnio
    >>> from afnio.cognitive import Parameter
    >>> buf = io.BytesIO()
    >>> afnio.save({"prompt": Parameter("Be brief.", role="system prompt")}, buf)
    >>> _ = buf.seek(0)
    >>> afnio.load(buf)["prompt"]
    Parameter containing:
      Variable(data=Be brief., role=system prompt, requires_grad=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import secrets
import socket
import stat
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from afnio._variable import Variable
from afnio.cognitive.modules.module import (
    FunctionReference,
    _module_filter,
    function_import_path,
)
from afnio.cognitive.parameter import Parameter
from afnio.errors import SerializationError
from afnio.models.model import BaseModel
from afnio.models.model_registry import model_class_name

__all__ = ["FORMAT_VERSION", "LoadLimits", "load", "save", "write_atomic"]

FORMAT_VERSION = 1
_MEMBER = "data.json"
_TAG = "__afnio__"
_CHUNK = 1 << 16  # inflate data.json this many bytes at a time
_MAX_SAME_HASH = 8  # non-str keys of one dict that may share a hash

PathOrFile = str | os.PathLike[str] | IO[bytes]


@dataclasses.dataclass(frozen=True)
class LoadLimits:
    """The bounds :func:`load` puts on a file, checked before and while building
    objects from it; a file past any of them raises ``SerializationError`` naming the
    limit.

    With the defaults, loading any file takes less than 200 MB of extra memory (150
    MB at worst as measured: the text, up to 4 bytes a character, plus about 50 bytes
    per element) and a few seconds, and every checkpoint afnio writes loads with
    room to spare: a ``Trainer`` checkpoint of a 2,000-sample, 10-epoch run is about
    15 KB of JSON and 2,000 elements; one that also held 20,000 per-batch metric rows
    and 6,000 feedback Variables of optimizer momentum would be about 5.4 MB and
    750,000 elements. Raise them, e.g. ``afnio.load(f,
    limits=LoadLimits(max_bytes=64 * 2**20, max_elements=6_000_000))``, only for
    files you trust: memory grows with them.

    Attributes:
        max_bytes: size of ``data.json`` inflated and decoded, in bytes (afnio
            writes it as ASCII, one byte per character; a text holding characters
            beyond Latin-1 counts 2 or 4 bytes per character). Default 16 MiB.
        max_elements: JSON values and object keys in ``data.json``, counted before
            parsing and from above: every ``,`` and ``[`` and every pair of ``"``
            counts one, every ``{`` two (an object takes about twice the memory of
            another value), also inside strings. Default 1,500,000.
        max_string_length: characters in any one string. Default 4 Mi (more than the
            largest LM context).
        max_depth: arrays and objects nested in the saved value (a Python ``dict``
            takes three levels: the tagged object, its item list and a pair).
            Default 200.

    Example::

        >>> LoadLimits().max_bytes == 16 * 2**20
        True
        >>> LoadLimits(max_depth=0)
        Traceback (most recent call last):
        ...
        ValueError: LoadLimits.max_depth must be a positive int, got 0.
    """

    max_bytes: int = 16 * 2**20
    max_elements: int = 1_500_000
    max_string_length: int = 4 * 2**20
    max_depth: int = 200

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"LoadLimits.{field.name} must be an int, got "
                    f"{type(value).__name__}."
                )
            if value < 1:
                raise ValueError(
                    f"LoadLimits.{field.name} must be a positive int, got {value}."
                )


# -- encoding -------------------------------------------------------------------------


def _encode(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Parameter):
        return {
            _TAG: "parameter",
            "data": obj.data,
            "role": obj.role,
            "requires_grad": obj.requires_grad,
        }
    if isinstance(obj, Variable):
        return {
            _TAG: "variable",
            "data": obj.data,
            "role": obj.role,
            "requires_grad": obj.requires_grad,
        }
    if isinstance(obj, BaseModel):
        return {
            _TAG: "model",
            "class_type": model_class_name(type(obj)),
            "provider": obj.provider,
            "usage": _encode(obj.get_usage(), f"{where}.usage"),
        }
    if isinstance(obj, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {
            _TAG: "tuple",
            "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)],
        }
    if isinstance(obj, dict):
        items = [
            [_encode(k, f"{where} key {k!r}"), _encode(v, f"{where}[{k!r}]")]
            for k, v in obj.items()
        ]
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            return {
                _TAG: "state_dict",
                "items": items,
                "metadata": _encode(dict(metadata), f"{where}._metadata"),
            }
        return {_TAG: "dict", "items": items}
    if isinstance(obj, FunctionReference):
        return {_TAG: "function", "path": obj.path}
    path = function_import_path(obj)
    if path is not None:
        return {_TAG: "function", "path": path}
    raise SerializationError(
        f"afnio.save cannot store {where}: a {type(obj).__name__}. Supported: None, "
        "bool, int, float, str, list, tuple, dict, Variable, Parameter, model clients "
        "and importable top-level functions."
    )


def save(obj: Any, f: PathOrFile) -> None:
    """Save ``obj`` (a state dict, a Variable, nested containers of them) to ``f``.

    Args:
        obj: what to save (see the module docstring for the supported values).
        f: a path, or a binary file object open for writing.

    A path is written atomically (a temporary file, then a rename), so an interrupted
    save never leaves a corrupted checkpoint behind; the temporary files of saves
    killed midway (by processes of this host that no longer run) are removed from
    the folder.

    Raises:
        SerializationError: naming the first value that cannot be stored.
        TypeError: if ``f`` is neither a path nor a writable binary file.
    """
    payload = json.dumps(
        {"format": "afnio", "version": FORMAT_VERSION, "data": _encode(obj, "obj")},
        ensure_ascii=True,  # also keeps lone surrogates, which UTF-8 cannot hold
        allow_nan=True,
    ).encode("utf-8")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_MEMBER, payload)
    blob = buffer.getvalue()
    if isinstance(f, (str, os.PathLike)):
        write_atomic(Path(f), blob)
    elif hasattr(f, "write"):
        f.write(blob)
    else:
        raise TypeError(
            f"`f` must be a path or a binary file object open for writing, got "
            f"{type(f).__name__}."
        )


def write_atomic(target: Path, blob: bytes) -> None:
    """Write ``blob`` to ``target`` atomically: a temporary file in the same folder
    (named after this host and process), flushed to disk, then renamed over
    ``target``. A new file gets the usual permissions (``0o666`` less the umask), an
    existing one keeps its mode. Temporary files left by killed writers (processes
    of this host that no longer run) are then removed from the folder.

    Example::

        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> write_atomic(folder / "last", b"checkpoint_epoch1.hf")
        >>> (folder / "last").read_bytes(), [p.name for p in folder.iterdir()]
        (b'checkpoint_epoch1.hf', ['last'])
    """
    directory = target.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    prefix = f".{target.name[:100]}.afnio.{_host_tag()}.{os.getpid()}."
    while True:
        tmp = directory / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, target.stat().st_mode & 0o7777)  # keep an existing mode
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remove_stale_temps(directory)


# -- temporary files of killed saves --------------------------------------------------

_TEMP_NAME = re.compile(
    r"\..*\.afnio\.(?P<host>[A-Za-z0-9-]{1,32})\.(?P<pid>[0-9]{1,10})\.[a-z0-9_]{8}\.tmp"
)  # what write_atomic names its temporary files


def _host_tag() -> str:
    """This host's name as it appears in temporary file names (letters, digits,
    dashes): a process id means something only on its own host."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still run (``True`` when unsure)."""
    if os.name != "posix" or pid <= 0:
        return True  # no safe probe (os.kill(pid, 0) is not one on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs, as another user
        return True
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Remove the temporary files that saves of dead processes of this host left in
    ``directory`` (best effort: a failure here never fails the save)."""
    host, me = _host_tag(), os.getpid()
    try:
        with os.scandir(directory) as entries:
            stale = [
                entry.path
                for entry in entries
                if (m := _TEMP_NAME.fullmatch(entry.name)) is not None
                and m["host"] == host
                and int(m["pid"]) != me
                and entry.is_file(follow_symlinks=False)
                and not _pid_alive(int(m["pid"]))
            ]
    except OSError:
        return
    for path in stale:
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- decoding -------------------------------------------------------------------------


def _raise_hint(field: str) -> str:
    return (
        f" If you trust this file, raise the limit: afnio.load(f, limits=LoadLimits("
        f"{field}=...)), with LoadLimits from afnio.serialization."
    )


# Where a value sits, for error messages, built only when one is raised: None (the
# saved value) or (parent, step), a step being an index, a _Key or a literal suffix.
_Where = tuple[Any, Any] | None


class _Key:
    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key


def _render(where: _Where) -> str:
    steps = []
    while where is not None:
        where, step = where
        steps.append(step)
    out = "data"
    for step in reversed(steps):
        if isinstance(step, int):
            out += f"[{step}]"
        elif isinstance(step, _Key):
            text = repr(step.key)
            out += f"[{text if len(text) <= 60 else text[:57] + '...'}]"
        else:
            out += step
    return out


_SCALARS = (bool, int, float, type(None))


class _Decoder:
    def __init__(self, may_import: Callable[[str], bool], limits: LoadLimits) -> None:
        self.may_import = may_import
        self.max_depth = limits.max_depth
        self.max_string_length = limits.max_string_length

    def _string(self, value: str, where: _Where) -> str:
        if len(value) > self.max_string_length:
            raise SerializationError(
                f"A string at {_render(where)} has {len(value):,} characters, more "
                f"than LoadLimits.max_string_length ({self.max_string_length:,})."
                + _raise_hint("max_string_length")
            )
        return value

    def _check_depth(self, depth: int, where: _Where) -> None:
        if depth > self.max_depth:
            raise SerializationError(
                f"The value at {_render(where)} is nested more than "
                f"LoadLimits.max_depth ({self.max_depth}) levels deep."
                + _raise_hint("max_depth")
            )

    def decode(self, obj: Any, where: _Where, depth: int) -> Any:
        """Decode the parsed JSON ``obj`` (an array or object at nesting ``depth``
        counts one level). Arrays are decoded in place and the parsed items of tagged
        containers are dropped as they are converted, so the parsed document and
        the decoded value never both exist in full."""
        if isinstance(obj, str):
            return self._string(obj, where)
        if isinstance(obj, _SCALARS):
            return obj
        self._check_depth(depth, where)
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                if not isinstance(v, _SCALARS):
                    obj[i] = self.decode(v, (where, i), depth + 1)
            return obj
        if not isinstance(obj, dict) or not isinstance(obj.get(_TAG), str):
            raise SerializationError(
                f"Unexpected JSON value at {_render(where)}: {_short(obj)}."
            )
        tag = obj[_TAG]
        if tag in ("variable", "parameter"):
            return self._variable(obj, tag, where, depth)
        if tag == "tuple":
            items = self._items(obj, where)
            if items:
                self._check_depth(depth + 1, where)
            return tuple(
                self.decode(v, (where, i), depth + 2) for i, v in enumerate(items)
            )
        if tag in ("dict", "state_dict"):
            return self._dict(obj, tag, where, depth)
        if tag == "model":
            return {
                "class_type": self.decode(
                    obj.get("class_type"), (where, ".class_type"), depth + 1
                ),
                "provider": self.decode(
                    obj.get("provider"), (where, ".provider"), depth + 1
                ),
                "usage": self.decode(obj.get("usage"), (where, ".usage"), depth + 1),
            }
        if tag == "function":
            return self._function(obj, where)
        raise SerializationError(
            f"Unknown value tag {_short(tag)} at {_render(where)}."
        )

    def _variable(
        self, obj: dict[str, Any], tag: str, where: _Where, depth: int
    ) -> Variable:
        cls = Parameter if tag == "parameter" else Variable
        if not isinstance(obj.get("requires_grad"), bool):
            raise SerializationError(
                f"Invalid {tag} at {_render(where)}: requires_grad must be true or "
                "false."
            )
        data, role = obj.get("data"), obj.get("role")
        if isinstance(data, list):
            self._check_depth(depth + 1, where)
        for s in [data, role, *(data if isinstance(data, list) else ())]:
            if isinstance(s, str):
                self._string(s, where)
        try:
            return cls(
                obj["data"], role=obj["role"], requires_grad=obj["requires_grad"]
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise SerializationError(
                f"Invalid {tag} at {_render(where)}: {_short(e, 200, str)}"
            ) from None

    def _dict(
        self, obj: dict[str, Any], tag: str, where: _Where, depth: int
    ) -> dict[Any, Any]:
        result: dict[Any, Any] = OrderedDict() if tag == "state_dict" else {}
        items = self._items(obj, where)
        if items:
            self._check_depth(depth + 2, where)  # the item list, then a pair
        items.reverse()  # pop from the end: each parsed pair is freed once converted
        same_hash: dict[int, int] = {}
        while items:
            pair = items.pop()
            if not isinstance(pair, list) or len(pair) != 2:
                raise SerializationError(
                    f"Invalid dict item at {_render(where)}: {_short(pair)}."
                )
            key = self.decode(pair[0], (where, " key"), depth + 3)
            try:
                hashed = hash(key)
            except TypeError:
                raise SerializationError(
                    f"Unhashable dict key at {_render(where)}."
                ) from None
            if not isinstance(key, str):
                # str hashes are salted per process, others are not: keys crafted
                # to share one hash would make building the dict quadratic
                same_hash[hashed] = same_hash.get(hashed, 0) + 1
                if same_hash[hashed] > _MAX_SAME_HASH:
                    raise SerializationError(
                        f"Invalid dict at {_render(where)}: more than "
                        f"{_MAX_SAME_HASH} keys share one hash (a file crafted to "
                        "make loading slow)."
                    )
            result[key] = self.decode(pair[1], (where, _Key(key)), depth + 3)
        if tag == "state_dict":
            raw = obj.get("metadata", {_TAG: "dict", "items": []})
            metadata = self.decode(raw, (where, "._metadata"), depth + 1)
            if not isinstance(metadata, dict):
                raise SerializationError(
                    f"Invalid state_dict metadata at {_render(where)}._metadata: "
                    f"expected a dict, got {type(metadata).__name__}."
                )
            result._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
        return result

    def _function(self, obj: dict[str, Any], where: _Where) -> Any:
        path = obj.get("path")
        if not isinstance(path, str) or path.count(":") != 1:
            raise SerializationError(
                f"Invalid function path at {_render(where)}: {_short(path)}."
            )
        self._string(path, where)
        if not self.may_import(path.partition(":")[0]):
            return FunctionReference(path)
        try:
            return FunctionReference(path).resolve()
        except ImportError as e:
            raise SerializationError(
                f"Cannot import {path!r} at {_render(where)}: {e}"
            ) from e

    @staticmethod
    def _items(obj: dict[str, Any], where: _Where) -> list[Any]:
        items = obj.get("items")
        if not isinstance(items, list):
            raise SerializationError(
                f"Invalid container at {_render(where)}: no item list."
            )
        return items


def _short(value: Any, width: int = 80, fmt: Callable[[Any], str] = repr) -> str:
    """``fmt(value)`` cut to ``width`` characters, without formatting a huge value
    in full."""
    if isinstance(value, (list, dict)) and len(value) > width:
        return f"<{type(value).__name__} of {len(value):,} items>"
    if isinstance(value, str) and len(value) > width:
        value = value[:width]
    text = fmt(value)
    return text if len(text) <= width else text[: width - 3] + "..."


@contextlib.contextmanager
def _opened(f: PathOrFile) -> Iterator[tuple[IO[bytes], str]]:
    """``f`` as a readable binary file and its name for messages. A path must name
    a regular file: a FIFO, a device or a directory is refused without reading
    (opening a FIFO could block forever)."""
    if isinstance(f, (str, os.PathLike)):
        name = os.fsdecode(os.fspath(f))
        _require_regular_file(os.stat(f).st_mode, name)  # or FileNotFoundError, ...
        # O_NONBLOCK: should the path have become a FIFO since, opening never waits
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(f, flags)
        try:
            _require_regular_file(os.fstat(fd).st_mode, name)
            file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with file:
            yield file, name
        return
    if not hasattr(f, "read"):
        raise TypeError(
            f"`f` must be a path or a binary file object open for reading, got "
            f"{type(f).__name__}."
        )
    if isinstance(f, io.TextIOBase):
        raise TypeError(
            "`f` must be a binary file object (open it with mode 'rb'), got a text "
            f"file ({type(f).__name__})."
        )
    seekable = getattr(f, "seekable", None)
    if seekable is not None and not seekable():
        raise TypeError(
            "`f` must be a seekable file object (afnio.load reads a zip archive); "
            "read it into an io.BytesIO first."
        )
    yield f, getattr(f, "name", type(f).__name__)


def _require_regular_file(mode: int, name: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "not a regular file"
    raise SerializationError(
        f"{name} is {kind}, not a checkpoint file: afnio.load reads regular files only."
    )


# what zipfile raises (besides BadZipFile) on a damaged archive; an OSError counts
# only as EINVAL (a seek to an offset the archive invents), never a real I/O error
_ZIP_ERRORS = (
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,  # an encrypted member
    ValueError,  # a negative seek, an undecodable member name
    OverflowError,  # an offset past any file size
    struct.error,
)


def _read_member(f: PathOrFile, limits: LoadLimits) -> bytearray:
    """The bytes of ``data.json``, inflated a chunk at a time and never past the
    size its header declares (checked against ``limits.max_bytes`` first)."""
    with _opened(f) as (source, name):
        try:
            zf = zipfile.ZipFile(source)
        except zipfile.BadZipFile as e:
            raise SerializationError(
                f"{name} is not an afnio checkpoint (not a zip archive: {e}). "
                "afnio.load reads files written by afnio.save; it never unpickles."
            ) from None
        except (*_ZIP_ERRORS, OSError) as e:
            _reraise_io_error(e)
            raise SerializationError(
                f"{name} is not an afnio checkpoint (a damaged zip archive: "
                f"{_short(e, 200, str)})."
            ) from None
        with zf:
            try:
                return _inflate(zf, name, limits)
            except SerializationError:
                raise
            except (zipfile.BadZipFile, *_ZIP_ERRORS, OSError) as e:
                _reraise_io_error(e)
                raise SerializationError(
                    f"Corrupted afnio checkpoint {name}: {_short(e, 200, str)}"
                ) from None


def _reraise_io_error(e: BaseException) -> None:
    if isinstance(e, OSError) and not (
        isinstance(e, io.UnsupportedOperation) or e.errno == errno.EINVAL
    ):
        raise e


def _inflate(zf: zipfile.ZipFile, name: str, limits: LoadLimits) -> bytearray:
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if any(n == "data.pkl" or n.endswith(".pkl") for n in names):
        raise SerializationError(
            f"{name} holds a pickle (data.pkl): upstream afnio's format. afnio never "
            "unpickles, since loading a pickle can run arbitrary code; re-save the "
            "checkpoint with this afnio."
        )
    if names != [_MEMBER]:
        raise SerializationError(
            f"{name} is not an afnio checkpoint: expected a zip holding only "
            f"{_MEMBER!r}, found {_short(names[:5])}."
        )
    info = infos[0]
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise SerializationError(
            f"{name}: {_MEMBER} uses zip compression method {info.compress_type}; "
            "afnio checkpoints are deflated."
        )
    size = info.file_size
    if size > limits.max_bytes:
        raise SerializationError(
            f"{name}: {_MEMBER} inflates to {size:,} bytes, more than "
            f"LoadLimits.max_bytes ({limits.max_bytes:,})." + _raise_hint("max_bytes")
        )
    raw = bytearray()
    with zf.open(info) as member:
        while len(raw) < size:
            chunk = member.read(min(_CHUNK, size - len(raw)))
            if not chunk:
                break
            raw += chunk
    if len(raw) != size:
        raise SerializationError(
            f"Corrupted afnio checkpoint {name}: {_MEMBER} holds {len(raw):,} bytes, "
            f"its header says {size:,}."
        )
    return raw


def _count_elements(raw: bytes | bytearray) -> int:
    """An upper bound of the JSON values and object keys in ``raw``, without parsing
    it (a value inside an array or object follows a ``,`` or its opening bracket,
    and a key is a string), an object counting twice: it takes about twice the
    memory of any other value."""
    commas, arrays, objects = raw.count(b","), raw.count(b"["), raw.count(b"{")
    return 1 + commas + arrays + 2 * objects + raw.count(b'"') // 2


def _parse(raw: bytearray, limits: LoadLimits) -> Any:
    """``json.loads`` of ``raw`` (which it empties), after the checks that bound the
    memory parsing takes."""
    elements = _count_elements(raw)
    if elements > limits.max_elements:
        raise SerializationError(
            f"Refusing {_MEMBER}: it holds up to {elements:,} JSON elements, more "
            f"than LoadLimits.max_elements ({limits.max_elements:,})."
            + _raise_hint("max_elements")
        )
    try:
        text = raw.decode("ascii" if raw.isascii() else "utf-8")
    except UnicodeDecodeError as e:
        raise SerializationError(
            f"Corrupted afnio checkpoint: invalid JSON ({e})."
        ) from None
    del raw[:]  # the text replaces the bytes
    size = len(text) * _char_width(text)
    if size > limits.max_bytes:
        raise SerializationError(
            f"Refusing {_MEMBER}: its text takes {size:,} bytes in memory (characters "
            f"beyond Latin-1 take 2 or 4), more than LoadLimits.max_bytes "
            f"({limits.max_bytes:,})." + _raise_hint("max_bytes")
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: also a >4300-digit int
        raise SerializationError(
            f"Corrupted afnio checkpoint: invalid JSON ({_short(e, 200, str)})."
        ) from None


def _char_width(text: str) -> int:
    """Bytes per character of ``text`` in memory (CPython's 1, 2 or 4)."""
    if text.isascii():
        return 1
    top = ord(max(text))
    return 1 if top < 0x100 else 2 if top < 0x10000 else 4


def load(
    f: PathOrFile,
    *,
    allow_functions: bool | Iterable[str] = False,
    limits: LoadLimits | None = None,
) -> Any:
    """Load what :func:`save` wrote.

    Args:
        f: a path to a regular file, or a seekable binary file object open for
            reading.
        allow_functions: whether functions saved by import path may be imported:
            ``False`` (default) returns them as inert ``FunctionReference``\\ s (a
            Module slot that already holds the same function accepts one);
            ``True`` imports any; a list of module names imports only from those
            modules (and their submodules). Importing runs the module's code: only
            allow it for files you trust.
        limits: the bounds on size, element count, string length and nesting
            (default ``LoadLimits()``); raise them only for files you trust.

    Raises:
        SerializationError: for anything that is not an intact afnio file within
            ``limits``, including pickles (which are never loaded) and paths that
            are not regular files (a directory, a FIFO, a device).
        TypeError: ``f`` is not a path or a seekable binary file object, or
            ``allow_functions`` or ``limits`` has the wrong type.
        FileNotFoundError: the path does not exist.
        PermissionError: the file cannot be read.
    """
    may_import = _module_filter(allow_functions)
    if limits is None:
        limits = LoadLimits()
    elif not isinstance(limits, LoadLimits):
        raise TypeError(
            f"`limits` must be an afnio.serialization.LoadLimits or None, got "
            f"{type(limits).__name__}."
        )
    document = _parse(_read_member(f, limits), limits)
    if (
        not isinstance(document, dict)
        or document.get("format") != "afnio"
        or "data" not in document
    ):
        raise SerializationError(
            "Not an afnio checkpoint: the format marker is missing."
        )
    version = document.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SerializationError(
            f"Checkpoint format version {_short(version)} is newer than this afnio "
            f"supports ({FORMAT_VERSION}); upgrade afnio."
        )
    data = document.pop("data")
    del document
    try:
        return _Decoder(may_import, limits).decode(data, None, 1)
    except RecursionError:
        raise SerializationError(
            "Corrupted afnio checkpoint: nesting too deep for Python's recursion "
            "limit; lower LoadLimits.max_depth."
        ) from None
