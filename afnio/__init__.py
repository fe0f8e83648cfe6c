"""afnio: automatic differentiation for text.

Strings live in :class:`Variable`\\ s, prompts are ``Parameter``\\ s, every LM call is a
differentiable Function, and ``backward()`` produces textual feedback (the gradient) on
every Variable that shaped an output.

Example::

    >>> import afnio
    >>> x = afnio.Variable("Hi", role="greeting", requires_grad=True)
    >>> y = x + afnio.Variable(" there", role="suffix")
    >>> y.backward(afnio.Variable("Be warmer."))
    >>> len(x.grad)
    1
"""

import sys as _sys

from afnio import (  # noqa: F401 (models, trainer: public modules)
    autodiff,
    cognitive,
    models,
    optim,
    trainer,
    utils,
)
from afnio._model_client import get_backward_model_client, set_backward_model_client
from afnio._runtime import (
    get_concurrency_stats,
    get_max_concurrency,
    set_max_concurrency,
)
from afnio._utils import _validate_multi_turn_messages, _validate_typed_sequence
from afnio._variable import Variable
from afnio.autodiff.grad_mode import is_grad_enabled, no_grad, set_grad_enabled
from afnio.autodiff.graph import GradientEdge, Node
from afnio.autodiff.options import (
    BackwardOptions,
    backward_options,
    get_backward_options,
)
from afnio.cognitive import functional
from afnio.models.rate_limit import get_rate_limit_stats, set_rate_limit
from afnio.serialization import load, save

# ``import afnio.functional as F`` works like ``import torch.nn.functional as F``
_sys.modules["afnio.functional"] = functional

__version__ = "0.1.0"

__all__ = [
    "BackwardOptions",
    "GradientEdge",
    "Node",
    "Variable",
    "_validate_multi_turn_messages",
    "_validate_typed_sequence",
    "autodiff",
    "backward_options",
    "cognitive",
    "functional",
    "get_backward_model_client",
    "get_backward_options",
    "get_concurrency_stats",
    "get_max_concurrency",
    "get_rate_limit_stats",
    "is_grad_enabled",
    "load",
    "no_grad",
    "optim",
    "save",
    "set_backward_model_client",
    "set_grad_enabled",
    "set_max_concurrency",
    "set_rate_limit",
    "utils",
]

for _name in ("Variable",):
    globals()[_name].__module__ = "afnio"
del _name
