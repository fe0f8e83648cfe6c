"""``JsonlDataset``: a streaming dataset over a JSON Lines file (data larger than
memory).

The file is read lazily, one line at a time, every epoch (each ``iter()`` re-reads it
from the start); only the shuffle buffer (``buffer_size`` rows) and the rows of the
batch being built are in memory, whatever the file's size.

* **Rows**: one JSON object per line; blank lines are skipped (they still count in
  the line numbers). Each row is checked as it is read: a line that is not UTF-8 or
  not JSON, a row that is not an object, a missing field or a field of the wrong type
  raises :class:`JsonlRowError` naming the file, the line number and what is wrong.
* **Samples**: with ``input=`` (and ``target=``) a row becomes Variables the way
  :class:`~afnio.utils.datasets.FacilitySupport` builds its items: ``(x, y)`` for
  one target field, ``(x, (y1, y2, ...))`` for several; with ``transform=`` the
  sample is ``transform(row)``; with neither, the row (a dict) itself.
* **Shuffling by buffer**: with ``buffer_size=k > 1`` the first ``k`` rows fill a
  buffer; each sample is then drawn at random from the buffer and its place taken by
  the next row read. Rows at most ``k`` apart can swap, so choose ``k`` larger than
  any run of similar rows in the file. Each epoch draws from its own generator,
  seeded from ``seed`` and the epoch number: the same seed gives the same sequence
  of epochs, each in a new order.
* **Sharding**: ``num_shards=n, shard_index=i`` keeps the rows ``i, i + n, i + 2n,
  ...`` (counting non-blank lines from 0), so ``n`` processes reading the same file
  see disjoint parts that together cover it. A shard checks only its own rows.
* **Exact resume**: :meth:`JsonlDataset.state_dict` is the position between two
  samples (the epoch, the byte offset in the file, the line and row counters, the
  buffer's rows with their line and row numbers, and the generator's state); after
  :meth:`JsonlDataset.load_state_dict` the next ``iter()`` continues from exactly
  there. The :class:`~afnio.trainer.Trainer` stores it in every checkpoint of a
  ``fit`` over a :class:`~afnio.utils.data.DataLoader` of this dataset, so a
  resumed fit sees exactly the batches an uninterrupted one sees, without reading
  the file again up to that point. The buffer's rows are in the state: a checkpoint
  grows by about ``buffer_size`` rows. Each buffered row keeps its row number, so a
  :class:`~afnio.utils.data.DataLoader`'s ``last_indices`` after a restore are the
  row numbers an uninterrupted epoch gives. (A state of the earlier format, version
  1, has no row numbers: they are recovered when no blank line comes before the
  saved position, else the batches holding those rows have ``last_indices`` None.)
* **Several readers**: every ``iter()`` is an epoch of its own, with its own
  position; epochs are numbered in the order they start (the number seeds the
  shuffle). One dataset object can feed several DataLoaders at once (e.g. the train
  and val loaders of a ``fit``): each loader's ``state_dict()`` is its own epoch's
  position (:meth:`JsonlDataset.state_at`), so a validation pass in the middle of a
  training epoch does not move the training position that is checkpointed, and a
  resume restores each loader's position and the epoch numbering.
  :meth:`JsonlDataset.state_dict` itself is the position of the epoch started last
  (the one reader of a dataset iterated directly).

Example::

    >>> import json, tempfile, os
    >>> from afnio.utils.data import DataLoader, JsonlDataset
    >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
    >>> with open(path, "w") as f:
    ...     for i in range(5):
    ...         print(json.dumps({"text": f"message {i}", "label": i % 2}), file=f)
    >>> ds = JsonlDataset(path, input="text", target="label")
    >>> x, y = next(iter(ds))
    >>> x.data, x.role, y.data, y.role
    ('message 0', 'input text', 0, 'output label')
    >>> [len(x.data) for x, y in DataLoader(ds, batch_size=2)]
    [2, 2, 1]
    >>> shuffled = JsonlDataset(path, input="text", buffer_size=3, seed=0)
    >>> sorted(x.data for x in shuffled) == [f"message {i}" for i in range(5)]
    True
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from afnio._variable import Variable
from afnio.utils.data.dataset import IterableDataset

__all__ = ["JsonlDataset", "JsonlRowError"]

_STATE_VERSION = 2
"""The format of :meth:`JsonlDataset.state_dict`: 2 keeps each buffered row's row
number (``[line, text, row]``); 1 (still loaded) kept ``[line, text]``."""
_STATE_VERSIONS = (1, 2)

_JSON_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _json_name(value: Any) -> str:
    """The JSON kind of a parsed value, for messages ("an array", "null", ...)."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _matches(value: Any, types: tuple[type, ...]) -> bool:
    """Whether ``value`` is of one of ``types``, the JSON way: a boolean is never an
    integer or a number, and an integer is a number."""
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


