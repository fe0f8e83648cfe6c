"""Building blocks of LM programs: Module, Parameter, and operations (as modules and as
functions)."""

from afnio.cognitive import functional
from afnio.cognitive.functional import (
    add,
    chat_completion,
    deterministic_evaluator,
    exact_match_evaluator,
    lm_judge_evaluator,
    split,
    sum,
)
from afnio.cognitive.modules import (
    Add,
    ChatCompletion,
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
    Module,
    Split,
    Sum,
)
from afnio.cognitive.parameter import Parameter

__all__ = [
    "Add",
    "ChatCompletion",
    "DeterministicEvaluator",
    "ExactMatchEvaluator",
    "LMJudgeEvaluator",
    "Module",
    "Parameter",
    "Split",
    "Sum",
    "add",
    "chat_completion",
    "deterministic_evaluator",
    "exact_match_evaluator",
    "functional",
    "lm_judge_evaluator",
    "split",
    "sum",
]
