"""Building blocks of LM programs: Module, Parameter, and operations (as modules and as
functions)."""

from afnio.cognitive import functional
from afnio.cognitive.functional import add, split, sum
from afnio.cognitive.modules import Add, Module, Split, Sum
from afnio.cognitive.parameter import Parameter

__all__ = [
    "Add",
    "Module",
    "Parameter",
    "Split",
    "Sum",
    "add",
    "functional",
    "split",
    "sum",
]
