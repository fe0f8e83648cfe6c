"""Recording a DSPy program's predictor calls into an afnio graph, through DSPy
callbacks.

A :class:`CallCollector` is added to ``dspy.context(callbacks=...)`` for one program
call. For every ``Predict`` call it records the messages the LM received
(``on_lm_start``, linked to the owning ``Predict`` call through DSPy's
``ACTIVE_CALL_ID``), the LM's answer (``on_lm_end``) and the parsed Prediction
(``on_module_end``); when the call ends it becomes afnio nodes at once:

    instructions Parameter + linked inputs -> RecordedChatCall (the LM call, no LM call
    repeated) -> StepOutput per output field -> field Variables

An input whose text equals an earlier output (of this program call) is linked to that
output's Variable, so feedback flows back across stages. When the ChatAdapter falls back
to the JSONAdapter, the answer that was parsed (the last one) is recorded. Each LM
request also holds one of afnio's request slots (:func:`afnio._runtime.
acquire_request_slot`), so DSPy's calls obey the same concurrency bound as afnio's.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback

from afnio._runtime import acquire_request_slot, in_runtime_thread
from afnio._variable import Variable
from afnio_integrations._recorded import RecordedChatCall, StepOutput

__all__ = ["CallCollector", "PredictorSlot", "active_collector", "field_text"]

_ACTIVE: contextvars.ContextVar[CallCollector | None] = contextvars.ContextVar(
    "afnio_dspy_collector", default=None
)


def active_collector() -> CallCollector | None:
    """The collector of the traced program call running in this context, if any
    (also found in DSPy's callbacks, which DSPy carries into its own worker threads,
    e.g. ``dspy.Parallel``)."""
    found = _ACTIVE.get()
    if found is None:
        callbacks = dspy.settings.callbacks or []
        found = next(
            (c for c in reversed(callbacks) if isinstance(c, CallCollector)), None
        )
    return found


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def field_text(value: Any) -> str:
    """A field value as text (JSON for structured values, like DSPy's adapters)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "model_dump"):
        return json.dumps(value.model_dump(), default=str)
    if isinstance(value, bool | int | float):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except TypeError:
        return str(value)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") if isinstance(part, dict) else str(part)
            for part in content
            if not isinstance(part, dict) or part.get("type", "text") == "text"
        )
    return "" if content is None else str(content)


def _conversation(messages: Any, prompt: Any) -> list[dict[str, str]]:
    if messages:
        return [
            {
                "role": str(m.get("role", "user")),
                "content": _content_text(m.get("content")),
            }
            for m in messages
            if isinstance(m, Mapping)
        ]
    return [{"role": "user", "content": _content_text(prompt)}]


def _output_text(outputs: Any) -> str:
    first = outputs[0] if isinstance(outputs, list) and outputs else outputs
    if isinstance(first, dict):
        return str(first.get("text") or json.dumps(first, default=str))
    text = getattr(first, "text", None)  # an lm15 Response
    if isinstance(text, str):
        return text
    return "" if first is None else str(first)


@dataclass
class PredictorSlot:
    """One predictor of a traced program: its name, the Predict object and the
    Parameters that hold its instructions (and, optionally, output-field
    descriptions)."""

    name: str
    predictor: Any
    instructions: Variable
    descriptions: dict[str, Variable] = field(default_factory=dict)


@dataclass
class _Call:
    predictor: Any
    inputs: dict[str, Any]
    visible: int  # outputs produced before the call started (its inputs' sources)
    conversation: list[dict[str, str]] | None = None
    output: str | None = None


