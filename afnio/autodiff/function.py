"""Custom differentiable operations: :class:`Function` and its ``ctx``.

A Function is written like a PyTorch ``autograd.Function``: static methods only, called
through :meth:`Function.apply`. ``forward`` computes the output Variables from the
inputs; ``backward`` receives one gradient per output and returns one gradient per
input (``None`` where there is none). Either method may be ``async def``; LM-backed
operations are, so that the engine can run them concurrently.

Inputs and gradient slots. The inputs are the forward's arguments in signature order
(defaults applied, ``*args`` expanded, ``**kwargs`` as one trailing dict). A Variable
argument is one *slot*; a list, tuple or dict argument that holds Variables is one
slot **per Variable inside**, flattened in order (list items in order, dict values in
key order, recursively); any other argument is one slot. ``backward`` returns one
value per slot (extra trailing ``None`` values are ignored), ``ctx.needs_input_grad``
has one bool per slot, and ``next_functions`` has one edge per Variable slot.

Example (usage 1, forward takes ``ctx``)::

    >>> import afnio
    >>> from afnio.autodiff import Function
    >>> class Shout(Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         ctx.save_for_backward(x)
    ...         return afnio.Variable(x.data.upper(), role=f"shouted {x.role}")
    ...     @staticmethod
    ...     def backward(ctx, grad_output):
    ...         (x,) = ctx.saved_variables
    ...         return afnio.Variable(f"(before shouting) {grad_output.data}",
    ...                               role=f"feedback to {x.role}")
    >>> x = afnio.Variable("hi", role="greeting", requires_grad=True)
    >>> y = Shout.apply(x)
    >>> y.data, y.grad_fn.name()
    ('HI', 'ShoutBackward0')
    >>> y.backward(afnio.Variable("too loud"))
    >>> x.grad[0].data
    '(before shouting) too loud'

Example (usage 2, separate ``setup_context``)::

    >>> class Echo(Function):
    ...     @staticmethod
    ...     def forward(x):
    ...         return afnio.Variable(x.data, role=x.role)
    ...     @staticmethod
    ...     def setup_context(ctx, inputs, output):
    ...         ctx.role = inputs[0].role
    ...     @staticmethod
    ...     def backward(ctx, grad_output):
    ...         return grad_output
"""

from __future__ import annotations

import contextvars
import inspect
import weakref
from collections.abc import Iterator
from typing import Any, ClassVar

from afnio._runtime import run_async, run_sync
from afnio._variable import Variable
from afnio.autodiff.grad_mode import _grad_enabled
from afnio.autodiff.graph import GradientEdge, Node

__all__ = ["BackwardFunction", "Function", "FunctionCtx"]


class FunctionCtx:
    """The ``ctx`` passed to ``forward``/``setup_context`` and ``backward``.

    Store non-Variable state as plain attributes (``ctx.purpose = ...``); use
    :meth:`save_for_backward` for values that the graph should free after a backward
    pass without ``retain_graph``.
    """

    _saved: tuple[Any, ...] | None
    _freed: bool
    _materialize_grads: bool
    needs_input_grad: tuple[bool, ...]

    def save_for_backward(self, *objs: Any) -> None:
        """Save values for ``backward``. Call it at most once, in ``forward`` (usage
        1) or ``setup_context`` (usage 2). Any objects may be saved, not only
        Variables; they come back in the same order from :attr:`saved_variables`.

        Example::

            >>> def forward(ctx, x, purpose):
            ...     ctx.save_for_backward(x, purpose)
        """
        self._saved = objs

    @property
    def saved_variables(self) -> tuple[Any, ...]:
        """The values given to :meth:`save_for_backward`, in order.

        Raises:
            RuntimeError: after the graph was freed by a backward pass that did not
                set ``retain_graph=True``.
        """
        if self._freed:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or to access "
                "saved variables after they have been freed). Saved values are freed "
                "when you call .backward(); pass retain_graph=True to the first "
                ".backward() call if you need to backward through the graph again."
            )
        return self._saved or ()

    def set_materialize_grads(self, value: bool) -> None:
        """Whether outputs that received no gradient get an empty-feedback Variable
        (``""``, the default) or ``None`` in ``backward``. Call it in ``forward`` or
        ``setup_context``."""
        self._materialize_grads = bool(value)


