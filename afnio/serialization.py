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

import io
import json
import os
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from afnio._variable import Variable
from afnio.cognitive.modules.module import FunctionReference, function_import_path
from afnio.cognitive.parameter import Parameter
from afnio.errors import SerializationError
from afnio.models.model import BaseModel
from afnio.models.model_registry import model_class_name

__all__ = ["FORMAT_VERSION", "load", "save"]

FORMAT_VERSION = 1
_MEMBER = "data.json"
_TAG = "__afnio__"
_MAX_BYTES = 1 << 31  # refuse members that inflate past 2 GiB (zip bombs)

PathOrFile = str | os.PathLike[str] | IO[bytes]


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
    save never leaves a corrupted checkpoint behind.

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
        target = Path(f)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        try:
            # mkstemp makes an owner-only file: give it the usual permissions
            os.fchmod(fd, _file_mode(target))
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    elif hasattr(f, "write"):
        f.write(blob)
    else:
        raise TypeError(
            f"`f` must be a path or a binary file object open for writing, got "
            f"{type(f).__name__}."
        )


def _file_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


# -- decoding -------------------------------------------------------------------------


class _Decoder:
    def __init__(self, allow_functions: bool | Iterable[str] | None) -> None:
        if allow_functions is None:
            allow_functions = False
        if isinstance(allow_functions, bool):
            self.allow_all = allow_functions
            self.allowed: frozenset[str] = frozenset()
        elif isinstance(allow_functions, str):
            raise TypeError(
                "`allow_functions` must be a bool or a list of module names, got a "
                f"str; use [{allow_functions!r}]."
            )
        else:
            self.allow_all = False
            self.allowed = frozenset(allow_functions)

    def _may_import(self, module: str) -> bool:
        if self.allow_all:
            return True
        return any(module == m or module.startswith(m + ".") for m in self.allowed)

    def decode(self, obj: Any, where: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, list):
            return [self.decode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if not isinstance(obj, dict) or not isinstance(obj.get(_TAG), str):
            raise SerializationError(f"Unexpected JSON value at {where}: {obj!r:.80}.")
        tag = obj[_TAG]
        if tag in ("variable", "parameter"):
            cls = Parameter if tag == "parameter" else Variable
            if not isinstance(obj.get("requires_grad"), bool):
                raise SerializationError(
                    f"Invalid {tag} at {where}: requires_grad must be true or false."
                )
            try:
                return cls(
                    obj["data"],
                    role=obj["role"],
                    requires_grad=bool(obj["requires_grad"]),
                )
            except (KeyError, TypeError) as e:
                raise SerializationError(f"Invalid {tag} at {where}: {e}") from None
        if tag == "tuple":
            return tuple(
                self.decode(v, f"{where}[{i}]")
                for i, v in enumerate(self._items(obj, where))
            )
        if tag in ("dict", "state_dict"):
            result: dict[Any, Any] = OrderedDict() if tag == "state_dict" else {}
            for pair in self._items(obj, where):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise SerializationError(
                        f"Invalid dict item at {where}: {pair!r:.80}."
                    )
                key = self.decode(pair[0], f"{where} key")
                try:
                    hash(key)
                except TypeError:
                    raise SerializationError(
                        f"Unhashable dict key at {where}."
                    ) from None
                result[key] = self.decode(pair[1], f"{where}[{key!r}]")
            if tag == "state_dict":
                raw = obj.get("metadata", {_TAG: "dict", "items": []})
                metadata = self.decode(raw, f"{where}._metadata")
                if not isinstance(metadata, dict):
                    raise SerializationError(
                        f"Invalid state_dict metadata at {where}._metadata: expected "
                        f"a dict, got {type(metadata).__name__}."
                    )
                result._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
            return result
        if tag == "model":
            return {
                "class_type": obj.get("class_type"),
                "provider": obj.get("provider"),
                "usage": self.decode(obj.get("usage"), f"{where}.usage"),
            }
        if tag == "function":
            path = obj.get("path")
            if not isinstance(path, str) or path.count(":") != 1:
                raise SerializationError(f"Invalid function path at {where}: {path!r}.")
            module = path.partition(":")[0]
            if not self._may_import(module):
                return FunctionReference(path)
            try:
                return FunctionReference(path).resolve()
            except ImportError as e:
                raise SerializationError(
                    f"Cannot import {path!r} at {where}: {e}"
                ) from e
        raise SerializationError(f"Unknown value tag {tag!r} at {where}.")

    @staticmethod
    def _items(obj: dict[str, Any], where: str) -> list[Any]:
        items = obj.get("items")
        if not isinstance(items, list):
            raise SerializationError(f"Invalid container at {where}: no item list.")
        return items


def _read_member(f: PathOrFile) -> bytes:
    if isinstance(f, (str, os.PathLike)):
        source: Any = Path(f)
        name = str(f)
    elif hasattr(f, "read"):
        source = f
        name = getattr(f, "name", type(f).__name__)
    else:
        raise TypeError(
            f"`f` must be a path or a binary file object open for reading, got "
            f"{type(f).__name__}."
        )
    try:
        with zipfile.ZipFile(source) as zf:
            names = zf.namelist()
            if "data.pkl" in names or any(n.endswith(".pkl") for n in names):
                raise SerializationError(
                    f"{name} holds a pickle (data.pkl): upstream afnio's format. "
                    "afnio never unpickles, since loading a pickle can run arbitrary "
                    "code; re-save the checkpoint with this afnio."
                )
            if names != [_MEMBER]:
                raise SerializationError(
                    f"{name} is not an afnio checkpoint: expected a zip holding only "
                    f"{_MEMBER!r}, found {names[:5]!r}."
                )
            info = zf.getinfo(_MEMBER)
            if info.file_size > _MAX_BYTES:
                raise SerializationError(f"{name}: {_MEMBER} is too large to load.")
            return zf.read(_MEMBER)
    except (zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        raise SerializationError(f"Corrupted afnio checkpoint {name}: {e}") from None
    except zipfile.BadZipFile as e:
        raise SerializationError(
            f"{name} is not an afnio checkpoint (not a zip archive: {e}). afnio.load "
            "reads files written by afnio.save; it never unpickles."
        ) from None


def load(f: PathOrFile, *, allow_functions: bool | Iterable[str] = False) -> Any:
    """Load what :func:`save` wrote.

    Args:
        f: a path, or a binary file object open for reading.
        allow_functions: whether functions saved by import path may be imported:
            ``False`` (default) returns them as inert ``FunctionReference``\\ s (a
            Module slot that already holds the same function accepts one);
            ``True`` imports any; a list of module names imports only from those
            modules (and their submodules). Importing runs the module's code: only
            allow it for files you trust.

    Raises:
        SerializationError: for anything that is not an intact afnio file, including
            pickles (which are never loaded).
    """
    raw = _read_member(f)
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SerializationError(
            f"Corrupted afnio checkpoint: invalid JSON ({e})."
        ) from None
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
            f"Checkpoint format version {version!r} is newer than this afnio supports "
            f"({FORMAT_VERSION}); upgrade afnio."
        )
    try:
        return _Decoder(allow_functions).decode(document["data"], "data")
    except RecursionError:
        raise SerializationError(
            "Corrupted afnio checkpoint: nesting too deep."
        ) from None