class CallCollector(BaseCallback):
    """Builds the afnio graph of one program call (see the module docstring).

    Args:
        slots: the traced predictors, by ``id`` of their Predict object and of its
            signature class (unique per traced predictor).
        seed: (text, Variable) pairs the program's inputs may be linked to.
    """

    def __init__(
        self,
        slots: Mapping[int, PredictorSlot],
        seed: list[tuple[str, Variable]] | None = None,
        on_lm_call: Callable[[str | None], None] | None = None,
    ) -> None:
        self.slots = slots
        self.produced: list[tuple[str, Variable]] = list(seed or [])
        self.calls = 0
        self.errors: list[BaseException] = []
        self._on_lm_call = on_lm_call
        self._parents: dict[str, str | None] = {}
        self._predicts: dict[str, _Call] = {}
        self._lm_owner: dict[str, str | None] = {}
        self._lm_model: dict[str, str] = {}
        self._releases: dict[str, Callable[[], None]] = {}
        self._fields: list[Variable] = []  # the predicted field Variables
        self._lock = threading.RLock()

    # -- DSPy hooks ----------------------------------------------------------------

    def on_module_start(
        self, call_id: str, instance: Any, inputs: dict[str, Any]
    ) -> None:
        with self._lock:
            self._parents[call_id] = ACTIVE_CALL_ID.get()
            if isinstance(instance, dspy.Predict):
                kwargs = dict(inputs.get("kwargs") or {})
                self._predicts[call_id] = _Call(instance, kwargs, len(self.produced))

    def on_module_end(
        self, call_id: str, outputs: Any | None, exception: Exception | None = None
    ) -> None:
        with self._lock:
            call = self._predicts.pop(call_id, None)
        if call is None or exception is not None or outputs is None:
            return
        try:
            self._record(call, outputs)
        except Exception as e:  # DSPy would only log it: re-raised after the call
            self.errors.append(e)

    def _child(self, call_id: str) -> None:
        with self._lock:
            self._parents[call_id] = ACTIVE_CALL_ID.get()

    def on_adapter_format_start(
        self, call_id: str, instance: Any, inputs: dict[str, Any]
    ) -> None:
        self._child(call_id)

    def on_adapter_parse_start(
        self, call_id: str, instance: Any, inputs: dict[str, Any]
    ) -> None:
        self._child(call_id)

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        owner = self._owner(ACTIVE_CALL_ID.get())
        with self._lock:
            self._lm_owner[call_id] = owner
            self._lm_model[call_id] = str(getattr(instance, "model", "") or "unknown")
            if owner is not None:
                self._predicts[owner].conversation = _conversation(
                    inputs.get("messages"), inputs.get("prompt")
                )
        # An async program's LM call starts on its event loop: blocking there could
        # deadlock, so such calls are not held to the bound.
        if not in_runtime_thread() and not _in_event_loop():
            release = acquire_request_slot()
            with self._lock:
                self._releases[call_id] = release

    def on_lm_end(
        self, call_id: str, outputs: Any | None, exception: Exception | None = None
    ) -> None:
        with self._lock:
            release = self._releases.pop(call_id, None)
            owner = self._lm_owner.pop(call_id, None)
            model = self._lm_model.pop(call_id, None)
            self.calls += 1
            if exception is None and owner in self._predicts:
                self._predicts[owner].output = _output_text(outputs)
        if release is not None:
            release()
        if self._on_lm_call is not None:
            self._on_lm_call(model)

    def release_all(self) -> None:
        """Give back every request slot still held (a call that never ended)."""
        with self._lock:
            releases, self._releases = list(self._releases.values()), {}
        for release in releases:
            release()

    # -- the graph -----------------------------------------------------------------

    def _owner(self, call_id: str | None) -> str | None:
        """The nearest enclosing Predict call of ``call_id``."""
        with self._lock:
            seen = 0
            while call_id is not None and seen < 10_000:
                if call_id in self._predicts:
                    return call_id
                call_id = self._parents.get(call_id)
                seen += 1
        return None

    def activate(self) -> contextvars.Token[CallCollector | None]:
        """Make this collector the active one in the current context."""
        return _ACTIVE.set(self)

    @staticmethod
    def deactivate(token: contextvars.Token[CallCollector | None]) -> None:
        _ACTIVE.reset(token)

    def add(self, text: str, var: Variable) -> None:
        """Record a Variable produced during the call (later inputs link to it)."""
        with self._lock:
            self.produced.append((text, var))

    def find(self, text: str, visible: int | None = None) -> Variable | None:
        """The latest Variable produced (or seeded) with exactly ``text``, among the
        first ``visible`` ones when given."""
        with self._lock:
            produced = self.produced if visible is None else self.produced[:visible]
            return next((v for t, v in reversed(produced) if t == text), None)

    def composed_of(self, text: str) -> list[Variable]:
        """The predicted field Variables whose text occurs in ``text`` as a whole
        (an output composed of several predictions), oldest first, each once."""
        found: list[Variable] = []
        with self._lock:
            for piece, var in self.produced:
                if not piece.strip() or var in found or var not in self._fields:
                    continue
                pattern = rf"(?<!\w){re.escape(piece)}(?!\w)"
                if re.search(pattern, text):
                    found.append(var)
        return found

    def _record(self, call: _Call, outputs: Any) -> None:
        slot = self.slots.get(id(call.predictor)) or self.slots.get(
            id(call.predictor.signature)  # a copy made by the program (BestOfN...)
        )
        variables: list[Variable] = []
        locations: list[str] = []
        if slot is not None:
            variables.append(slot.instructions)
            locations.append("system")
            for var in slot.descriptions.values():
                variables.append(var)
                locations.append("system")
        for key, value in call.inputs.items():
            if isinstance(value, Variable):
                variables.append(value)
                locations.append(f"input:{key}")
                continue
            var = self.find(field_text(value), call.visible)
            if var is not None and var not in variables:
                variables.append(var)
                locations.append(f"input:{key}")
        name = slot.name if slot is not None else type(call.predictor).__name__
        conversation = call.conversation or [
            {"role": "user", "content": field_text(call.inputs)}
        ]
        fields = dict(outputs.items()) if hasattr(outputs, "items") else {}
        output = call.output
        if output is None:  # no LM answer seen (a custom LM without callbacks)
            output = "\n".join(f"{k}: {field_text(v)}" for k, v in fields.items())
        completion = RecordedChatCall.apply(
            conversation,
            output,
            variables,
            locations,
            f"response of the LM of DSPy predictor {name}",
        )
        with self._lock:
            self.produced.append((output, completion))
        for key, value in fields.items():
            text = field_text(value)
            var = StepOutput.apply(
                completion,
                text,
                f"parse of the `{key}` field",
                f"`{key}` field predicted by DSPy predictor {name}",
            )
            with self._lock:
                self.produced.append((text, var))
                self._fields.append(var)
