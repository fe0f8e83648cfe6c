"""``trace(program)``: an afnio Module around a user's DSPy program (left as it is).

The Parameters are each predictor's signature instructions (found with
``named_predictors()``), optionally its output-field descriptions. Calling the traced
program runs the user's program with a :class:`~afnio_integrations.dspy._tracing.
CallCollector` callback and returns a :class:`TracedPrediction` whose fields are
Variables wired into the afnio graph. :meth:`TracedProgram.write_back` puts the
Parameters' texts into the predictors with ``signature.with_instructions(...)``: a new
signature class per predictor, so signature classes shared with other programs are
never mutated.

**Untraced predictors.** A ``Predict`` the program creates at run time (inside
``forward``) was not among ``named_predictors()`` when the program was traced: its
calls are recorded (feedback still flows through them to earlier predictors), but
its instructions have no Parameter, so they get no feedback and are never
optimized. The traced program then emits
:class:`~afnio_integrations.dspy.AfnioTracingWarning`, once per
:class:`TracedProgram` and such predictor (its class, signature and instructions),
naming it and asking to create it in the program's ``__init__``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
from dspy.utils.usage_tracker import UsageTracker

from afnio._runtime import get_max_concurrency
from afnio._variable import Variable
from afnio.cognitive.modules.module import Module
from afnio.cognitive.parameter import Parameter
from afnio_integrations._recorded import StackSamples, StepOutput
from afnio_integrations._usage import ProgramUsage
from afnio_integrations._warnings import AfnioTracingWarning
from afnio_integrations.dspy._module import AfnioModule
from afnio_integrations.dspy._tracing import CallCollector, PredictorSlot, field_text

__all__ = ["ProgramUsage", "TracedPrediction", "TracedProgram", "trace"]

_DEFAULT_DESC = re.compile(r"^\$\{.*\}$")


class _SharedTracker(UsageTracker):
    """DSPy's usage tracker, shared (not copied) by DSPy's parallel executor, which
    deep-copies the settings of each worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedTracker:
        return self

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        with self._lock:
            super().add_usage(lm, usage_entry)


class TracedPrediction(Mapping[str, Variable]):
    """The fields of a traced program's prediction as Variables (``pred.sentiment``,
    ``pred["sentiment"]``), usable by afnio evaluators.

    Attributes:
        prediction: the program's own ``dspy.Prediction`` (a list of them, with
            ``None`` for failed samples, after :meth:`TracedProgram.batch`).
        errors: after ``batch(..., return_exceptions=True)``, the exception of each
            failed sample (else ``None``).
        trace: DSPy's ``(predictor, inputs, prediction)`` trace of the call (one list
            per sample after ``batch``).
    """

    def __init__(
        self,
        fields: dict[str, Variable],
        prediction: Any,
        trace: list[Any],
        errors: list[BaseException | None] | None = None,
    ) -> None:
        self.fields = fields
        self.prediction = prediction
        self.trace = trace
        self.errors = errors or []

    def __getitem__(self, key: str) -> Variable:
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __getattr__(self, name: str) -> Variable:
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(
            f"The prediction has no field {name!r}; its fields are {sorted(fields)}."
        )

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v.data!r}" for k, v in self.fields.items())
        return f"TracedPrediction({inner})"


_PACKAGES = tuple(
    os.path.dirname(module.__file__ or "") + os.sep
    for module in (sys.modules["afnio"], sys.modules["afnio_integrations"])
)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside afnio's packages, for a warning
    issued by the function that calls this one: the user's call site."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGES):
        frame = frame.f_back
        level += 1
    return level


def _parameter_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W+", "_", name).strip("_") or "predictor"
    candidate, k = base, 1
    while candidate in taken:
        k += 1
        candidate = f"{base}_{k}"
    taken.add(candidate)
    return candidate


def _description(info: Any) -> str:
    extra = getattr(info, "json_schema_extra", None) or {}
    desc = str(extra.get("desc", "") or "")
    return "" if _DEFAULT_DESC.match(desc) else desc


