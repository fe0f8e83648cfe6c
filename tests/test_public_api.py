"""The public surface is pinned: a new public name is a reviewed change."""

from __future__ import annotations

import afnio
import afnio.autodiff
import afnio.cognitive
import afnio.cognitive.functional

EXPECTED_AFNIO_ALL = [
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


def test_afnio_all_is_pinned_and_sorted() -> None:
    assert afnio.__all__ == EXPECTED_AFNIO_ALL
    assert sorted(afnio.__all__) == afnio.__all__
    for name in afnio.__all__:
        assert hasattr(afnio, name), name


def test_subpackage_all() -> None:
    assert afnio.autodiff.__all__ == [
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
    assert afnio.cognitive.__all__ == [
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
    assert afnio.functional is afnio.cognitive.functional
    assert afnio.functional.__all__ == [
        "add",
        "chat_completion",
        "deterministic_evaluator",
        "exact_match_evaluator",
        "lm_judge_evaluator",
        "split",
        "sum",
    ]


def test_public_objects_show_their_public_module() -> None:
    assert afnio.Variable.__module__ == "afnio"


def test_validate_multi_turn_messages() -> None:
    import pytest

    v = afnio.Variable("hi")
    assert afnio._validate_multi_turn_messages([{"role": "user", "content": [v]}])
    with pytest.raises(ValueError, match="missing"):
        afnio._validate_multi_turn_messages([{"role": "user"}])
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\]\[0\]"):
        afnio._validate_multi_turn_messages([{"role": "user", "content": ["hi"]}])
    assert afnio._validate_multi_turn_messages("x", raise_error=False) is False
    with pytest.raises(TypeError, match=r"`xs\[1\]` must be a int"):
        afnio._validate_typed_sequence([1, "a"], int, "xs")


def test_report_all_is_pinned() -> None:
    import afnio.report

    assert afnio.report.__all__ == [
        "MAX_BYTES",
        "REPORT_FILE",
        "load_run_log",
        "write_report",
    ]
