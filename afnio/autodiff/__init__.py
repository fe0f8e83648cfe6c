"""Automatic differentiation for text: grad mode, Functions and the backward engine."""

from afnio.autodiff.engine import abackward, backward
from afnio.autodiff.function import Function
from afnio.autodiff.grad_mode import is_grad_enabled, no_grad, set_grad_enabled

__all__ = [
    "Function",
    "abackward",
    "backward",
    "is_grad_enabled",
    "no_grad",
    "set_grad_enabled",
]