# (node, needs) set by the engine, in the context of one backward call that an
# ``inputs=`` restriction narrows; never stored on the node (passes may overlap)
_needs_override: contextvars.ContextVar[tuple[Any, tuple[bool, ...]] | None] = (
    contextvars.ContextVar("afnio_needs_override", default=None)
)


class BackwardFunction(Node, FunctionCtx):
    """The node (and ``ctx``) of one call of a :class:`Function`; one subclass per
    Function, named ``<Function>Backward0``."""

    _forward_cls: ClassVar[type[Function]]

    def __init__(self) -> None:
        Node.__init__(self)
        self._saved = None
        self._freed = False
        self._materialize_grads = True
        self._needs_input_grad: tuple[bool, ...] = ()
        # slot index -> index into next_functions (None for non-Variable slots)
        self._slot_edges: tuple[int | None, ...] = ()
        # per output: (role, batch length or None for a scalar output)
        self._output_meta: tuple[tuple[str, int | None], ...] = ()
        # output_nr -> Variable that asked for retain_grad()
        self._retained: dict[int, Any] = {}
        # backward passes running through this node: n > 0 retaining ones, -1 a
        # freeing one (claimed on afnio's loop, so passes cannot race)
        self._passes = 0

    @property  # type: ignore[override]
    def needs_input_grad(self) -> tuple[bool, ...]:
        """One bool per input slot: whether ``backward`` must compute that gradient
        (narrowed during a pass with ``inputs=`` to the slots that lead to them)."""
        override = _needs_override.get()
        if override is not None and override[0] is self:
            return override[1]
        return self._needs_input_grad

    @needs_input_grad.setter
    def needs_input_grad(self, value: tuple[bool, ...]) -> None:
        self._needs_input_grad = tuple(value)

    def apply(self, *grad_outputs: Any) -> Any:
        """Call the Function's ``backward`` with this node as ``ctx``."""
        return self._forward_cls.backward(self, *grad_outputs)

    def _free(self) -> None:
        self._saved = None
        self._freed = True


_SIGNATURES: weakref.WeakKeyDictionary[type, tuple[inspect.Signature, int]] = (
    weakref.WeakKeyDictionary()
)


