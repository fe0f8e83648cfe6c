"""``AfnioTGD``: textual gradient descent as a DSPy teleprompter.

``AfnioTGD(metric=...).compile(student, trainset=..., valset=...)`` copies the
student, traces the copy (:func:`~afnio_integrations.dspy.trace`), trains its
predictors' instructions with afnio's TGD through the :class:`~afnio.trainer.Trainer`
(progress, ``max_cost``, ``revert_on_regression``), writes them back with
``signature.with_instructions(...)`` and returns the optimized copy. ``report`` tells
the scores before and after, the instruction diff and the LM calls, tokens and cost,
and names the run's HTML report (``run_log.jsonl`` and ``report.html`` in the run's
folder; ``loggers=`` adds e.g. MLflow tracking).

The metric is DSPy's: ``metric(example, pred, trace=None)`` returning a score
(bool, int or float), or a GEPA-style feedback metric ``metric(gold, pred, trace,
pred_name, pred_trace)`` returning ``dspy.Prediction(score=..., feedback="...")``,
whose feedback text no LM call rewrites. Samples at ``best_score`` get no feedback;
with ``backward="cheap"`` (the default: no LM call) the others get a sentence written
directly from the prediction, the example's labels, the metric's name and score,
followed by the metric's feedback text when it gave one; with
``backward="upstream"`` a sample with feedback text gets that text alone, one without
gets feedback from the backward LM, which sees the input, the prediction and the
example's labels (see :class:`MetricEvaluator`).
"""

from __future__ import annotations

import builtins
import inspect
import math
import numbers
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import dspy
from dspy.teleprompt import Teleprompter

from afnio._model_client import (
    ModelClientSingleton,
    backward_model_client,
    get_backward_model_client,
)
from afnio._variable import Variable
from afnio.autodiff.decorators import evaluator
from afnio.autodiff.evaluator import (
    _ask_for_samples,
    _explain,
    _failed_samples,
    _outputs,
    _prediction_only_backward,
    _save,
)
from afnio.autodiff.function import Function
from afnio.autodiff.options import (
    BackwardOptions,
    backward_options,
    check_evaluator_feedback,
    get_backward_options,
    resolve_backward_options,
)
from afnio.errors import is_provider_error, note_client, tag_sample
from afnio.models.model import ChatCompletionModel
from afnio.optim import TGD
from afnio.trainer.estimate import (
    Assumptions,
    GraphShape,
    RunEstimate,
    Tokenizer,
    approx_tokens,
)
from afnio.trainer.estimate import estimate as _estimate
from afnio.utils.data import IterableDataset, JsonlDataset
from afnio_integrations._metric_feedback import direct_metric_feedback_texts
from afnio_integrations._recorded import JoinFields
from afnio_integrations._report import OptimizeReport
from afnio_integrations._rows import short_repr
from afnio_integrations._training import (
    SplitAgent,
    StreamRows,
    check_loggers,
    client_model,
    model_args,
    stream_rows,
    train_agent,
)
from afnio_integrations.dspy._model import DSPyLM
from afnio_integrations.dspy._traced import (
    TracedPrediction,
    TracedProgram,
    _description,
    trace,
)
from afnio_integrations.dspy._tracing import field_text

__all__ = ["AfnioTGD", "MetricEvaluator", "call_metric"]


