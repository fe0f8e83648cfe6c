"""Warnings of afnio's integrations.

:class:`AfnioTracingWarning` says that a traced program did something afnio could
not wire into its graph, so part of the program gets no feedback, for instance a
LangChain LM call whose prompt template was not found when the chain was traced
(``afnio_integrations.langchain``), or a DSPy predictor the program created at run
time, not among its predictors when it was traced (``afnio_integrations.dspy``).
Each traced program warns once per such call site or predictor. It is a
``UserWarning``: it can be turned into an error or silenced with the standard
:mod:`warnings` filters, e.g. ``warnings.simplefilter("error", AfnioTracingWarning)``.
Both integrations export it (the same class).
"""

from __future__ import annotations

__all__ = ["AfnioTracingWarning"]


class AfnioTracingWarning(UserWarning):
    """A traced program ran a step afnio could not connect to its Parameters (the
    message names the step and how to include it)."""
