"""Automatic differentiation for text: grad mode, Functions and the backward engine."""

from afnio.autodiff.engine import abackward, backward
from afnio.autodiff.function import Function
from afnio.autodiff.grad_mode import is_grad_enabled, no_grad, set_grad_enabled
from afnio.autodiff.options import (
    BackwardOptions,
    backward_options,
    get_backward_options,
)

__all__ = [
    "BackwardOptions",
    "Function",
    "abackward",
    "backward",
    "backward_options",
    "get_backward_options",
    "is_grad_enabled",
    "no_grad",
    "set_grad_enabled",
]