def _iter_variables(obj: Any) -> Iterator[Variable]:
    if isinstance(obj, Variable):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _iter_variables(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _iter_variables(item)


def _flatten_slots(inputs: tuple[Any, ...]) -> list[Any]:
    """One entry per gradient slot: Variables (also inside containers) or the
    non-Variable argument itself."""
    slots: list[Any] = []
    for arg in inputs:
        if isinstance(arg, (list, tuple, dict)):
            found = list(_iter_variables(arg))
            slots.extend(found if found else [arg])
        else:
            slots.append(arg)
    return slots


def _edge_for(v: Variable) -> GradientEdge:
    if not v.requires_grad:
        return GradientEdge(None, 0)
    if v.grad_fn is not None:
        return GradientEdge(v.grad_fn, v.output_nr)
    return GradientEdge(v._get_grad_accumulator(), 0)


class Function:
    """Base class of differentiable operations (see the module docstring).

    Subclasses implement the static methods :meth:`forward` and :meth:`backward`
    (and optionally :meth:`setup_context`) and are used through :meth:`apply`; they
    are never instantiated.

    Class attributes:
        blocking: whether a plain (non-``async``) ``backward`` blocks: waits on
            I/O (a synchronous LM, HTTP or database call), sleeps, or waits on other
            threads. ``True``: every call runs in a worker thread, so it may block
            without stalling anything, and such nodes still run concurrently (up to
            :func:`afnio.set_max_concurrency`). ``None`` (the default) and
            ``False``: ``backward`` is called directly on afnio's event loop, which
            costs a few microseconds per node instead of a thread hop; so it must not
            block. With ``None``, the first call of each Function runs in a worker
            thread, and if it makes a synchronous afnio call (``model.chat()``, a
            nested ``.backward()``), itself or from threads it waits on, the
            Function is treated as ``blocking = True`` from then on. On the loop, a
            synchronous afnio call never deadlocks: afnio stops that call before it
            is sent, re-runs the whole ``backward`` of that node in a worker thread
            (code before the call runs twice), treats the Function as blocking from
            then on and logs a warning on the ``afnio.autodiff`` logger; set
            ``blocking = True`` to avoid it. A backward on the loop that waits for
            another thread's afnio call (a thread pool running ``model.chat``) does
            not deadlock either: once that call has waited
            ``afnio._runtime.STALL_WARNING_S`` (10 s) for the loop the backward
            holds, it raises a ``RuntimeError`` naming ``blocking = True`` before
            anything is sent, and afnio re-runs the backward in a worker thread.
            Blocking code that does not go through afnio (``time.sleep``, a raw
            HTTP client) is not detected: declare it.
            ``async def backward`` always runs on the loop and ignores it. A plain
            ``forward`` always runs in the caller's thread.
        run_backward_inline: deprecated, use ``blocking``. ``True`` is the same as
            ``blocking = False``; ``False`` the same as ``blocking = True``.

    Example (a ``backward`` that calls an LM synchronously)::

        >>> import time
        >>> import afnio
        >>> class Review(Function):
        ...     blocking = True  # backward waits on I/O: run it in a worker thread
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         return afnio.Variable(x.data, role=f"reviewed {x.role}")
        ...     @staticmethod
        ...     def backward(ctx, grad_output):
        ...         time.sleep(0.01)  # stands for model.chat([...]), a blocking call
        ...         return afnio.Variable(f"review: {grad_output.data}",
        ...                               role="feedback")
        >>> x = afnio.Variable("draft", role="text", requires_grad=True)
        >>> Review.apply(x).backward(afnio.Variable("too long"))
        >>> x.grad[0].data
        'review: too long'
    """

    _is_evaluator: ClassVar[bool] = False
    _backward_cls: ClassVar[type[BackwardFunction]]
    blocking: ClassVar[bool | None] = None
    run_backward_inline: ClassVar[bool | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._backward_cls = type(
            f"{cls.__name__}Backward0",
            (BackwardFunction,),
            {"_forward_cls": cls, "__module__": "afnio.autodiff.function"},
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{type(self).__name__} is a Function and is not instantiated: call "
            f"{type(self).__name__}.apply(...) instead, with static forward() and "
            "backward() methods."
        )

    @staticmethod
    def forward(*args: Any, **kwargs: Any) -> Any:
        """Compute the output Variable(s). Usage 1: ``forward(ctx, *args)``.
        Usage 2: ``forward(*args)`` plus :meth:`setup_context`. It runs with grad
        mode off; it may be ``async def``."""
        raise NotImplementedError(  # abstract: subclasses implement forward
            "You must implement the forward function for a custom afnio Function."
        )

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: Any) -> None:
        """Usage 2 only: fill ``ctx`` from the ``inputs`` tuple and ``output``."""
        raise NotImplementedError("setup_context is not implemented.")  # abstract

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        """Given one gradient per output (a Variable, or ``None`` where no gradient
        arrived and ``ctx.set_materialize_grads(False)`` was called), return one
        gradient Variable or ``None`` per input slot. May be ``async def``."""
        raise NotImplementedError(  # abstract: subclasses implement backward
            "You must implement the backward function for a custom afnio Function."
        )

    # -- apply -------------------------------------------------------------------

    @classmethod
    def _uses_setup_context(cls) -> bool:
        return cls.setup_context is not Function.setup_context

    @classmethod
    def _signature(cls) -> tuple[inspect.Signature, int]:
        cached = _SIGNATURES.get(cls)
        if cached is None:
            sig = inspect.signature(cls.forward)
            params = list(sig.parameters.values())
            if (
                not cls._uses_setup_context()
                and params
                and params[0].kind is not inspect.Parameter.VAR_POSITIONAL
            ):
                params = params[1:]  # drop ctx
            sig = sig.replace(parameters=params)
            simple = all(
                p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params
            )
            cached = (sig, len(params) if simple else -1)
            _SIGNATURES[cls] = cached
        return cached

    @classmethod
    def _canonical_inputs(
        cls, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...]:
        sig, n_simple = cls._signature()
        if not kwargs and n_simple == len(args):
            return args
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{cls.__name__}.apply(): {e}") from None
        bound.apply_defaults()
        inputs: list[Any] = []
        for name, p in sig.parameters.items():
            value = bound.arguments[name]
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                inputs.extend(value)
            else:
                inputs.append(value)
        return tuple(inputs)

    @classmethod
    def _prepare(
        cls, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[BackwardFunction, tuple[Any, ...], list[Any], bool]:
        inputs = cls._canonical_inputs(args, kwargs)
        slots = _flatten_slots(inputs)
        needs = tuple(isinstance(s, Variable) and s.requires_grad for s in slots)
        node = cls._backward_cls()
        node.needs_input_grad = needs
        record = _grad_enabled.get() and any(needs)
        return node, inputs, slots, record

    @classmethod
    def _finish(
        cls,
        node: BackwardFunction,
        inputs: tuple[Any, ...],
        slots: list[Any],
        record: bool,
        output: Any,
    ) -> Any:
        if cls._uses_setup_context():
            cls.setup_context(node, inputs, output)
        is_tuple = isinstance(output, (tuple, list))
        outputs = tuple(output) if is_tuple else (output,)
        for i, out in enumerate(outputs):
            if not isinstance(out, Variable):
                where = f"output {i}" if is_tuple else "its output"
                raise TypeError(
                    f"{cls.__name__}.forward must return a Variable or a tuple of "
                    f"Variables, but {where} is {type(out).__name__}."
                )
        if record:
            input_ids = {id(s) for s in slots if isinstance(s, Variable)}
            fresh = []
            for out in outputs:
                if id(out) in input_ids or out.requires_grad:
                    # never re-wire an input, a leaf that requires grad (a captured
                    # parameter) or a Variable that already belongs to a graph
                    out = Variable(out.data, role=out.role)
                fresh.append(out)
            outputs = tuple(fresh)
            edges: list[GradientEdge] = []
            slot_edges: list[int | None] = []
            for s in slots:
                if isinstance(s, Variable):
                    slot_edges.append(len(edges))
                    edges.append(_edge_for(s))
                else:
                    slot_edges.append(None)
            node._next_functions = tuple(edges)
            node._slot_edges = tuple(slot_edges)
            node._output_meta = tuple(
                (o.role, len(o.data) if isinstance(o.data, list) else None)
                for o in outputs
            )
            for i, out in enumerate(outputs):
                out._set_grad_fn(node, i)
        return outputs if is_tuple else outputs[0]

    @classmethod
    def _call_forward(
        cls, node: BackwardFunction, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if cls._uses_setup_context():
            return cls.forward(*args, **kwargs)
        return cls.forward(node, *args, **kwargs)

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        """Run ``forward`` and, when grad mode is on and any Variable input requires
        grad, record the graph: outputs get ``requires_grad=True``, ``grad_fn`` and
        ``output_nr``.

        Returns:
            A Variable, or a tuple of Variables (a list returned by ``forward`` is
            converted to a tuple).
        """
        if cls is Function:
            raise RuntimeError("Function.apply must be called on a subclass.")
        node, inputs, slots, record = cls._prepare(args, kwargs)
        token = _grad_enabled.set(False)
        try:
            output = cls._call_forward(node, args, kwargs)
            if inspect.isawaitable(output):
                output = run_sync(_await(output))
        finally:
            _grad_enabled.reset(token)
        return cls._finish(node, inputs, slots, record, output)

    @classmethod
    async def aapply(cls, *args: Any, **kwargs: Any) -> Any:
        """Async :meth:`apply`: awaits an ``async def forward`` on afnio's event
        loop without blocking the caller's loop."""
        if cls is Function:
            raise RuntimeError("Function.aapply must be called on a subclass.")
        node, inputs, slots, record = cls._prepare(args, kwargs)
        token = _grad_enabled.set(False)
        try:
            output = cls._call_forward(node, args, kwargs)
            if inspect.isawaitable(output):
                output = await run_async(_await(output))
        finally:
            _grad_enabled.reset(token)
        return cls._finish(node, inputs, slots, record, output)


async def _await(awaitable: Any) -> Any:
    return await awaitable
