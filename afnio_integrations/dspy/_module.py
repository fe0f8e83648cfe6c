"""An afnio Module callable as a DSPy module.

``AfnioModule(module, outputs=("answer",))`` is a ``dspy.Module``: DSPy programs call
it with keyword arguments like any predictor and get a ``dspy.Prediction``. Inside a
program traced by :func:`~afnio_integrations.dspy.trace`, its graph is joined to the
program's: an input whose text equals the output of a prediction visible to the call
(one that ended before it started and is not a concurrent sibling, e.g. in the same
``dspy.Parallel`` block: see "Visibility" in
:mod:`~afnio_integrations.dspy._tracing`) is passed as that output's Variable
(several equal ones, or the predictions an input is composed of, are joined by one
step whose feedback goes to each: the tracer's links by value), and its outputs can
feed later predictors, so feedback flows through it, and its Parameters are trained
together with the instructions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from afnio._variable import Variable
from afnio.cognitive.modules.module import Module
from afnio_integrations._recorded import StepOutput
from afnio_integrations.dspy._tracing import active_collector, field_text

__all__ = ["AfnioModule"]


class AfnioModule(dspy.Module):
    """A DSPy module that runs an afnio Module.

    Args:
        module: the afnio Module; it is called with one Variable per keyword
            argument (a value that is not a Variable becomes
            ``Variable(text, role="input `<name>`")``).
        outputs: the names of its outputs: its ``forward`` returns one Variable (one
            name), a tuple of Variables (one name each) or a dict of Variables (the
            dict's keys are used and ``outputs`` is ignored).

    Example::

        class Classify(afnio.cognitive.Module):
            ...  # forward(self, message: Variable) -> Variable

        program = AfnioModule(Classify(), outputs=("sentiment",))
        program(message="The heater is broken.").sentiment
    """

    def __init__(self, module: Module, outputs: Sequence[str] = ("output",)) -> None:
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(
                f"`module` must be an afnio Module, got {type(module).__name__}."
            )
        if isinstance(outputs, str) or not outputs:
            raise ValueError(
                "`outputs` must be a non-empty sequence of field names, e.g. "
                "('answer',)."
            )
        self.module = module
        self.outputs = tuple(outputs)

    def _named(self, result: Any) -> dict[str, Variable]:
        if isinstance(result, Mapping):
            named = dict(result)
        elif isinstance(result, tuple | list) and len(self.outputs) > 1:
            if len(result) != len(self.outputs):
                raise ValueError(
                    f"The module returned {len(result)} values but `outputs` names "
                    f"{len(self.outputs)}: {list(self.outputs)}."
                )
            named = dict(zip(self.outputs, result, strict=True))
        else:
            named = {self.outputs[0]: result}
        for key, value in named.items():
            if not isinstance(value, Variable):
                raise TypeError(
                    f"The module's output {key!r} must be a Variable, got "
                    f"{type(value).__name__}."
                )
        return named

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        collector = active_collector()
        args: dict[str, Any] = {}
        for key, value in kwargs.items():
            if isinstance(value, Variable):
                args[key] = value
                continue
            text = field_text(value)
            linked = collector.link_input(text) if collector is not None else []
            if len(linked) == 1 and linked[0].data == text:
                args[key] = linked[0]
            elif linked:  # several equal predictions, or one composed of several
                args[key] = StepOutput.apply(
                    linked, text, f"input `{key}` of the afnio module", f"input `{key}`"
                )
            else:
                args[key] = Variable(text, role=f"input `{key}`")
        named = self._named(self.module(**args))
        if collector is not None:
            for var in named.values():
                collector.add(str(var.data), var)
        return dspy.Prediction(**{k: v.data for k, v in named.items()})
