"""afnio for DSPy: trace an existing DSPy program into an afnio graph, optimize its
predictors' instructions with textual gradients (:class:`AfnioTGD`, a DSPy
teleprompter), and write them back into the program.

Install with the ``dspy`` extra: ``pip install -e '.[dspy]'``. Importing this module
sets ``LITELLM_LOCAL_MODEL_COST_MAP=True`` unless it is already set, so that importing
DSPy (and LiteLLM) does not download a cost map over the network.
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from afnio_integrations._usage import ProgramUsage
from afnio_integrations._warnings import AfnioTracingWarning
from afnio_integrations.dspy._model import DSPyLM
from afnio_integrations.dspy._module import AfnioModule
from afnio_integrations.dspy._optimize import AfnioTGD, MetricEvaluator, call_metric
from afnio_integrations.dspy._traced import (
    TracedPrediction,
    TracedProgram,
    trace,
)

__all__ = [
    "AfnioModule",
    "AfnioTracingWarning",
    "AfnioTGD",
    "DSPyLM",
    "MetricEvaluator",
    "ProgramUsage",
    "TracedPrediction",
    "TracedProgram",
    "call_metric",
    "trace",
]