def _accepts(metric: Callable[..., Any], count: int) -> bool:
    try:
        params = list(inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= count


def call_metric(
    metric: Callable[..., Any], example: Any, prediction: Any
) -> tuple[float, str]:
    """``(score, feedback)`` from a DSPy metric: ``metric(example, pred)``, with
    ``trace=None`` (and ``pred_name=None, pred_trace=None`` for GEPA-style metrics)
    when it takes them. A ``dspy.Prediction`` (or dict) with ``score`` and
    ``feedback``, a ``(score, feedback)`` tuple, or a plain score are accepted.

    >>> call_metric(lambda g, p, trace=None: g == p, "a", "a")
    (1.0, '')
    >>> call_metric(lambda *a: dspy.Prediction(score=0.5, feedback="meh"), 1, 2)
    (0.5, 'meh')
    """
    signature_of = metric.forward if isinstance(metric, dspy.Module) else metric
    if _accepts(signature_of, 5):
        result = metric(example, prediction, None, None, None)
    elif _accepts(signature_of, 3):
        result = metric(example, prediction, None)
    else:
        result = metric(example, prediction)
    feedback: Any = ""
    if isinstance(result, tuple) and len(result) == 2:
        result, feedback = result
    elif isinstance(result, Mapping) or hasattr(result, "score"):
        get = result.get if isinstance(result, Mapping) else result.__dict__.get
        if isinstance(result, dspy.Prediction):
            get = result.get
        feedback = get("feedback", "") or ""
        result = get("score")
    if isinstance(result, numbers.Real) or (
        hasattr(result, "__float__") and not isinstance(result, str | bytes)
    ):  # numpy scalars included
        score = float(result)
        if math.isnan(score):
            name = getattr(metric, "__name__", "the metric")
            raise ValueError(f"{name} returned a NaN score.")
        return score, str(feedback or "")
    name = getattr(metric, "__name__", "the metric")
    raise TypeError(
        f"{name} must return a score (bool, int or float), a (score, feedback) "
        f"tuple or dspy.Prediction(score=..., feedback=...); got {result!r}."
    )


@evaluator
class MetricEvaluator(Function):
    """An evaluator from a DSPy metric's results: per-sample ``scores`` (summed) and
    optional ``feedback`` texts. In backward, only samples below ``best_score`` get
    feedback, and none costs an evaluator-backward LM call in direct mode:

    * ``feedback_mode="direct"``: every such sample gets, as afnio's deterministic
      evaluator writes it, the direct text
      (:data:`afnio.autodiff.prompts.DIRECT_EVALUATOR_FEEDBACK`: the metric, the
      prediction, its score and the expected value), followed, when the metric gave
      feedback, by that text (:data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_DETAIL`;
      the metric's text comes first when the target is not a plain value, see
      :mod:`afnio_integrations._metric_feedback`);
    * ``"lm"``: a sample with metric feedback gets that text alone (no LM call); one
      without gets feedback written by the backward LM.

    ``feedback_mode=None`` (default) reads the active
    ``afnio.get_backward_options().evaluator_feedback`` at backward time. Samples at
    ``best_score`` get nothing."""

    @staticmethod
    def forward(
        ctx: Any,
        prediction: Variable,
        targets: list[str],
        scores: list[float],
        feedback: list[str],
        purpose: str,
        best_score: float = 1.0,
        *,
        feedback_mode: Literal["lm", "direct"] | None = None,
    ) -> tuple[Variable, Variable]:
        if feedback_mode is not None:
            check_evaluator_feedback(feedback_mode, "feedback_mode")
        predictions = prediction.data if isinstance(prediction.data, list) else None
        n = len(predictions) if predictions is not None else 1
        if not (len(targets) == len(scores) == len(feedback) == n):
            raise ValueError(
                f"`targets`, `scores` and `feedback` must have one entry per sample "
                f"({n}); got {len(targets)}, {len(scores)} and {len(feedback)}."
            )
        score, explanation = _explain(
            prediction,
            predictions if predictions is not None else [prediction.data],
            list(targets),
            list(scores),
            purpose,
            builtins.sum,
            "summation",
        )
        _save(
            ctx,
            prediction,
            list(targets),
            [best_score if s >= best_score else s for s in scores],
            explanation,
            purpose,
            None,
            best_score,
            True,
        )
        ctx.feedback = [str(f) for f in feedback]
        ctx.feedback_mode = feedback_mode
        return _outputs(ctx, prediction, score, explanation)

    @staticmethod
    async def backward(
        ctx: Any, score_grad: Variable | None, explanation_grad: Variable | None
    ) -> tuple[Variable | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * len(ctx.needs_input_grad)
        failed = _failed_samples(ctx)
        ask = [s for s in failed if not ctx.feedback[s].strip()]
        mode = ctx.feedback_mode or get_backward_options().evaluator_feedback
        if mode == "direct":  # no LM call: the metric's result (and text), stated
            texts = [
                direct_metric_feedback_texts(
                    ctx, explanation_grad, ctx.feedback, samples=failed
                )
            ]
            return _prediction_only_backward(ctx, texts)
        texts = await _ask_for_samples(
            ctx, explanation_grad, [(ctx.prediction, "prediction")], samples=ask
        )
        for s in failed:  # upstream: the metric's own text alone
            if ctx.feedback[s].strip():
                texts[0][s] = ctx.feedback[s].strip()
        return _prediction_only_backward(ctx, texts)


def _label_view(
    out: TracedPrediction, rows: Sequence[dspy.Example]
) -> tuple[Variable, list[str]]:
    """The prediction Variable the metric judged (the fields named by the examples'
    labels, else every output field but ``reasoning``) and the per-sample targets."""
    labels = [k for k in rows[0].labels() if k in out.fields]
    names = labels or [k for k in out.fields if k != "reasoning"] or list(out.fields)
    if len(names) == 1:
        key = names[0]
        targets = [field_text(ex.get(key, "")) for ex in rows]
        return out.fields[key], targets
    parts = [out.fields[k] for k in names]
    prediction = JoinFields.apply(parts, names, "fields of the prediction")
    targets = [
        "\n".join(f"{k}: {field_text(ex.get(k, ''))}" for k in names) for ex in rows
    ]
    return prediction, targets


def _describe_lm(lm: Any) -> str:
    """``dspy.LM('openai/gpt-4o-mini', api_base='https://...')``, no credentials."""
    from afnio._secrets import mask_url

    base = None
    kwargs = getattr(lm, "kwargs", None)
    if isinstance(kwargs, Mapping):
        base = kwargs.get("api_base") or kwargs.get("base_url")
    text = f"dspy.LM({getattr(lm, 'model', type(lm).__name__)!r}"
    return text + (f", api_base={mask_url(str(base))!r})" if base else ")")


def _program_lms(program: dspy.Module) -> list[Any]:
    """The LMs the program's predictors call (their own, else DSPy's configured)."""
    lms: list[Any] = []
    for _, predictor in program.named_predictors():
        lm = getattr(predictor, "lm", None) or dspy.settings.lm
        if lm is not None and all(lm is not other for other in lms):
            lms.append(lm)
    return lms


class _ProgramAgent(SplitAgent):
    def __init__(
        self,
        traced: TracedProgram,
        metric: Callable[..., Any],
        examples: dict[str, list[dspy.Example]],
        names: dict[str, str],
        optimizer: Callable[[], Any],
        best_score: float,
    ) -> None:
        super().__init__(optimizer)
        self.traced = traced
        object.__setattr__(self, "_metric", metric)
        object.__setattr__(self, "_examples", examples)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_best", best_score)
        object.__setattr__(self, "failed_samples", 0)

    def forward(self, rows: list[dspy.Example]) -> TracedPrediction:
        return self.traced.batch(rows, return_exceptions=True)

    def _step(self, batch: Any, split: str) -> dict[str, Any]:
        indices = [int(i) for i in batch[0]]
        dataset = self._names[split]
        rows = [self._examples[split][i] for i in indices]
        out = self(rows)
        if all(error is not None for error in out.errors):
            # nothing ran: say why (an LM down, a bad program), and where
            error = out.errors[0]
            if is_provider_error(error):  # the service failed, not one example
                lms = _program_lms(self.traced.program)
                if lms:
                    names = " or ".join(_describe_lm(lm) for lm in lms)
                    note_client(error, f"the program's own LM {names}")
            else:  # the program failed on every example: name the first
                tag_sample(error, dataset=dataset, index=indices[0], stage="forward")
            raise error
        scores, feedback = [], []
        for i, example, pred, error in zip(
            indices, rows, out.prediction, out.errors, strict=True
        ):
            if error is not None or pred is None:
                object.__setattr__(self, "failed_samples", self.failed_samples + 1)
                scores.append(0.0)
                feedback.append("")
                continue
            try:
                score, text = call_metric(self._metric, example, pred)
            except Exception as e:  # a bug in the metric: name the example
                tag_sample(e, dataset=dataset, index=i, stage="metric")
                raise
            scores.append(score)
            feedback.append(text)
        prediction, targets = _label_view(out, rows)
        name = getattr(self._metric, "__name__", "the metric")
        score, explanation = MetricEvaluator.apply(
            prediction, targets, scores, feedback, f"DSPy metric {name}", self._best
        )
        return {"loss": (score, explanation), "score": builtins.sum(scores) / len(rows)}


LMLike = Any  # a dspy.BaseLM or an afnio ChatCompletionModel


def _client(lm: LMLike, name: str) -> tuple[ChatCompletionModel, dict[str, Any]]:
    """``lm`` as an afnio client, with the completion arguments it brings: those
    of afnio's backward client (what ``afnio.get_backward_model_client()`` returns,
    its ``model`` among them), which is unwrapped to the client it holds."""
    if isinstance(lm, ModelClientSingleton):
        try:
            return lm.client, lm._call_args({})
        except AssertionError:
            raise ValueError(
                f"`{name}` is afnio's backward client, but none is set: call "
                "afnio.set_backward_model_client(...) first, or pass a dspy.LM."
            ) from None
    if isinstance(lm, ChatCompletionModel):
        return lm, {}
    if isinstance(lm, dspy.BaseLM):
        return DSPyLM(lm), {}
    raise TypeError(
        f"`{name}` must be a dspy.LM or an afnio ChatCompletionModel, got "
        f"{type(lm).__name__}."
    )


_EXAMPLE = 'dspy.Example(question=..., answer=...).with_inputs("question")'


def _examples(
    data: Sequence[Any] | None, name: str, first: int = 0
) -> list[dspy.Example]:
    """``data`` as a list of ``dspy.Example`` with input keys (``[]`` for None);
    ``first``: the index of ``data[0]`` in the set (in the messages).

    Raises:
        TypeError: ``data`` is not a list, or holds something else than examples.
        ValueError: an example has no input keys.
    """
    if data is None:
        return []
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{name}` must be a list of dspy.Example, got {short_repr(data)}. "
            f"Build each as {_EXAMPLE}."
        )
    rows = list(data)
    for i, ex in enumerate(rows, first):
        if not isinstance(ex, dspy.Example):
            hint = ""
            if isinstance(ex, Mapping):
                hint = " (for a dict row: dspy.Example(**row).with_inputs(...))"
            elif isinstance(ex, Variable) or (
                isinstance(ex, tuple) and any(isinstance(x, Variable) for x in ex)
            ):  # a dataset built to feed an afnio Module
                hint = (
                    " (for a JsonlDataset: JsonlDataset(path, transform=lambda row: "
                    "dspy.Example(**row).with_inputs(...)), without input=/target=)"
                )
            raise TypeError(
                f"`{name}[{i}]` must be a dspy.Example, got {short_repr(ex)}. "
                f"Build it as {_EXAMPLE}{hint}."
            )
        try:
            ex.inputs()
        except ValueError:
            fields = ", ".join(repr(k) for k in ex.toDict()) or "none"
            raise ValueError(
                f"`{name}[{i}]` has no input keys (its fields: {fields}): say which "
                f"fields the program takes with .with_inputs(...), e.g. {_EXAMPLE}."
            ) from None
    return rows


def _valset(
    valset: Sequence[dspy.Example] | None, train: list[dspy.Example]
) -> list[dspy.Example]:
    """The validation examples: ``train`` for ``None``; ``valset`` read once (a
    generator is consumed by its first reading)."""
    if valset is None:
        return train
    val = _examples(valset, "valset")
    if not val:
        raise ValueError("`valset` is empty: pass examples, or None for trainset.")
    return val


def _optional(field: Any) -> bool:
    """Whether an input field may be left out (its type admits ``None``)."""
    annotation = getattr(field, "annotation", None)
    return type(None) in typing.get_args(annotation) or annotation is type(None)


def _program_inputs(student: dspy.Module) -> tuple[tuple[str, ...], str] | None:
    """The input names every example must give ``student``, and what they come
    from, when they can be known without running it: a ``Predict`` or
    ``ChainOfThought`` (its signature's input fields, optional ones aside), or a
    module whose ``forward`` names its parameters (its required ones). ``None``
    otherwise (``forward(**kwargs)``, or a program DSPy cannot inspect)."""
    predictor = student
    if isinstance(student, dspy.ChainOfThought):
        predictor = getattr(student, "predict", None)
    if isinstance(predictor, dspy.Predict):
        fields = predictor.signature.input_fields
        names = tuple(k for k, f in fields.items() if not _optional(f))
        return names, "the input fields of its signature"
    forward = getattr(type(student), "forward", None)  # DSPy warns on .forward
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # self
    except (TypeError, ValueError):
        return None
    if not params or any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    names = tuple(
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    )
    return (names, "the parameters of its forward()") if names else None


def _check_inputs(
    student: dspy.Module, rows: Sequence[dspy.Example], name: str, first: int = 0
) -> None:
    """Refuse, before any LM call, an example that lacks an input the program
    needs (DSPy would run it on an empty input and score the answer). ``first``:
    the index of ``rows[0]`` in the set (in the messages).

    Raises:
        ValueError: naming the example, its input keys and the program's inputs.
    """
    known = _program_inputs(student)
    if known is None:
        return
    needed, source = known
    for i, ex in enumerate(rows, first):
        keys = list(ex.inputs().keys())
        missing = [k for k in needed if k not in keys]
        if missing:
            fields = ", ".join(f"{k}=..." for k in needed)
            labels = ", ".join(f"{k}=..." for k in ex.labels())
            build = ", ".join(x for x in (fields, labels) if x)
            inputs = ", ".join(repr(k) for k in needed)
            raise ValueError(
                f"`{name}[{i}]` has the input keys {keys}, but the program takes "
                f"{list(needed)} ({source}); it lacks {missing[0]!r}. Build it as "
                f"dspy.Example({build}).with_inputs({inputs}) (no LM call was made)."
            )


def _student_and_trainset(
    student: Any, trainset: Sequence[dspy.Example]
) -> list[dspy.Example]:
    """Check ``student`` and ``trainset`` (as ``compile`` takes them); the examples."""
    if not isinstance(student, dspy.Module):
        raise TypeError(
            f"`student` must be a dspy.Module, got {type(student).__name__}."
        )
    train = _examples(trainset, "trainset")
    if not train:
        raise ValueError("`trainset` is empty: pass dspy.Example items.")
    return train


class AfnioTGD(Teleprompter):
    """Textual gradient descent on the instructions of a DSPy program's predictors.

    Args:
        metric: ``metric(example, pred, trace=None) -> score`` or a GEPA-style
            feedback metric returning ``dspy.Prediction(score=..., feedback=...)``.
        epochs, batch_size, seed: the training loop (shuffled with ``seed``).
        backward_lm: the LM that writes feedback: a ``dspy.LM`` or an afnio model
            client. Default: afnio's backward client when one is set, else the LM
            configured in DSPy (``dspy.configure(lm=...)``).
        optimizer_lm: the LM that rewrites instructions (default ``backward_lm``).
        completion_args: arguments of every feedback and optimizer call (e.g.
            ``{"model": "gpt-4o", "temperature": 0}`` for an afnio OpenAI client).
        momentum, constraints: as for :class:`~afnio.optim.TGD`.
        best_score: a sample's best metric value (it gets no feedback).
        revert_on_regression, max_cost: as for :class:`~afnio.trainer.Trainer`;
            the budget counts the program's own LM calls too.
        descriptions: also optimize the output-field descriptions.
        progress: show the Trainer's progress bar and run summary.
        root_dir: where the run log (``run_log.jsonl``), the HTML report
            (``report.html``), metrics and checkpoints go. Default: a new folder
            ``afnio-optimize-*`` in the system's temporary folder
            (``tempfile.gettempdir()``) for each :meth:`compile`, without
            checkpoints; it is not deleted, so the report outlives the call.
        loggers: where the Trainer also sends each step's record (the Trainer's
            ``loggers=``): a list of loggers, e.g.
            ``[MLflowLogger(tracking_uri="sqlite:///mlflow.db")]`` from
            ``afnio.trainer.loggers``. ``None`` (default): the run log and a CSV
            logger; ``[]``: the run log only. The run log is always written (the
            report is built from it). Anything but a list of objects with
            ``start``, ``log_step``, ``log_validation``, ``finish`` and
            ``state_dict`` raises ``TypeError`` here.
        backward: how the backward passes write their feedback
            (:class:`afnio.BackwardOptions`): ``"cheap"`` (the default here) or
            ``"upstream"``, or a ``BackwardOptions(...)`` (``None``: the options
            active around :meth:`compile`). ``"cheap"``: a failed
            example gets its feedback written directly from the prediction, the
            example's labels, the metric's name and score, followed by the
            metric's own feedback text when it gave one (no evaluator-backward LM
            call, no LM round; ``"upstream"`` uses a metric's text alone, as
            before), and the chat-backward
            calls of the examples that went through the same predictor share a
            call, at most 8 examples per call (the groups sent at once).
            ``"upstream"``: an LM call writes the feedback of examples without
            metric feedback and each example gets its own chat-backward call (the
            core API's default, afnio's behaviour before; a deliberate difference:
            ``afnio.backward_options()`` is upstream unless opened, ``AfnioTGD`` is
            cheap unless told). :meth:`compile` runs the whole run (validations,
            training steps, revert checks) and :meth:`estimate` its estimate inside
            ``afnio.backward_options(backward)``; ``str(report)`` states it on its
            ``backward:`` line. Anything else raises ``ValueError``/``TypeError``
            naming ``backward`` here, before any LM call.

    After :meth:`compile`, ``report`` holds an
    :class:`~afnio_integrations.langchain.OptimizeReport` (scores are 0 to 1);
    ``report.report_path`` is the run's HTML report (``str(report)`` ends with
    ``run report: <path>``; open it in a browser) and ``report.run_dir`` its
    folder.

    Example::

        def metric(example, pred, trace=None):
            return example.sentiment == pred.sentiment

        tgd = AfnioTGD(metric=metric, epochs=3, batch_size=16)
        optimized = tgd.compile(program, trainset=train, valset=val)
        print(tgd.report)  # ends with: run report: /tmp/afnio-optimize-.../report.html

    Tracking the run in MLflow too (``pip install 'afnio-local[mlflow]'``)::

        from afnio.trainer.loggers import MLflowLogger

        tgd = AfnioTGD(
            metric=metric, root_dir="runs/sentiment",
            loggers=[MLflowLogger(tracking_uri="sqlite:///mlflow.db",
                                  experiment="sentiment")],
        )
        optimized = tgd.compile(program, trainset=train, valset=val)
        print(tgd.report.report_path)  # runs/sentiment/report.html
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        *,
        epochs: int = 3,
        batch_size: int = 16,
        seed: int = 0,
        backward_lm: LMLike | None = None,
        optimizer_lm: LMLike | None = None,
        completion_args: Mapping[str, Any] | None = None,
        momentum: int = 0,
        constraints: Sequence[str] | None = None,
        best_score: float = 1.0,
        revert_on_regression: bool = False,
        max_cost: float | None = None,
        descriptions: bool = False,
        progress: bool = True,
        root_dir: str | None = None,
        loggers: Sequence[Any] | None = None,
        backward: BackwardOptions | Literal["cheap", "upstream"] = "cheap",
    ) -> None:
        super().__init__()
        if not callable(metric):
            raise TypeError("`metric` must be a function (example, pred, trace=None).")
        if isinstance(best_score, bool) or not isinstance(best_score, numbers.Real):
            raise TypeError(f"`best_score` must be a number, got {best_score!r}.")
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        self.metric = metric
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.backward_lm = backward_lm
        self.optimizer_lm = optimizer_lm
        self.completion_args = dict(completion_args or {})
        self.momentum = momentum
        self.constraints = list(constraints or [])
        self.best_score = best_score
        self.revert_on_regression = revert_on_regression
        self.max_cost = max_cost
        self.descriptions = descriptions
        self.progress = progress
        self.root_dir = root_dir
        self.loggers = check_loggers(loggers)
        # checked now (a bad value fails here); None stays None: the options active
        # around compile()/estimate()
        resolved = resolve_backward_options(backward, "backward")
        self.backward: BackwardOptions | None = None if backward is None else resolved
        self.report: OptimizeReport | None = None

    def _streamed(
        self, student: Any, trainset: IterableDataset, valset: Any
    ) -> tuple[StreamRows, list[dspy.Example]]:
        """A streamed ``trainset`` (each example checked as it is read) and the
        ``valset`` (checked by the caller, before any LM call)."""
        if not isinstance(student, dspy.Module):
            raise TypeError(
                f"`student` must be a dspy.Module, got {type(student).__name__}."
            )
        if valset is None:
            raise ValueError(
                "`trainset` is a stream (an IterableDataset), so it cannot also "
                "serve as the valset, which is scored as one batch, in memory: pass "
                "valset=[...] (dspy.Example items, e.g. a held-out sample)."
            )
        if isinstance(trainset, JsonlDataset) and trainset.transform is None:
            raise TypeError(
                f"`trainset` is {trainset!r}, whose samples are not dspy.Example: "
                "build it with transform=lambda row: dspy.Example(**row)"
                ".with_inputs(...) (and without input=/target=)."
            )
        val = _valset(valset, [])

        def check(example: Any, index: int) -> dspy.Example:
            _examples([example], "trainset", first=index)
            _check_inputs(student, [example], "trainset", first=index)
            return example

        return stream_rows(trainset, check, keep=2 * self.batch_size), val

    def _backward(self) -> tuple[ChatCompletionModel, dict[str, Any]]:
        """The backward client and its completion arguments, ``model`` settled
        before any LM call (see :func:`_training.model_args`)."""
        how = "completion_args={'model': 'gpt-4o-mini'} to AfnioTGD"
        if self.backward_lm is not None:
            client, brought = _client(self.backward_lm, "backward_lm")
            args = model_args(
                client,
                {**brought, **self.completion_args},
                what="AfnioTGD's backward_lm",
                how=how,
            )
            return client, args
        try:
            current = get_backward_model_client()
        except RuntimeError:
            current = None
        if current is not None:
            args = {**current._completion_args, **self.completion_args}
            args = model_args(
                current.client,
                args,
                what="afnio's backward client",
                default=client_model(current),
                how=f"{how}, or set afnio.set_backward_model_client(client, "
                "completion_args={'model': ...})",
            )
            return current.client, args
        if dspy.settings.lm is not None:
            return DSPyLM(dspy.settings.lm), dict(self.completion_args)
        raise ValueError(
            "AfnioTGD needs an LM to write feedback: pass backward_lm=dspy.LM(...), "
            "configure one with dspy.configure(lm=...), or set afnio's backward "
            "client with afnio.set_backward_model_client(...)."
        )

    def graph_shape(
        self,
        student: dspy.Module,
        trainset: Sequence[dspy.Example],
        *,
        metric_feedback: bool = False,
        forward_calls: int | None = None,
    ) -> GraphShape:
        """The program's graph shape for :mod:`afnio.trainer.estimate` (see
        :meth:`estimate`); also what ``Assumptions.from_rows`` needs to tune
        assumptions on a pilot's ``report.phases``. ``forward_calls``: LM calls per
        example when a predictor runs several times (ReAct, BestOfN, Refine,
        loops); default one per predictor."""
        train = _student_and_trainset(student, trainset)
        predictors = [p for _, p in student.named_predictors()]
        if not predictors:
            raise ValueError(
                "the program has no dspy.Predict to count its LM calls by (a program "
                "of AfnioModules only): estimate its afnio Modules with "
                "afnio.trainer.estimate.GraphShape.of_module instead."
            )
        adapter = dspy.ChatAdapter()
        texts: list[str] = []
        parameters: list[str] = []
        for predictor in predictors:
            signature = predictor.signature
            blanks = dict.fromkeys(signature.input_fields, "")
            demos = list(getattr(predictor, "demos", []) or [])
            texts += [m["content"] for m in adapter.format(signature, demos, blanks)]
            parameters.append(signature.instructions)
            if self.descriptions:
                parameters += [
                    _description(f) for f in signature.output_fields.values()
                ]
        calls = len(predictors) if forward_calls is None else forward_calls
        return GraphShape(
            forward_calls=calls,
            # one prompt template per predictor (a predictor run several times,
            # ReAct's, groups its chat-backward samples in one template)
            templates=min(len(predictors), calls),
            prompt_texts=tuple(texts),
            parameters=tuple(parameters),
            inputs=tuple(
                "\n".join(str(v) for v in ex.inputs().values()) for ex in train
            ),
            evaluator_feedback=not metric_feedback,
            parameter_role="instructions",
            parameters_are_messages=False,  # inside the adapter's system message
        )

    def estimate(
        self,
        student: dspy.Module,
        *,
        trainset: Sequence[dspy.Example],
        valset: Sequence[dspy.Example] | None = None,
        metric_feedback: bool = False,
        forward_calls: int | None = None,
        assumptions: Assumptions | None = None,
        models: str | Mapping[str, str] | None = None,
        tokenizer: Tokenizer = approx_tokens,
    ) -> RunEstimate:
        """What :meth:`compile` with these arguments would spend, before any LM call:
        LM calls, tokens and cost by phase (the first validation included).

        The graph shape is the program's: one LM call per predictor and example
        (``named_predictors()``), each sending the prompt DSPy's ``ChatAdapter``
        formats for its signature and demos, the instructions (and, with
        ``descriptions=True``, the output descriptions) as the trainable texts.
        ``metric_feedback=True`` for a metric that returns feedback (no
        evaluator-backward call). ``models``: one model or ``{phase: model}``; by
        default DSPy's configured LM for ``forward``. See
        :mod:`afnio.trainer.estimate` for ``assumptions``.

        Example::

            run = AfnioTGD(metric, epochs=3, batch_size=16).estimate(
                program, trainset=train, valset=val, models="gpt-4o-mini")
            print(run)  # estimated: ... LM calls, ... tokens, $...
        """
        shape = self.graph_shape(
            student,
            trainset,
            metric_feedback=metric_feedback,
            forward_calls=forward_calls,
        )
        train = _examples(trainset, "trainset")
        val = _valset(valset, train)
        if models is None:
            name = getattr(dspy.settings.lm, "model", None)
            models = {"forward": name.split("/")[-1]} if isinstance(name, str) else None
        options = resolve_backward_options(self.backward, "backward")
        with backward_options(options):  # the estimate models the run's options
            return _estimate(
                shape,
                n_train=len(train),
                n_val=len(val),
                epochs=self.epochs,
                batch_size=self.batch_size,
                validate_first=True,
                validate_every_step=self.revert_on_regression,
                momentum=self.momentum,
                constraints=self.constraints,
                assumptions=assumptions,
                models=models,
                tokenizer=tokenizer,
            )

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: Sequence[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: Sequence[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Optimize a copy of ``student`` on ``trainset``; returns the copy (with
        ``_compiled = True``). ``valset`` (default: ``trainset``) is scored before
        training and after each epoch. ``teacher`` is not used.

        A ``trainset`` larger than memory: an
        :class:`~afnio.utils.data.IterableDataset` of examples, e.g.
        ``JsonlDataset(path, transform=lambda row:
        dspy.Example(**row).with_inputs("question"))``. It is read as the training
        goes (one batch in memory), each example checked when it is read (a bad one
        ends the run naming it, ``trainset[i]`` counting the epoch's examples; a
        ``JsonlDataset`` names the file's line), every epoch again and in its own
        order (``JsonlDataset(buffer_size=..., seed=...)`` shuffles; ``seed``
        does not apply). It needs a ``valset`` (a list: it is scored as one
        batch, in memory)."""
        if kwargs:
            raise TypeError(f"compile() got unexpected arguments {sorted(kwargs)}.")
        if teacher is not None:
            raise ValueError("AfnioTGD does not use a teacher program: pass none.")
        loggers = check_loggers(self.loggers)  # as set now (checked in __init__ too)
        options = resolve_backward_options(self.backward, "backward")  # as set now
        stream: StreamRows | None = None
        if isinstance(trainset, IterableDataset):
            stream, val = self._streamed(student, trainset, valset)
            train: list[dspy.Example] = []
        else:
            train = _student_and_trainset(student, trainset)
            val = _valset(valset, train)
            _check_inputs(student, train, "trainset")
        if val is not train:
            _check_inputs(student, val, "valset")
        program = student.deepcopy()
        traced = trace(program, descriptions=self.descriptions)
        backward, args = self._backward()
        optimizer_client, optimizer_args = backward, args
        if self.optimizer_lm is not None:
            optimizer_client, brought = _client(self.optimizer_lm, "optimizer_lm")
            optimizer_args = model_args(
                optimizer_client,
                {**brought, **self.completion_args},
                what="AfnioTGD's optimizer_lm",
                default=args.get("model") if optimizer_client is backward else None,
                how="completion_args={'model': 'gpt-4o-mini'} to AfnioTGD",
            )

        def make_optimizer() -> TGD:
            return TGD(
                traced.parameters(),
                model_client=optimizer_client,
                constraints=list(self.constraints) or None,
                momentum=self.momentum,
                **optimizer_args,
            )

        examples: dict[str, Any] = {
            "train": stream.rows if stream is not None else train,
            "val": val,
        }
        names = {"train": "trainset", "val": "trainset" if val is train else "valset"}
        agent = _ProgramAgent(
            traced, self.metric, examples, names, make_optimizer, self.best_score
        )
        before_texts = traced.instructions()
        # every backward pass of the run reads the options from this context
        with backward_model_client(backward, args), backward_options(options):
            outcome = train_agent(
                agent,
                n_train=len(train),
                n_val=len(val),
                score_key="val_score",
                clients=[traced.usage],
                epochs=self.epochs,
                batch_size=self.batch_size,
                seed=self.seed,
                max_cost=self.max_cost,
                revert_on_regression=self.revert_on_regression,
                progress=self.progress,
                root_dir=self.root_dir,
                train_stream=stream,
                loggers=loggers,
            )
        traced.write_back()
        program._compiled = True
        self.report = outcome.report(
            before_texts, traced.instructions(), agent.failed_samples
        )
        return program
