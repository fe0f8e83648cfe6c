"""Building blocks of LM programs: parameters and operations."""

from afnio.cognitive import functional
from afnio.cognitive.functional import add, split, sum
from afnio.cognitive.parameter import Parameter

__all__ = ["Parameter", "add", "functional", "split", "sum"]