class TracedProgram(Module):
    """An afnio Module whose Parameters are the instructions of a DSPy program's
    predictors (see :func:`trace`)."""

    def __init__(self, program: Any, descriptions: bool = False) -> None:
        super().__init__()
        if not isinstance(program, dspy.Module):
            raise TypeError(
                f"`program` must be a dspy.Module (Predict, ChainOfThought or your "
                f"own module), got {type(program).__name__}."
            )
        object.__setattr__(self, "program", program)
        predictors = program.named_predictors()
        afnio_modules = [
            (name, sub.module)
            for name, sub in program.named_sub_modules()
            if isinstance(sub, AfnioModule) and isinstance(sub.module, Module)
        ]
        if not predictors and not afnio_modules:
            raise ValueError(
                "The program has nothing to optimize: it needs at least one "
                "dspy.Predict (ChainOfThought and others hold one) or AfnioModule."
            )
        taken: set[str] = set()
        slots: list[PredictorSlot] = []
        signatures: set[int] = set()
        for name, predictor in predictors:
            if id(predictor.signature) in signatures:  # one class per predictor
                predictor.signature = predictor.signature.with_instructions(
                    predictor.signature.instructions
                )
            signatures.add(id(predictor.signature))
            key = _parameter_name(name, taken)
            param = Parameter(
                predictor.signature.instructions,
                role=f"instructions of the DSPy predictor {name}",
            )
            self.register_parameter(f"{key}_instructions", param)
            described: dict[str, Variable] = {}
            if descriptions:
                for field_name, info in predictor.signature.output_fields.items():
                    desc = Parameter(
                        _description(info),
                        role=f"description of the output field `{field_name}` of "
                        f"the DSPy predictor {name}",
                    )
                    self.register_parameter(f"{key}_{field_name}_description", desc)
                    described[field_name] = desc
            slots.append(PredictorSlot(name, predictor, param, described))
        object.__setattr__(self, "_slots", slots)
        for name, inner in afnio_modules:  # trained with the instructions
            self.register_module(
                _parameter_name(f"afnio_{name.removeprefix('self.')}", taken), inner
            )
        object.__setattr__(self, "_written", self._current_texts())
        object.__setattr__(self, "usage", ProgramUsage("DSPy program LMs"))
        object.__setattr__(self, "_warned", set())
        object.__setattr__(self, "_warn_lock", threading.Lock())

    def extra_repr(self) -> str:
        return ", ".join(slot.name for slot in self._slots)

    # -- texts and write-back ------------------------------------------------------

    def _current_texts(self) -> dict[tuple[str, str], str]:
        texts = {}
        for slot in self._slots:
            signature = slot.predictor.signature
            texts[(slot.name, "")] = signature.instructions
            for field_name in slot.descriptions:
                info = signature.output_fields.get(field_name)
                texts[(slot.name, field_name)] = _description(info) if info else ""
        return texts

    def _parameters_by_key(self) -> dict[tuple[str, str], Variable]:
        out: dict[tuple[str, str], Variable] = {}
        for slot in self._slots:
            out[(slot.name, "")] = slot.instructions
            for field_name, var in slot.descriptions.items():
                out[(slot.name, field_name)] = var
        return out

    def write_back(self) -> None:
        """Put every Parameter's text into its predictor:
        ``predictor.signature = predictor.signature.with_instructions(text)`` (and
        ``with_updated_fields(name, desc=...)`` for descriptions). All texts are
        checked first; nothing changes unless all are valid."""
        params = self._parameters_by_key()
        for (name, field_name), var in params.items():
            if not isinstance(var.data, str) or (
                not field_name and not var.data.strip()
            ):
                what = (
                    f"field `{field_name}` description"
                    if field_name
                    else "instructions"
                )
                raise ValueError(
                    f"The {what} of predictor {name!r} must be a non-empty str, got "
                    f"{var.data!r}."
                )
        for slot in self._slots:
            signature = slot.predictor.signature.with_instructions(
                str(slot.instructions.data)
            )
            for field_name, var in slot.descriptions.items():
                if field_name in signature.output_fields:
                    signature = signature.with_updated_fields(field_name, desc=var.data)
            slot.predictor.signature = signature
            # DSPy reads instructions through inspect.cleandoc: keep the same text
            if slot.instructions.data != signature.instructions:
                slot.instructions.data = signature.instructions
        object.__setattr__(self, "_written", self._current_texts())

    def _sync(self) -> None:
        """Two-way sync before a call: Parameters changed by an optimizer are written
        into the program; a predictor changed by the user since (``program.load``)
        updates its Parameter."""
        params = self._parameters_by_key()
        if any(str(v.data) != self._written.get(k) for k, v in params.items()):
            self.write_back()
            return
        current = self._current_texts()
        for key, text in current.items():
            if text != self._written.get(key):
                params[key].data = text
        object.__setattr__(self, "_written", current)

    def instructions(self) -> dict[str, str]:
        """The current instructions by predictor name."""
        return {slot.name: str(slot.instructions.data) for slot in self._slots}

    @property
    def predictor_names(self) -> list[str]:
        return [slot.name for slot in self._slots]

    # -- calling -------------------------------------------------------------------

    def forward(self, **inputs: Any) -> TracedPrediction:
        """Run the program on ``inputs`` (keyword arguments, as the program takes
        them; a Variable is passed to the program as its text and linked in the
        graph). Returns the prediction's fields as Variables."""
        self._sync()
        prediction, untraced = self._call(inputs)
        self._warn_untraced(untraced)
        return prediction

    async def acall(self, **inputs: Any) -> TracedPrediction:
        """Async :meth:`forward`: runs the program's ``acall`` (its ``aforward``).
        Its LM calls are made on the caller's event loop, so they are not held to
        afnio's request bound (blocking there could deadlock)."""
        self._sync()
        with self._recording(inputs) as (plain, finish):
            result = await self.program.acall(**plain)
            trace = list(dspy.settings.trace or [])
        prediction, untraced = finish(result, trace)
        self._warn_untraced(untraced)
        return prediction

    def _call(
        self, inputs: Mapping[str, Any]
    ) -> tuple[TracedPrediction, dict[tuple[str, ...], str]]:
        """One traced call: the prediction and the untraced predictors it called."""
        with self._recording(inputs) as (plain, finish):
            result = self.program(**plain)
            trace = list(dspy.settings.trace or [])
        return finish(result, trace)

    def _warn_untraced(self, untraced: Mapping[tuple[str, ...], str]) -> None:
        """Warn about each predictor called but not traced (created at run time),
        once per traced program and predictor."""
        for key, name in untraced.items():
            with self._warn_lock:
                if key in self._warned:
                    continue
                self._warned.add(key)
            warnings.warn(
                f"The traced DSPy program called a predictor that was not among its "
                f"predictors when it was traced: {name}. It was created at run time "
                "(e.g. inside forward), so its instructions have no Parameter: they "
                "get no feedback and are never optimized. Create it in the "
                "program's __init__ (self.<name> = dspy.Predict(...)) so that "
                "trace() finds it with named_predictors().",
                AfnioTracingWarning,
                stacklevel=_caller_level(),
            )

    @contextlib.contextmanager
    def _recording(self, inputs: Mapping[str, Any]) -> Iterator[Any]:
        """The DSPy context of one traced call: the collector among the callbacks,
        a fresh trace and a shared usage tracker. Yields ``(plain inputs,
        finish)``; ``finish(result, trace)`` builds the prediction and gives it
        with the untraced predictors the call ran."""
        slots = {id(slot.predictor): slot for slot in self._slots}
        slots.update({id(slot.predictor.signature): slot for slot in self._slots})
        seed = [(str(v.data), v) for v in inputs.values() if isinstance(v, Variable)]
        positions = {
            id(module): k
            for k, (_, module) in enumerate(self.program.named_sub_modules())
        }
        collector = CallCollector(slots, seed, self.usage.count_call, positions)
        plain = {
            k: (v.data if isinstance(v, Variable) else v) for k, v in inputs.items()
        }
        callbacks = [*(dspy.settings.callbacks or []), collector]
        parent = dspy.settings.usage_tracker
        tracker = _SharedTracker()

        def finish(
            result: Any, trace: list[Any]
        ) -> tuple[TracedPrediction, dict[tuple[str, ...], str]]:
            if collector.errors:
                raise collector.errors[0]
            prediction = self._prediction(result, collector, trace)
            return prediction, dict(collector.untraced)

        token = collector.activate()
        try:
            with dspy.context(callbacks=callbacks, trace=[], usage_tracker=tracker):
                yield plain, finish
        finally:
            collector.deactivate(token)
            collector.release_all()
            self.usage.add(tracker.get_total_tokens())
            if parent is not None:  # as DSPy's track_usage rolls up
                for lm, entries in tracker.usage_data.items():
                    parent.usage_data[lm].extend(entries)

    def _prediction(
        self, result: Any, collector: CallCollector, trace: list[Any]
    ) -> TracedPrediction:
        """The program's prediction as Variables, each field linked by value (see
        :mod:`~afnio_integrations.dspy._tracing`): to the one Variable with its text
        (the field is that Variable), else to every equal one, each prediction it is
        composed of, or every prediction no later predictor took."""
        items = dict(result.items()) if hasattr(result, "items") else {"output": result}
        fields: dict[str, Variable] = {}
        for key, value in items.items():
            text = field_text(value)
            role = f"`{key}` field of the program's prediction"
            equal = collector.find(text)
            if len(equal) == 1:
                fields[key] = equal[0]
                continue
            sources = equal or collector.composed_of(text) or collector.frontier()
            fields[key] = (
                StepOutput.apply(sources, text, "program output", role)
                if sources
                else Variable(text, role=role)
            )
        return TracedPrediction(fields, result, trace)

    def batch(
        self,
        inputs: Sequence[Mapping[str, Any]],
        *,
        return_exceptions: bool = False,
    ) -> TracedPrediction:
        """Run the program on every input concurrently (in threads, at most afnio's
        concurrency bound at once; each LM request also holds one of afnio's request
        slots). Returns batched field Variables aligned with ``inputs``.

        With ``return_exceptions=True`` a failing sample does not raise: its fields
        are ``""`` (outside the graph) and its exception is in ``errors``.
        """
        self._sync()
        rows = [
            dict(x.inputs()) if isinstance(x, dspy.Example) else dict(x) for x in inputs
        ]
        if not rows:
            raise ValueError("`inputs` is empty: pass at least one input dict.")
        workers = max(1, min(len(rows), get_max_concurrency()))
        contexts = [contextvars.copy_context() for _ in rows]
        with ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="afnio-dspy"
        ) as pool:
            futures = [
                pool.submit(ctx.run, self._call, row)
                for ctx, row in zip(contexts, rows, strict=True)
            ]
            outcomes: list[TracedPrediction | BaseException] = []
            untraced: dict[tuple[str, ...], str] = {}
            try:
                for future in futures:
                    try:
                        prediction, found = future.result()
                        outcomes.append(prediction)
                        untraced.update(found)
                    except Exception as e:
                        if not return_exceptions:
                            raise
                        outcomes.append(e)
            except BaseException:  # an error or Ctrl-C: start nothing more
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        self._warn_untraced(untraced)
        return _stack(outcomes)


