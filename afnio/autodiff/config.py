"""Constants of the autodiff engine."""

__all__ = ["BACKWARD_PASS_MAX_RETRIES", "IDENTITY_GRADIENT_DATA"]

BACKWARD_PASS_MAX_RETRIES = 3
"""How many times an LM-made gradient is re-asked when its answer cannot be parsed."""

IDENTITY_GRADIENT_DATA = ""
"""The data of the implicit root gradient (``x.backward()`` with no ``gradient``)."""
