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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from afnio._variable import Variable

__all__ = ["FeedbackItem", "feedback_items", "set_sources", "sources_of"]

Source = tuple[int, ...] | None

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

    Example::

        >>> FeedbackItem("Say why.", (0, 2), None).samples
        (0, 2)
    """

    text: str
    samples: tuple[int, ...] | None
    call_samples: tuple[int, ...] | None


class _Recorded:
    """The sources of one gradient, valid while its ``data`` is the same object."""

    __slots__ = ("calls", "data", "sources")

    def __init__(self, data: Any, sources: list[Source], calls: list[Source]) -> None:
        self.data = data
        self.sources = sources
        self.calls = calls


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
    setattr(grad, _ATTR, _Recorded(grad.data, checked, calls))


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


def _copy_sources(src: Variable, dst: Variable) -> None:
    """Give ``dst`` the sources of ``src`` when both have the same number of items
    (a gradient rewritten item by item)."""
    rec = _recorded(src)
    if rec is not None and len(_items(dst.data)) == len(rec.sources):
        set_sources(dst, rec.sources, rec.calls)


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
        for item, src, call in zip(items, sources, calls, strict=True):
            text = str(item).strip()
            if text:
                out.append(FeedbackItem(text, src, call))
    return out
