"""Modules: the base class and module forms of afnio's operations."""

from afnio.cognitive.modules.basic import Add, Split, Sum
from afnio.cognitive.modules.lm import (
    ChatCompletion,
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
)
from afnio.cognitive.modules.module import Module

__all__ = [
    "Add",
    "ChatCompletion",
    "DeterministicEvaluator",
    "ExactMatchEvaluator",
    "LMJudgeEvaluator",
    "Module",
    "Split",
    "Sum",
]
