"""Sample provenance of textual gradients: which samples of a batch each feedback
text is about.

A backward pass writes feedback texts (the ``data`` items of gradient Variables);
the functions that write them also record, per data item, the **in-batch positions**
(0-based) of the samples the text is about, and, when one LM call covered a group of
samples (an evaluator with ``samples_per_call > 1``), the positions of that whole
group. :func:`feedback_items` reads them back for a parameter, one
:class:`FeedbackItem` per non-empty feedback text, in the order of ``param.grad``.

Where the sources come from:

* evaluators (:mod:`afnio.autodiff.evaluator`): the feedback on sample ``s`` of the
  prediction is about ``(s,)``; its ``call_samples`` is the group of the backward
  call that wrote it when that call covered more than one sample;
* :class:`~afnio.autodiff.lm_ops.ChatCompletion`: one backward call per sample, so
  the feedback it writes for sample ``s`` (kept for a shared system prompt too) is
  about ``(s,)``;
* the backward engine: gradients combined for one output keep each text's sources;
  a gradient aligned with a batched Variable (one item per sample) that records
  nothing is about ``(s,)`` for its item ``s``; a gradient that records nothing,
  returned by a node whose incoming feedback was a single text with known sources,
  is about those sources.

The basis of the positions. Positions are numbered within the batched Variable the
recording Function ran on, which need not be the batch the data loader yielded (a
``training_step`` may score a subset, a reordering or an expansion of it). So each
text also records its **basis**: for each candidate Variable its positions index
into, the id of its data list and a short fingerprint (:func:`fingerprint`) of each
of its data items, in order (the evaluator: its targets and its per-sample inputs;
ChatCompletion: its batched inputs and messages, plus the basis of the incoming
per-sample feedback). A reader (the :class:`~afnio.trainer.Trainer`) maps positions
to the loader's batch only when the basis matches a column of that batch for
certain (:func:`match_positions`: the column itself, or a subset/reordering of
unique items); otherwise the samples are unknown. ``FeedbackItem.basis`` holds it
(``None``: unknown).

It is best effort: a gradient from a path that records nothing (a user-defined
Function, the basic operations, a gradient passed to ``.backward()`` by hand, an
unbatched call) gives ``samples=None``. Sources are private attributes of the
gradient Variable: they are never saved by ``afnio.save`` or a ``state_dict``, are not
copied by ``copy.deepcopy``, and are dropped as soon as the gradient's ``data`` is
reassigned (``grad.data = ...``) or its number of items changes.

Example::

    >>> import afnio
    >>> from afnio.autodiff.provenance import feedback_items, set_sources
    >>> param = afnio.Variable("Be brief.", role="system prompt", requires_grad=True)
    >>> grad = afnio.Variable(["Say why.", "", "Be polite."], role="feedback")
    >>> set_sources(grad, [(0,), (1,), (2, 3)], call_samples=[None, None, (2, 3)])
    >>> param.append_grad(grad)
    >>> [(i.text, i.samples, i.call_samples) for i in feedback_items(param)]
    [('Say why.', (0,), None), ('Be polite.', (2, 3), (2, 3))]
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from afnio._variable import Variable

__all__ = [
    "FeedbackItem",
    "basis_of",
    "bases_of",
    "feedback_items",
    "fingerprint",
    "match_positions",
    "set_sources",
    "sources_of",
]

Source = tuple[int, ...] | None
# the candidate columns positions index into: per column, one fingerprint per item
Basis = tuple[tuple[str, ...], ...] | None

_ATTR = "_afnio_sources"


@dataclass(frozen=True)
class FeedbackItem:
    """One non-empty feedback text of a parameter's gradients and its samples.

    Attributes:
        text: the feedback text (stripped of surrounding whitespace, as the
            optimizer shows it).
        samples: the in-batch positions (0-based, sorted) of the samples this text
            is about; ``None`` when unknown.
        call_samples: the positions covered by the one LM call that wrote the text
            when that call covered several samples (a grouped evaluator call);
            ``None`` for a call about one sample, or when unknown.
        basis: what the positions are numbered in: candidate columns (one
            fingerprint per item of a batched Variable the positions index into);
            ``None`` when unknown (see :func:`match_positions`).

    Example::

        >>> FeedbackItem("Say why.", (0, 2), None).samples
        (0, 2)
    """

    text: str
    samples: tuple[int, ...] | None
    call_samples: tuple[int, ...] | None
    basis: Basis = field(default=None, repr=False, compare=False)


class _Recorded:
    """The sources of one gradient, valid while its ``data`` is the same object."""

    __slots__ = ("bases", "calls", "data", "sources")

    def __init__(
        self,
        data: Any,
        sources: list[Source],
        calls: list[Source],
        bases: list[Basis] | None = None,
    ) -> None:
        self.data = data
        self.sources = sources
        self.calls = calls
        self.bases = bases if bases is not None else [None] * len(sources)


def fingerprint(value: Any) -> str:
    """A short hash (16 hex digits) of ``str(value)``: how a basis names a data item
    without copying its text.

    Example::

        >>> fingerprint("hello") == fingerprint("hello") != fingerprint("hello!")
        True
    """
    text = value if isinstance(value, str) else str(value)
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _column(data: list[Any]) -> tuple[str, ...]:
    """A basis column: ``@<id of the list>`` (the object, which tells an unchanged
    batch column from an equal copy) then one fingerprint per item."""
    return (f"@{id(data):x}", *(fingerprint(item) for item in data))


def basis_of(*columns: Any) -> Basis:
    """The basis of positions numbered within each of ``columns`` (lists of data
    items, or Variables with list data; anything else is skipped): per distinct
    column, a tuple of its list object's id (``"@..."``) and one fingerprint per
    item; ``None`` when there is none.

    Example::

        >>> items = ["a", "b"]
        >>> basis = basis_of(items, "not a column")
        >>> basis == ((f"@{id(items):x}", fingerprint("a"), fingerprint("b")),)
        True
    """
    found: list[tuple[str, ...]] = []
    for column in columns:
        data = column.data if isinstance(column, Variable) else column
        if not isinstance(data, list) or not data:
            continue
        prints = _column(data)
        if prints not in found:
            found.append(prints)
    return tuple(found) if found else None


def _split(column: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    """A basis column as (its object marker or None, its fingerprints)."""
    column = tuple(column)
    if column and column[0].startswith("@"):
        return column[0], column[1:]
    return None, column


def _join_bases(*bases: Basis) -> Basis:
    """All candidate columns of several bases (of the same numbering)."""
    found: list[tuple[str, ...]] = []
    for basis in bases:
        for column in basis or ():
            if column not in found:
                found.append(column)
    return tuple(found) if found else None


def match_positions(
    positions: Sequence[int] | None,
    basis: Basis,
    columns: Sequence[Sequence[str]],
) -> list[int] | None:
    """``positions`` (numbered in ``basis``) as positions in a batch whose columns
    are ``columns`` (as :func:`basis_of` builds them), or ``None`` when that is not
    certain.

    A candidate column of ``basis`` maps its positions when it **is** one of
    ``columns`` (the same list object, unchanged: identity), or when each of its
    fingerprints is unique and found exactly once in one of ``columns`` (a subset
    or a reordering, matched by value). Identity is proof and wins; a match by
    value counts only when no candidate of unique items holds a text the batch
    lacks (derived per-sample texts beside other rows' texts prove nothing).
    An equal copy holding repeated values (labels) proves nothing and maps
    nothing. Every mapping kept must agree, and every position must be inside the
    basis; else (no basis, no match, mappings that disagree, duplicated items) the
    answer is ``None``: a wrong attribution is worse than an unknown one.

    Example::

        >>> batch = ["a", "b", "c"]
        >>> cols = basis_of(batch)
        >>> match_positions([0, 1], basis_of(["c", "a"]), cols)
        [2, 0]
        >>> match_positions([2], basis_of(batch), cols)
        [2]
        >>> match_positions([0], basis_of(["a", "a"]), cols) is None
        True
    """
    if positions is None or not basis:
        return None
    identity: set[tuple[int, ...]] = set()
    by_value: set[tuple[int, ...]] = set()
    everywhere = {v for column in columns for v in _split(column)[1]}
    unproven = False  # a candidate of unique items the batch does not hold
    for cand in basis:
        marker, prints = _split(cand)
        unique = len(set(prints)) == len(prints)
        if unique and not all(v in everywhere for v in prints):
            unproven = True
        for column in columns:
            col_marker, col_prints = _split(column)
            if marker is not None and marker == col_marker and prints == col_prints:
                identity.add(tuple(range(len(prints))))
                continue
            if not unique:
                continue
            counts = Counter(col_prints)
            if all(counts.get(v) == 1 for v in prints):
                where = {v: i for i, v in enumerate(col_prints)}
                by_value.add(tuple(where[v] for v in prints))
    # identity is proof; a match by value only counts when no candidate of unique
    # items holds texts the batch lacks (a reformatted message beside a column of
    # other rows' texts leaves the numbering unproven)
    mappings = identity or (set() if unproven else by_value)
    if len(mappings) != 1:
        return None
    (mapping,) = mappings
    out: list[int] = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < len(mapping):
            return None
        out.append(mapping[p])
    return out


def _items(data: Any) -> list[Any]:
    return list(data) if isinstance(data, list) else [data]


def _check_source(value: Any, argument: str, i: int) -> Source:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"`{argument}[{i}]` must be a tuple of sample positions (ints >= 0) or "
            f"None, got {value!r}."
        )
    positions = tuple(value)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise TypeError(
                f"`{argument}[{i}]` must hold sample positions (ints >= 0), got "
                f"{value!r}."
            )
    return tuple(sorted(set(positions)))


def set_sources(
    grad: Variable,
    sources: Sequence[Source],
    call_samples: Sequence[Source] | None = None,
    basis: Basis = None,
) -> None:
    """Record which samples each data item of the gradient ``grad`` is about.

    Args:
        grad: a gradient Variable (feedback texts).
        sources: one entry per data item of ``grad`` (one for scalar data): the
            in-batch positions of the samples that item is about, or ``None`` when
            unknown.
        call_samples: one entry per data item: the positions covered by the LM call
            that wrote it when it covered several samples, else ``None``. Omitted:
            all ``None``.
        basis: what every item's positions are numbered in (see
            :func:`basis_of`); ``None``: unknown, and a reader such as the Trainer
            then cannot map them to its batch.

    Raises:
        TypeError: ``grad`` is not a Variable, or an entry is not a tuple of ints
            >= 0 (or None).
        ValueError: ``sources`` or ``call_samples`` does not have one entry per data
            item of ``grad``.

    Example::

        >>> g = Variable(["a", "", "b"], role="feedback")
        >>> set_sources(g, [(0,), None, (3, 2)], call_samples=[None, None, (2, 3)])
        >>> sources_of(g)
        [(0,), None, (2, 3)]
    """
    if not isinstance(grad, Variable):
        raise TypeError(f"`grad` must be a Variable, got {type(grad).__name__}.")
    n = len(_items(grad.data))
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
        raise TypeError(
            "`sources` must be a list with one entry per data item of `grad`, got "
            f"{type(sources).__name__}."
        )
    if len(sources) != n:
        raise ValueError(
            f"`sources` has {len(sources)} entries but `grad` has {n} data items: "
            "pass one entry (a tuple of positions, or None) per item."
        )
    checked = [_check_source(s, "sources", i) for i, s in enumerate(sources)]
    if call_samples is None:
        calls: list[Source] = [None] * n
    else:
        if len(call_samples) != n:
            raise ValueError(
                f"`call_samples` has {len(call_samples)} entries but `grad` has {n} "
                "data items: pass one entry (a tuple of positions, or None) per item."
            )
        calls = [
            _check_source(c, "call_samples", i) for i, c in enumerate(call_samples)
        ]
    _check_basis(basis)
    setattr(grad, _ATTR, _Recorded(grad.data, checked, calls, [basis] * n))


def _check_basis(basis: Any) -> None:
    if basis is None:
        return
    if not isinstance(basis, tuple) or not all(
        isinstance(col, tuple) and all(isinstance(v, str) for v in col) for col in basis
    ):
        raise TypeError(
            "`basis` must be None or a tuple of columns (tuples of fingerprint "
            f"strings), as basis_of() returns; got {type(basis).__name__}."
        )


def _set_recorded(
    grad: Variable,
    sources: Sequence[Source],
    calls: Sequence[Source] | None,
    bases: Sequence[Basis],
) -> None:
    """:func:`set_sources` with one basis per item (internal: merged gradients)."""
    set_sources(grad, sources, calls)
    rec = _recorded(grad)
    assert rec is not None and len(bases) == len(rec.sources)
    rec.bases = list(bases)


def _recorded(grad: Any) -> _Recorded | None:
    """The recorded sources of ``grad`` if they still describe its data."""
    rec = getattr(grad, _ATTR, None)
    if not isinstance(rec, _Recorded) or not isinstance(grad, Variable):
        return None
    data = grad.data
    if rec.data is not data or len(_items(data)) != len(rec.sources):
        return None  # data reassigned or resized since: the sources are stale
    return rec


def _has_sources(grad: Any) -> bool:
    return _recorded(grad) is not None


def sources_of(grad: Variable) -> list[Source]:
    """The recorded sources of each data item of ``grad`` (``None`` where unknown,
    all ``None`` when nothing was recorded).

    Example::

        >>> g = Variable("Say why.", role="feedback")
        >>> sources_of(g)
        [None]
        >>> set_sources(g, [(4,)])
        >>> sources_of(g)
        [(4,)]
    """
    rec = _recorded(grad)
    if rec is None:
        return [None] * len(_items(grad.data))
    return list(rec.sources)


def _call_samples_of(grad: Variable) -> list[Source]:
    rec = _recorded(grad)
    if rec is None:
        return [None] * len(_items(grad.data))
    return list(rec.calls)


def bases_of(grad: Variable) -> list[Basis]:
    """The recorded basis of each data item of ``grad`` (``None`` where unknown)."""
    rec = _recorded(grad)
    if rec is None:
        return [None] * len(_items(grad.data))
    return list(rec.bases)


def _union(sources: Iterable[Source]) -> Source:
    """The union of several sources; ``None`` if any is unknown or there is none."""
    out: set[int] = set()
    seen = False
    for s in sources:
        if s is None:
            return None
        out.update(s)
        seen = True
    return tuple(sorted(out)) if seen else None


def _merged_source(grad: Variable) -> Source:
    """The samples all non-empty texts of ``grad`` together are about (``None`` if
    one of them is unknown, or nothing was recorded)."""
    rec = _recorded(grad)
    if rec is None:
        return None
    return _union(
        src
        for item, src in zip(_items(grad.data), rec.sources, strict=True)
        if item != ""
    )


def _common_basis(bases: Iterable[Basis]) -> Basis:
    """The basis shared by all of ``bases`` (``None`` if they differ, one is
    unknown, or there is none): positions of different numberings never mix."""
    found: Basis = None
    seen = False
    for basis in bases:
        if basis is None or (seen and basis != found):
            return None
        found, seen = basis, True
    return found


def _merged_basis(grad: Variable) -> Basis:
    """The basis shared by all non-empty texts of ``grad`` (see
    :func:`_merged_source`)."""
    rec = _recorded(grad)
    if rec is None:
        return None
    return _common_basis(
        b for item, b in zip(_items(grad.data), rec.bases, strict=True) if item != ""
    )


def _grads_of(param: Any) -> list[Variable]:
    if isinstance(param, Variable):
        return list(param.grad)
    if isinstance(param, Iterable) and not isinstance(param, (str, bytes)):
        grads = list(param)
        for i, g in enumerate(grads):
            if not isinstance(g, Variable):
                raise TypeError(
                    f"`param` as a list must hold gradient Variables; element {i} is a "
                    f"{type(g).__name__}."
                )
        return grads
    raise TypeError(
        "`param` must be a Variable (its .grad is read) or a list of gradient "
        f"Variables, got {type(param).__name__}."
    )


def feedback_items(param: Variable | Iterable[Variable]) -> list[FeedbackItem]:
    """Every non-empty feedback text of ``param.grad`` (all gradient Variables, every
    data item, in order) with the samples it is about.

    The texts are stripped and empty ones skipped, exactly as the optimizer counts
    them (:func:`afnio.optim.tgd.render_feedback`): the list has one entry per
    feedback the optimizer received.

    Args:
        param: a leaf Variable (a Parameter) whose ``.grad`` is read, or a list of
            gradient Variables.

    Raises:
        TypeError: ``param`` is neither.

    Example::

        >>> p = Variable("Be brief.", role="prompt", requires_grad=True)
        >>> p.append_grad(Variable("Say why.", role="feedback"))
        >>> feedback_items(p)
        [FeedbackItem(text='Say why.', samples=None, call_samples=None)]
    """
    out: list[FeedbackItem] = []
    for grad in _grads_of(param):
        items = _items(grad.data)
        sources = sources_of(grad)
        calls = _call_samples_of(grad)
        bases = bases_of(grad)
        for item, src, call, basis in zip(items, sources, calls, bases, strict=True):
            text = str(item).strip()
            if text:
                out.append(FeedbackItem(text, src, call, basis))
    return out