def _stack(outcomes: list[TracedPrediction | BaseException]) -> TracedPrediction:
    names: list[str] = []
    for outcome in outcomes:
        if isinstance(outcome, TracedPrediction):
            names.extend(k for k in outcome.fields if k not in names)
    fields = {}
    for key in names:
        samples = [
            o.fields[key]
            if isinstance(o, TracedPrediction) and key in o.fields
            else Variable("", role=f"`{key}` field (no prediction)")
            for o in outcomes
        ]
        fields[key] = StackSamples.apply(
            samples, f"`{key}` field of the program's prediction"
        )
    return TracedPrediction(
        fields,
        [o.prediction if isinstance(o, TracedPrediction) else None for o in outcomes],
        [o.trace if isinstance(o, TracedPrediction) else [] for o in outcomes],
        [o if isinstance(o, BaseException) else None for o in outcomes],
    )


def trace(program: Any, descriptions: bool = False) -> TracedProgram:
    """Trace a DSPy program: an afnio Module whose Parameters are the instructions of
    each predictor (``program.named_predictors()``), and with ``descriptions=True``
    also their output-field descriptions. The program object itself is used (not a
    copy): :meth:`TracedProgram.write_back` updates its predictors.

    Example::

        traced = trace(dspy.Predict("message -> sentiment"))
        prediction = traced(message="The heater is broken again.")
        _, explanation = F.exact_match_evaluator(prediction.sentiment, "negative")
        explanation.backward()
        TGD(traced.parameters(), model_client=client).step()
        traced.write_back()      # the program now runs with the new instructions
    """
    return TracedProgram(program, descriptions)