class JsonlRowError(ValueError):
    """A line of a JSONL file that cannot be read as a row: not UTF-8, not JSON, not
    a JSON object, a required field missing or of the wrong type.

    Attributes:
        path: the file.
        line: the line number (1-based, blank lines included).
        reason: what is wrong.
    """

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}, line {line}: {reason}")


def _as_names(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(
        f"`{what}` must be a field name (str) or a non-empty sequence of them, got "
        f"{value!r}."
    )


def _check_types(fields: Any) -> dict[str, tuple[type, ...]]:
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise TypeError(
            "`fields` must map field names to a type or a tuple of types, e.g. "
            f'{{"label": str, "score": (int, float)}}; got {type(fields).__name__}.'
        )
    checked: dict[str, tuple[type, ...]] = {}
    for name, types in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"`fields` keys must be field names (str), got {name!r}.")
        group = types if isinstance(types, tuple) else (types,)
        bad = [t for t in group if t not in _JSON_NAMES]
        if bad or not group:
            raise TypeError(
                f"`fields[{name!r}]` must be one of str, int, float, bool, list, dict "
                f"or type(None) (the JSON types), or a tuple of them; got {types!r}."
            )
        checked[name] = group
    return checked


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{what}` must be an int >= {minimum}, got {value!r}.")
    return value


def _rng_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def _rng_from_json(state: Any) -> tuple[Any, ...]:
    version, internal, gauss_next = state
    return (int(version), tuple(int(x) for x in internal), gauss_next)


_Entry = tuple[int, str, dict[str, Any]]
"""A row read: its line number, its text and its parsed object."""


def _valid_buffer(buffer: Any) -> bool:
    """Whether ``buffer`` is a saved shuffle buffer: ``[line, text, row]`` entries
    (``row`` an int, or None when unknown), or ``[line, text]`` (format 1)."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return isinstance(buffer, list) and all(
        isinstance(entry, (list, tuple))
        and len(entry) in (2, 3)
        and is_int(entry[0])
        and isinstance(entry[1], str)
        and (len(entry) == 2 or entry[2] is None or is_int(entry[2]))
        for entry in buffer
    )


class JsonlDataset(IterableDataset[Any]):
    """A streaming dataset over the JSON Lines file ``path`` (see the module
    docstring for rows, shuffling, sharding and resume).

    Args:
        path: the ``.jsonl`` file (UTF-8, one JSON object per line).
        input: the field (or fields, a tuple of Variables) that becomes the input
            Variable(s) of each sample.
        target: the field (or fields, a tuple of Variables) that becomes the
            target(s); the sample is ``(x, y)`` (``(x, (y1, y2, ...))`` for several
            fields), or ``x`` alone without ``target``.
        fields: required fields and their types, e.g. ``{"label": str, "score":
            (int, float)}`` (JSON types: ``str``, ``int``, ``float`` (an integer
            counts), ``bool``, ``list``, ``dict``, ``type(None)``). ``input`` and
            ``target`` fields are always required; unless typed here they may hold
            any value but null (an array or object becomes its JSON text).
        roles: the role of each field's Variable; default ``"input <field>"`` and
            ``"output <field>"``.
        transform: ``transform(row) -> sample`` instead of ``input``/``target`` (the
            row is already checked against ``fields``).
        buffer_size: rows in the shuffle buffer; ``1`` (the default) keeps the
            file's order.
        seed: seed of the shuffling; ``None`` draws one from system entropy at
            construction (kept in :meth:`state_dict`, so a resume is exact still).
        num_shards, shard_index: keep only the rows ``shard_index, shard_index +
            num_shards, ...`` (counting non-blank lines from 0).

    Raises:
        TypeError: a wrong argument type, or both ``transform`` and ``input``.
        ValueError: ``target`` without ``input``, a bad ``buffer_size``,
            ``num_shards`` or ``shard_index``.
        FileNotFoundError: ``path`` does not exist (checked at construction).
        JsonlRowError: while iterating, a line that is not a valid row.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        input: str | Sequence[str] | None = None,
        target: str | Sequence[str] | None = None,
        *,
        fields: Mapping[str, type | tuple[type, ...]] | None = None,
        roles: Mapping[str, str] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        buffer_size: int = 1,
        seed: int | None = None,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`path` must be a path, got {type(path).__name__}.")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JsonlDataset: no file at {self.path}.")
        self.input = _as_names(input, "input")
        self.target = _as_names(target, "target")
        if self.target and not self.input:
            raise ValueError("`target` needs `input` (the field of the input).")
        if transform is not None and not callable(transform):
            raise TypeError(
                f"`transform` must be callable, got {type(transform).__name__}."
            )
        if transform is not None and self.input:
            raise TypeError(
                "Pass either `transform` (row -> sample) or `input`/`target`, not both."
            )
        self.transform = transform
        self.fields = _check_types(fields)
        if roles is not None and not (
            isinstance(roles, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items())
        ):
            raise TypeError("`roles` must map field names (str) to roles (str).")
        self.roles = dict(roles or {})
        self.buffer_size = _check_int(buffer_size, "buffer_size", 1)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an int or None, got {seed!r}.")
        self.seed = seed
        self._base_seed = (
            seed if seed is not None else random.SystemRandom().randrange(2**63)
        )
        self.num_shards = _check_int(num_shards, "num_shards", 1)
        self.shard_index = _check_int(shard_index, "shard_index", 0)
        if self.shard_index >= self.num_shards:
            raise ValueError(
                f"`shard_index` must be below `num_shards` ({self.num_shards}), got "
                f"{self.shard_index}."
            )
        # every required field: input, target, then those typed in `fields`
        self._required = list(dict.fromkeys([*self.input, *self.target, *self.fields]))
        self._epoch = 0  # epochs started so far (the next epoch's number)
        self._pending: dict[str, Any] | None = None  # a loaded mid-epoch position
        self._live: _JsonlIterator | None = None
        self._length: tuple[tuple[int, int], int] | None = None

    # -- rows ----------------------------------------------------------------------

    def _parse(self, raw: bytes, line: int) -> _Entry:
        """Decode, parse and check one line (see :class:`JsonlRowError`)."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonlRowError(
                self.path, line, f"not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
        text = text.rstrip("\r\n")
        if line == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise JsonlRowError(
                self.path, line, f"invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        if not isinstance(row, dict):
            raise JsonlRowError(
                self.path, line, f"the row is {_json_name(row)}, expected an object"
            )
        self._check_row(row, line)
        return line, text, row

    def _check_row(self, row: dict[str, Any], line: int) -> None:
        for name in self._required:
            if name not in row:
                have = ", ".join(repr(k) for k in list(row)[:10]) or "none"
                more = ", ..." if len(row) > 10 else ""
                raise JsonlRowError(
                    self.path,
                    line,
                    f"missing field {name!r} (the row has fields {have}{more})",
                )
            value = row[name]
            types = self.fields.get(name)
            if types is None:
                if value is None:
                    raise JsonlRowError(
                        self.path, line, f"field {name!r} is null, expected a value"
                    )
            elif not _matches(value, types):
                expected = " or ".join(_JSON_NAMES[t] for t in types)
                raise JsonlRowError(
                    self.path,
                    line,
                    f"field {name!r} is {_json_name(value)} ({value!r:.60}), "
                    f"expected {expected}",
                )

    def _variable(self, row: dict[str, Any], name: str, kind: str) -> Variable:
        value = row[name]
        if not isinstance(value, (str, int, float)):
            value = json.dumps(value, ensure_ascii=False)
        return Variable(value, role=self.roles.get(name, f"{kind} {name}"))

    def _sample(self, entry: _Entry) -> Any:
        """The sample of a checked row (see the class docstring)."""
        line, _, row = entry
        if self.transform is not None:
            try:
                return self.transform(row)
            except Exception as e:
                e.add_note(f"(transform of {self.path}, line {line})")
                raise
        if not self.input:
            return row
        xs = tuple(self._variable(row, name, "input") for name in self.input)
        x = xs[0] if len(xs) == 1 else xs
        if not self.target:
            return x
        ys = tuple(self._variable(row, name, "output") for name in self.target)
        return (x, ys[0] if len(ys) == 1 else ys)

    def _mine(self, row_index: int) -> bool:
        return row_index % self.num_shards == self.shard_index

    # -- the dataset protocol ------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        """A new epoch (the file read again from its start), or, right after
        :meth:`load_state_dict`, the rest of the saved epoch."""
        if self._live is not None:
            self._live.close()  # (it reopens the file if it is read again)
        position, self._pending = self._pending, None
        return self.iterate_from(position)

    def iterate_from(self, position: Mapping[str, Any] | None) -> Iterator[Any]:
        """An epoch starting at ``position`` (the ``"position"`` of a state of this
        dataset, as :meth:`restore` returns it): the rest of that epoch; with None,
        a new epoch (numbered next). The dataset's own pending position (from
        :meth:`load_state_dict`) is left alone: this is how a
        :class:`~afnio.utils.data.DataLoader` restores its own epoch when several
        loaders read this dataset."""
        if position is None:
            live = _JsonlIterator(self, self._epoch, None)
            self._epoch += 1
        else:
            live = _JsonlIterator(self, int(position["epoch"]), position)
        self._live = live
        return live

    def __len__(self) -> int:
        """The samples of one epoch of this shard: the first call counts the file's
        non-blank lines (one streaming pass); the count is kept until the file's
        size or modification time changes."""
        stat = self.path.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        if self._length is not None and self._length[0] == key:
            return self._length[1]
        rows = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if raw.strip():
                    rows += 1
        n = rows // self.num_shards + (
            1 if rows % self.num_shards > self.shard_index else 0
        )
        self._length = (key, n)
        return n

    def state_dict(self) -> dict[str, Any]:
        """The position between two samples, JSON-serialisable: after the last
        sample yielded by the epoch started last (``position``), or between epochs
        (``position`` is None and the next ``iter()`` starts epoch ``next_epoch``);
        right after :meth:`load_state_dict`, the loaded position. The settings that
        decide the order (seed, buffer, shards, file size) are in it too, so
        :meth:`load_state_dict` refuses a state of another setup. With several
        readers, each one's position is :meth:`state_at` of its iterator's."""
        if self._pending is not None:
            position: dict[str, Any] | None = self._pending
        elif self._live is not None:
            position = self._live.position()
        else:
            position = None
        return self.state_at(position)

    def state_at(self, position: Mapping[str, Any] | None) -> dict[str, Any]:
        """The state of this dataset with ``position`` as the position (an
        iterator's :meth:`~_JsonlIterator.position`, or None: between epochs): the
        state of one reader of a dataset several read (a DataLoader's), with the
        dataset's epoch counter (``next_epoch``: the number of the next epoch any
        reader starts)."""
        return {
            "version": _STATE_VERSION,
            "seed": self._base_seed,
            "buffer_size": self.buffer_size,
            "num_shards": self.num_shards,
            "shard_index": self.shard_index,
            "file_size": self.path.stat().st_size,
            "next_epoch": self._epoch,
            "position": dict(position) if position is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next ``iter()`` continues the saved
        epoch from the saved sample, or starts the saved next epoch.

        Raises:
            ValueError: as :meth:`restore`.
        """
        position = self.restore(state)
        if self._live is not None:
            self._live.close()
            self._live = None
        self._pending = position

    def restore(self, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """Check ``state`` (a :meth:`state_dict` or :meth:`state_at`), restore what
        all readers share (the seed, the epoch counter) and return its position, for
        :meth:`iterate_from`; the next plain ``iter()`` is not changed (see
        :meth:`load_state_dict` for that).

        Raises:
            ValueError: the state is not a JsonlDataset state, or it was taken with
                another ``seed`` (an explicit one), ``buffer_size``, ``num_shards``
                or ``shard_index``, or the file's size changed since.
        """
        version = state.get("version") if isinstance(state, Mapping) else None
        if isinstance(version, bool) or version not in _STATE_VERSIONS:
            raise ValueError(
                "Not a JsonlDataset state (a dict from JsonlDataset.state_dict(), "
                f"version {' or '.join(map(str, _STATE_VERSIONS))}): {state!r:.120}."
            )
        for key in ("buffer_size", "num_shards", "shard_index"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"The saved JsonlDataset state was taken with {key}="
                    f"{state.get(key)!r}, this dataset has {key}="
                    f"{getattr(self, key)!r}: the order would differ. Build the "
                    "dataset as it was when the state was saved."
                )
        if self.seed is not None and state.get("seed") != self.seed:
            raise ValueError(
                f"The saved JsonlDataset state was taken with seed="
                f"{state.get('seed')!r}, this dataset has seed={self.seed!r}: build "
                "it with the saved seed (or seed=None to adopt it)."
            )
        size = self.path.stat().st_size
        if state.get("file_size") != size:
            raise ValueError(
                f"{self.path} changed since the JsonlDataset state was saved (it had "
                f"{state.get('file_size')!r} bytes, it has {size}): the saved "
                "position cannot be trusted."
            )
        position = state.get("position")
        next_epoch = state.get("next_epoch")
        if isinstance(next_epoch, bool) or not isinstance(next_epoch, int):
            raise ValueError(f"Invalid JsonlDataset state: next_epoch={next_epoch!r}.")
        # the position's epoch was started before the state was taken (the last
        # one with a single reader; any earlier one with several)
        epoch = position.get("epoch") if isinstance(position, Mapping) else None
        if position is not None and not (
            isinstance(epoch, int)
            and not isinstance(epoch, bool)
            and 0 <= epoch < next_epoch
            and all(isinstance(position.get(k), int) for k in ("offset", "line", "row"))
            and _valid_buffer(position.get("buffer"))
        ):
            raise ValueError(f"Invalid JsonlDataset position: {position!r:.200}.")
        self._base_seed = int(state["seed"])
        self._epoch = next_epoch
        return dict(position) if position is not None else None

    def __repr__(self) -> str:
        shard = (
            f", shard {self.shard_index} of {self.num_shards}"
            if self.num_shards > 1
            else ""
        )
        return (
            f"JsonlDataset({str(self.path)!r}, input={list(self.input)}, "
            f"target={list(self.target)}, buffer_size={self.buffer_size}{shard})"
        )


class _JsonlIterator(Iterator[Any]):
    """One epoch of a :class:`JsonlDataset`; its state changes only between
    samples, so :meth:`position` is always a point where a resume can start."""

    def __init__(
        self, dataset: JsonlDataset, epoch: int, position: Mapping[str, Any] | None
    ) -> None:
        self.dataset = dataset
        self.epoch = epoch
        self.finished = False
        self._file: IO[bytes] | None = None
        self._rng = random.Random(f"afnio-jsonl:{dataset._base_seed}:{epoch}")
        self._buffer: list[_Entry] = []
        # the row number (0-based, among the file's non-blank lines) of the last
        # sample yielded; None only for a buffered row of a format-1 state whose
        # row number cannot be told (see _restored_row)
        self.last_row: int | None = None
        self._rows: dict[int, int] = {}  # line -> row of the rows read or buffered
        if position is None:
            self._offset = self._line = self._row = 0
            self._eof = False
        else:
            self._offset = int(position["offset"])
            self._line = int(position["line"])
            self._row = int(position["row"])
            self._eof = bool(position.get("eof", False))
            self._rng.setstate(_rng_from_json(position["rng"]))
            for saved in position["buffer"]:
                line, text = int(saved[0]), saved[1]
                self._buffer.append(dataset._parse(text.encode("utf-8"), line))
                row = self._restored_row(saved)
                if row is not None:
                    self._rows[line] = row

    def _restored_row(self, saved: Sequence[Any]) -> int | None:
        """The row number of a saved buffer entry: the one stored with it (format
        2); for a format-1 entry (``[line, text]``), ``line - 1`` when no blank line
        came before the saved position (its line and row counters are equal, so
        every line read so far is a row), else None (unknown)."""
        if len(saved) > 2:
            return None if saved[2] is None else int(saved[2])
        if self._line == self._row:
            return int(saved[0]) - 1
        return None

    def position(self) -> dict[str, Any] | None:
        """Where the next sample comes from (see :meth:`JsonlDataset.state_dict`);
        None once the epoch is over (the reader stands between epochs)."""
        if self.finished:
            return None
        return {
            "epoch": self.epoch,
            "offset": self._offset,
            "line": self._line,
            "row": self._row,
            "eof": self._eof,
            "buffer": [
                [line, text, self._rows.get(line)] for line, text, _ in self._buffer
            ],
            "rng": _rng_to_json(self._rng),
        }

    def close(self) -> None:
        """Close the file (the epoch cannot continue)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self) -> _Entry | None:
        """The next row of this shard, checked; None at the end of the file."""
        ds = self.dataset
        if self._eof:
            return None
        if self._file is None:
            self._file = open(ds.path, "rb")  # noqa: SIM115 (kept open for the epoch)
            self._file.seek(self._offset)
        while True:
            raw = self._file.readline()
            if not raw:
                self._eof = True
                self.close()
                return None
            line = self._line + 1
            if not raw.strip():
                self._offset += len(raw)
                self._line = line
                continue
            row_index = self._row
            if ds._mine(row_index):
                entry = ds._parse(raw, line)  # raises before the counters move
            self._offset += len(raw)
            self._line = line
            self._row = row_index + 1
            if ds._mine(row_index):
                self._rows[line] = row_index
                return entry

    def __next__(self) -> Any:
        if self.finished:
            raise StopIteration
        ds = self.dataset
        if ds.buffer_size <= 1:
            entry = self._read()
        else:
            while len(self._buffer) < ds.buffer_size:
                fresh = self._read()
                if fresh is None:
                    break
                self._buffer.append(fresh)
            entry = None
            if self._buffer:
                j = self._rng.randrange(len(self._buffer))
                self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
                entry = self._buffer.pop()
        if entry is None:
            self.finished = True
            self.close()
            raise StopIteration
        sample = ds._sample(entry)
        self.last_row = self._rows.pop(entry[0], None)
        return sample

    def __del__(self) -> None:
        self.close()
