"""``optimize(chain, trainset, metric)``: prompt optimization for users who do not write
an afnio Module.

The chain is traced (:func:`trace`), trained with TGD through the
:class:`~afnio.trainer.Trainer` (progress, ``max_cost``, ``revert_on_regression``), the
improved prompts are written back into the user's own chain, and a report tells the
scores before and after, the prompt diff, and the LM calls, tokens and cost, and
names the run's HTML report (``run_log.jsonl`` and ``report.html`` in the run's
folder; ``loggers=`` adds e.g. MLflow tracking).

Before any LM call, ``optimize`` checks the rows of ``trainset``/``valset``
(:mod:`afnio_integrations._rows`: pairs, LangSmith examples, dict rows with
``label_key=``) against the chain's entry prompt, and settles the ``model=`` of the
backward and optimizer clients. During the run, only transient failures are retried
(see :class:`afnio.errors.StepError`); an error of the metric or of the chain on one
row ends the run at once, naming the row (``trainset[2]``).
"""

from __future__ import annotations

import builtins
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from afnio._secrets import mask_url
from afnio._variable import Variable
from afnio.autodiff.decorators import evaluator
from afnio.autodiff.evaluator import DeterministicEvaluator
from afnio.autodiff.function import Function
from afnio.autodiff.options import (
    BackwardOptions,
    backward_options,
    check_evaluator_feedback,
    get_backward_options,
    resolve_backward_options,
)
from afnio.errors import is_provider_error, note_client, request_url, tag_sample
from afnio.models.model import ChatCompletionModel
from afnio.optim import TGD
from afnio.utils.data import IterableDataset, JsonlDataset
from afnio_integrations._metric_feedback import direct_metric_feedback_texts
from afnio_integrations._report import OptimizeReport
from afnio_integrations._rows import (
    Row,
    chain_rows,
    check_inputs,
    entry_variables,
    normalize_rows,
    row_checker,
    short_repr,
)
from afnio_integrations._training import (
    SplitAgent,
    StreamRows,
    check_loggers,
    client_model,
    model_args,
    needs_model,
    stream_rows,
    train_agent,
)
from afnio_integrations.langchain._discovery import Selector
from afnio_integrations.langchain._langgraph import (
    AgentOutput,
    graph_input,
    is_graph,
)
from afnio_integrations.langchain._traced import (
    BATCH_INDEX_ATTRIBUTE,
    TracedChain,
    _wrapped,
    trace,
)

__all__ = ["OptimizeReport", "optimize"]


@evaluator
class MetricFeedback(Function):
    """An evaluator built from a metric's own results: ``(score, feedback)`` per
    sample (``feedback`` ``""`` where the metric gave none). No LM call is made to
    write the feedback, whatever the backward options; what the prediction's
    gradient holds depends on the evaluator feedback mode (``feedback_mode``, or,
    when ``None``, the active ``afnio.get_backward_options().evaluator_feedback``,
    read at backward time):

    * ``"lm"`` (upstream): the metric's textual feedback *is* the gradient of the
      prediction; a sample without feedback gets none.
    * ``"direct"`` (``optimize()``'s cheap default): a sample with feedback gets what
      a deterministic evaluator writes itself
      (:data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_FEEDBACK`: the metric's name
      ``purpose``, the prediction, its score and its target) followed by the
      metric's text (:data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_DETAIL`; the
      metric's text comes first when the target is not a plain value, see
      :mod:`afnio_integrations._metric_feedback`); a sample without feedback whose
      score is not ``best_score`` (every such sample when ``best_score`` is
      ``None``) gets the direct sentence alone, as the deterministic evaluator
      gives it. Without ``targets`` there is nothing to state: the metric's text
      alone, as in ``"lm"`` mode.

    A sample with feedback gets it at any score (a metric may confirm a right
    answer, as :func:`~afnio_integrations.langchain.trajectory_match` does).
    """

    run_backward_inline = True

    @staticmethod
    def forward(
        ctx: Any,
        prediction: Variable,
        scores: list[Any],
        feedback: list[str],
        targets: list[str] | None = None,
        purpose: str = "the metric",
        best_score: Any = 1,
        *,
        feedback_mode: Literal["lm", "direct"] | None = None,
    ) -> tuple[Variable, Variable]:
        if feedback_mode is not None:
            check_evaluator_feedback(feedback_mode, "feedback_mode")
        ctx.feedback = [str(f) for f in feedback]
        ctx.batched = isinstance(prediction.data, list)
        ctx.role = prediction.role
        predictions = prediction.data if ctx.batched else [prediction.data]
        if targets is not None and not (
            len(targets) == len(scores) == len(feedback) == len(predictions)
        ):
            raise ValueError(
                "`targets`, `scores` and `feedback` must have one entry per sample "
                f"({len(predictions)}); got {len(targets)}, {len(scores)} and "
                f"{len(feedback)}."
            )
        # what direct_feedback_texts reads (afnio.autodiff.evaluator)
        ctx.scores = list(scores)
        ctx.predictions = [str(p) for p in predictions]
        ctx.targets = None if targets is None else [str(t) for t in targets]
        ctx.purpose = purpose
        ctx.success_fn = None
        ctx.best = best_score
        ctx.feedback_mode = feedback_mode
        text = "\n".join(f for f in ctx.feedback if f)
        return (
            Variable(
                builtins.sum(scores), role=f"Evaluation result score of {ctx.role}"
            ),
            Variable(text, role=f"Evaluation result explanation of {ctx.role}"),
        )

    @staticmethod
    def backward(ctx: Any, score_grad: Any, explanation_grad: Any) -> tuple[Any, ...]:
        mode = ctx.feedback_mode or get_backward_options().evaluator_feedback
        if mode == "direct" and ctx.targets is not None:
            pairs = zip(ctx.feedback, ctx.scores, strict=True)
            chosen = [
                s
                for s, (f, score) in enumerate(pairs)
                if f.strip() or ctx.best is None or score != ctx.best
            ]
            texts = direct_metric_feedback_texts(
                ctx, explanation_grad, ctx.feedback, chosen
            )
        else:  # upstream: the metric's own text, as it gave it
            texts = ctx.feedback
        rest = (None,) * (len(ctx.needs_input_grad) - 1)  # one per forward input
        if not any(texts):
            return (None, *rest)
        data: Any = texts if ctx.batched else texts[0]
        return (Variable(data, role=f"feedback to {ctx.role}"), *rest)


def _chain_models(chain: Any) -> list[Any]:
    """The language models in the chain's graph (what its own LM calls go to),
    those behind a binding (``bind``, ``with_retry``) or ``with_fallbacks``
    included."""
    from langchain_core.language_models import BaseLanguageModel

    models: list[Any] = []
    try:
        nodes = chain.get_graph().nodes.values()
    except Exception:  # a chain whose graph cannot be drawn: name no model
        return models
    pending = [node.data for node in nodes]
    seen: set[int] = set()
    while pending:
        data = pending.pop(0)
        if id(data) in seen:
            continue
        seen.add(id(data))
        if isinstance(data, BaseLanguageModel):
            models.append(data)
            continue
        for attr in ("bound", "runnable"):  # RunnableBinding, RunnableWithFallbacks
            inner = getattr(data, attr, None)
            if inner is not None:
                pending.append(inner)
        fallbacks = getattr(data, "fallbacks", None)
        if isinstance(fallbacks, (list, tuple)):
            pending.extend(fallbacks)
    return models


def _base_url(model: Any) -> str | None:
    """The base URL a LangChain model sends its requests to (unmasked), if known."""
    for attr in ("openai_api_base", "base_url", "anthropic_api_url", "api_base"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    value = getattr(getattr(model, "root_client", None), "base_url", None)
    return str(value) if value is not None else None


def _describe_model(model: Any) -> str:
    """``ChatOpenAI (model 'gpt-4o-mini', base URL https://...)``, no credentials."""
    name = client_model(model)
    url = _base_url(model)
    parts = [f"model {name!r}"] if name else []
    if url is not None:
        parts.append(f"base URL {mask_url(url)}")
    return type(model).__name__ + (f" ({', '.join(parts)})" if parts else "")


def _failed_model(chain: Any, error: BaseException) -> str:
    """Which of the chain's own models failed, for the note of a provider error.

    The failed request's URL, when the exception tells it (``e.request.url`` of an
    openai/httpx error), is exact wherever the model sits (a sub-chain in a lambda,
    a fallback): the model of the chain's graph whose base URL it starts with is
    named, with the URL. Without a URL, the graph's models are listed."""
    models = _chain_models(chain)
    url = request_url(error)
    if url is not None:
        found = [
            m
            for m in models
            if (base := _base_url(m)) and url.startswith(base.rstrip("/"))
        ]
        names = list(dict.fromkeys(_describe_model(m) for m in found))
        shown = mask_url(url)
        if len(names) == 1:
            return f"the chain's own model {names[0]}, request to {shown}"
        return f"the chain's own LM request to {shown}"
    if models:
        return "the chain's own model " + " or ".join(
            dict.fromkeys(_describe_model(m) for m in models)
        )
    return "the chain's own LM (its URL unknown)"


def _failing_row(error: BaseException, inputs: Sequence[Any]) -> int | None:
    """The index of the input of ``traced.batch(inputs)`` whose run raised
    ``error`` (:meth:`TracedChain.batch` marks it), ``None`` when unknown."""
    index = getattr(error, BATCH_INDEX_ATTRIBUTE, None)
    if isinstance(index, int) and 0 <= index < len(inputs):
        return index
    return None


def _check_result(result: Any, where: str, name: str) -> tuple[float, str] | float:
    """A metric result as a score, or ``(score, feedback)`` (``None`` feedback is
    no feedback).

    Raises:
        TypeError: the result is neither a number nor ``(number, str | None)``.
        ValueError: the score is NaN.
    """
    expected = (
        f"{name} must return a score (bool, int or float) or (score, feedback text)"
    )
    feedback: Any = None
    pair = isinstance(result, tuple)
    if pair:
        if len(result) != 2:
            raise TypeError(
                f"{expected}; on {where} it returned a tuple of {len(result)} items "
                f"({short_repr(result)})."
            )
        result, feedback = result
        if feedback is not None and not isinstance(feedback, str):
            raise TypeError(
                f"{expected}; on {where} its feedback is {short_repr(feedback)}, "
                "not a str (or None for no feedback)."
            )
    if isinstance(result, (str, bytes)) or not (
        isinstance(result, numbers.Real) or hasattr(result, "__float__")
    ):  # numpy scalars included
        raise TypeError(f"{expected}; on {where} it returned {short_repr(result)}.")
    if math.isnan(float(result)):
        raise ValueError(f"{name} returned a NaN score on {where}.")
    if pair:
        return result, feedback or ""
    return result


class _ChainAgent(SplitAgent):
    def __init__(
        self,
        traced: TracedChain,
        metric: Callable[..., Any],
        pairs: dict[str, Any],  # split -> rows by index (a list, or a stream's dict)
        names: dict[str, str],
        optimizer: Callable[[], Any],
        best_score: Any,
        is_evaluator: bool,
    ) -> None:
        super().__init__(optimizer)
        self.traced = traced
        object.__setattr__(self, "_metric", metric)
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_best", best_score)
        object.__setattr__(self, "_is_evaluator", is_evaluator)

    def forward(self, inputs: list[Any]) -> Variable:
        return self.traced.batch(inputs)

    def _run_chain(self, inputs: list[Any], split: str, indices: list[int]) -> Variable:
        """The chain on the batch; an error names the row (the batch's rows when it
        cannot be told) and, for a provider error, the chain's own model that
        failed."""
        try:
            return self(inputs)
        except Exception as e:
            if is_provider_error(e):  # the service failed, not one row
                note_client(e, _failed_model(self.traced.chain, e))
            else:
                row = _failing_row(e, inputs)
                rows = indices if row is None else indices[row]
                tag_sample(e, dataset=self._names[split], index=rows)
            raise

    def _outputs(self, texts: list[str]) -> list[str]:
        """What the metric sees of each output: its text; for an agent or graph an
        :class:`~afnio_integrations.langchain.AgentOutput` (the text, with the final
        state and its messages, the trajectory)."""
        if not self.traced.is_graph:
            return texts
        states = self.traced.last_results
        if len(states) != len(texts):  # never expected: the batch's own results
            states = [None] * len(texts)
        return [AgentOutput(t, s) for t, s in zip(texts, states, strict=True)]

    def _step(self, batch: Any, split: str) -> dict[str, Any]:
        indices = [int(i) for i in batch[0]]
        dataset = self._names[split]
        rows = [self._pairs[split][i] for i in indices]
        prediction = self._run_chain([inputs for inputs, _ in rows], split, indices)
        targets = [str(target) for _, target in rows]
        results = []
        if not self._is_evaluator:
            name = getattr(self._metric, "__name__", "the metric")
            outputs = self._outputs([str(p) for p in prediction.data])
            for i, p, t in zip(indices, outputs, targets, strict=True):
                try:
                    results.append(
                        _check_result(self._metric(p, t), f"{dataset}[{i}]", name)
                    )
                except Exception as e:  # a bug in the metric: name the row
                    tag_sample(e, dataset=dataset, index=i, stage="metric")
                    raise
        try:
            if self._is_evaluator:
                score, explanation = self._metric(prediction, targets)
            elif any(isinstance(r, tuple) for r in results):
                # the metric returned (score, textual feedback): use its feedback
                pairs = [r if isinstance(r, tuple) else (r, "") for r in results]
                score, explanation = MetricFeedback.apply(
                    prediction,
                    [p[0] for p in pairs],
                    [p[1] for p in pairs],
                    targets,
                    name,
                    self._best,
                )
            else:
                score, explanation = DeterministicEvaluator.apply(
                    prediction,
                    targets,
                    self._metric,
                    getattr(self._metric, "__name__", "the metric"),
                    None,
                    builtins.sum,
                    "summation",
                    best_score=self._best,
                )
        except Exception as e:
            tag_sample(e, dataset=dataset, index=indices, stage="metric")
            raise
        return {"loss": (score, explanation), "accuracy": float(score.data) / len(rows)}


def _clients(
    model_client: ChatCompletionModel | None, completion_args: dict[str, Any]
) -> tuple[ChatCompletionModel, dict[str, Any]]:
    """The optimizer's client and completion arguments, ``model`` settled (see
    :func:`optimize`); the backward client is checked to have a model too."""
    from afnio._model_client import ModelClientSingleton, get_backward_model_client

    try:
        backward = get_backward_model_client()
    except RuntimeError:
        raise ValueError(
            "optimize() needs afnio's backward client, the LM that writes the "
            "feedback: call afnio.set_backward_model_client(client, "
            "completion_args={'model': ...}) first (no LM call was made)."
        ) from None
    if isinstance(model_client, ModelClientSingleton):
        # afnio.get_backward_model_client(): the client it wraps, with its model
        # and completion arguments (those given here win)
        if model_client is backward:
            model_client = None
        else:
            completion_args = {**model_client._call_args({}), **completion_args}
            model_client = model_client.client
    backward_model = client_model(backward)
    if backward_model is None and needs_model(backward.client):
        raise ValueError(
            f"afnio's backward client {backward.client!r} has no model: set one with "
            "afnio.set_backward_model_client(client, completion_args={'model': "
            "'gpt-4o-mini'}) (no LM call was made)."
        )
    client = backward.client if model_client is None else model_client
    same = client is backward.client or client is backward
    args = model_args(
        client,
        completion_args,
        what="the optimizer client",
        default=backward_model if same else None,
        how="model='gpt-4o-mini' (optimize(chain, trainset, metric, model=...))",
    )
    return client, args


def optimize(
    chain: Any,
    trainset: Iterable[Any],
    metric: Callable[..., Any],
    *,
    valset: Iterable[Any] | None = None,
    input_keys: Sequence[str] | None = None,
    label_key: str | None = None,
    model_client: ChatCompletionModel | None = None,
    epochs: int = 3,
    batch_size: int = 16,
    seed: int = 0,
    select: Selector | None = None,
    output_key: str | None = None,
    best_score: Any = 1,
    max_cost: float | None = None,
    revert_on_regression: bool = False,
    root_dir: str | None = None,
    progress: bool = True,
    loggers: Sequence[Any] | None = None,
    backward: BackwardOptions | Literal["cheap", "upstream"] = "cheap",
    **completion_args: Any,
) -> tuple[Any, OptimizeReport]:
    """Improve the prompts of ``chain`` on ``trainset``; returns ``(chain, report)``.

    Args:
        chain: the user's LangChain chain, ``create_agent`` agent or compiled
            LangGraph graph (its texts are updated in place: the same object sends
            the new texts afterwards).
        trainset: the rows to train on (a list, or an
            :class:`~afnio.utils.data.IterableDataset` read as a stream, see below),
            each one of (every row of a set is read the same way):

            * ``(inputs, target)``: ``inputs`` is what ``chain.invoke`` takes (a
              dict, or a str for a chain whose prompt has one input variable);
            * a LangSmith-style example ``{"inputs": {...}, "outputs": {...}}``, or
              an object with ``.inputs``/``.outputs`` (``langsmith`` ``Example``):
              the target is the single value of ``outputs`` (or
              ``outputs[label_key]``);
            * a dict row such as ``{"message": ..., "label": ...}``, only with
              ``label_key=`` (and ``input_keys=``).

            Anything else raises ``TypeError``/``ValueError`` naming the row, before
            any LM call (see :mod:`afnio_integrations._rows`: e.g. a ``set`` of rows,
            inputs that are neither a dict nor a str, a dict or list target); so do
            inputs that lack a variable of the chain's first prompt.

            A trainset larger than memory: ``JsonlDataset(path)`` (no ``input=``:
            its rows are dicts, read with ``label_key=``), or any IterableDataset of
            rows. It is read as the training goes, one batch in memory, each row
            checked when it is read (a bad row ends the run naming it,
            ``trainset[i]`` counting the epoch's rows, and a ``JsonlDataset`` names
            the file's line); every epoch reads it again, in its own order
            (``JsonlDataset(buffer_size=..., seed=...)`` shuffles; ``seed=`` here
            does not apply). It needs a ``valset``, which is a list: the valset is
            scored as one batch, in memory.
        metric: ``metric(prediction: str, target: str) -> score`` (e.g. 1/0), or
            ``-> (score, feedback)`` whose text is then used as the feedback itself
            (no LM call writes it; ``None`` is no feedback); anything else (``None``,
            a str, a NaN score) ends the run naming the row; or an afnio evaluator
            function such as
            ``afnio.functional.exact_match_evaluator``. For an agent or graph the
            prediction is an :class:`~afnio_integrations.langchain.AgentOutput`:
            the final answer's text, with ``.state`` (the final state) and
            ``.messages`` (the trajectory), e.g. for
            :func:`~afnio_integrations.langchain.trajectory_match`; a ``str`` row
            input is the user's message (``{"messages": [...]}``).
        valset: rows scored before and after (and per epoch), read as
            ``trainset``; default ``trainset`` (required when ``trainset`` is a
            stream).
        input_keys: for dict rows, the keys given to the chain (default: every key
            but ``label_key``); for examples, the inputs kept (default: all).
        label_key: the key (of a dict row, or of an example's ``outputs``) holding
            the target.
        model_client: the LM that writes new prompts (TGD's optimizer client); by
            default the backward client set with ``afnio.set_backward_model_client``
            (which writes the feedback in either case). The wrapper
            ``afnio.get_backward_model_client()`` returns stands for the client it
            holds, with its ``model``.
        epochs, batch_size, seed: the training loop (shuffled with ``seed``).
        select: which texts to optimize (see :func:`trace`; by default the system
            prompts of a chain, and the system prompts and tool descriptions of an
            agent or graph).
        output_key: for a graph, the final state's key that is its output (see
            :func:`trace`).
        best_score: a sample's best metric value (no feedback is asked for it).
        max_cost, revert_on_regression: as for :class:`~afnio.trainer.Trainer`.
        root_dir: where the run log (``run_log.jsonl``), the HTML report
            (``report.html``), metrics and checkpoints go. Default: a new folder
            ``afnio-optimize-*`` in the system's temporary folder
            (``tempfile.gettempdir()``), without checkpoints; it is not deleted,
            so the report outlives the call. ``report.run_dir`` and
            ``report.report_path`` name them.
        progress: show the Trainer's progress bar and run summary.
        loggers: where the Trainer also sends each step's record (the
            Trainer's ``loggers=``): a list of loggers, e.g.
            ``[MLflowLogger(tracking_uri="sqlite:///mlflow.db")]`` from
            ``afnio.trainer.loggers``. ``None`` (default): the run log and a CSV
            logger; ``[]``: the run log only. The run log is always written (the
            report is built from it). Anything but a list of objects with
            ``start``, ``log_step``, ``log_validation``, ``finish`` and
            ``state_dict`` raises ``TypeError`` before any LM call.
        backward: how the backward passes write their feedback
            (:class:`afnio.BackwardOptions`): ``"cheap"`` (the default here) or
            ``"upstream"``, or a ``BackwardOptions(...)`` (``None``: the options
            active around the call, ``afnio.backward_options(...)``). ``"cheap"``: a
            deterministic metric's feedback on each failed row is written directly
            from the prediction, the target, the metric's name and score (no
            evaluator-backward LM call, no LM round; a metric's own feedback text
            follows that sentence, see :class:`MetricFeedback`; ``"upstream"``
            uses it alone, as before), and the chat-backward
            calls of the rows that went through the same prompt share a call, at
            most 8 rows per call (the groups sent at once). ``"upstream"``: an LM
            call writes the evaluator's feedback and each row gets its own
            chat-backward call (the core API's default, afnio's behaviour before;
            a deliberate difference: ``afnio.backward_options()`` is upstream
            unless opened, ``optimize()`` is cheap unless told). The whole run
            (validations, training steps, revert checks) runs inside
            ``afnio.backward_options(backward)``; ``str(report)`` states it on its
            ``backward:`` line. Anything else raises ``ValueError``/``TypeError``
            naming ``backward`` before any LM call.
        **completion_args: passed to every optimizer call. ``model=`` names the
            optimizer's model; by default it is the backward client's model (its
            ``completion_args["model"]``) when the optimizer client is the backward
            client, or the model the client names itself (a ``LangChainChatModel``
            or ``DSPyLM`` does; an afnio ``OpenAI`` client does not, so a different
            ``OpenAI`` client needs ``model=``). A missing model raises
            ``ValueError`` before any LM call.

    Returns:
        ``(chain, report)``: the same chain, and an :class:`OptimizeReport` whose
        ``report_path`` is the run's HTML report (``str(report)`` ends with
        ``run report: <path>``; open it in a browser: score curves, cost by phase,
        each prompt's changes with the feedback and samples behind them).

    Raises:
        TypeError, ValueError: a bad row, argument (``loggers`` too) or missing
            model (before any LM call).
        afnio.errors.StepError: a step failed: at once for an error retrying
            cannot fix (its ``__cause__``, e.g. a metric's ``KeyError``; the
            message names the row, ``trainset[2]``), after 3 attempts for a
            transient one (connection, timeout, 429/5xx; the message names the
            client and its base URL).

    Example::

        afnio.set_backward_model_client(
            "openai/gpt-4o", completion_args={"temperature": 0}
        )
        rows = [{"message": "The heater broke again.", "label": "negative"}, ...]
        chain, report = optimize(chain, rows, metric, label_key="label")
        print(report)  # ... ends with: run report: /tmp/afnio-optimize-.../report.html

    Tracking the run in MLflow too (``pip install 'afnio-local[mlflow]'``)::

        from afnio.trainer.loggers import MLflowLogger

        chain, report = optimize(
            chain, rows, metric, label_key="label", root_dir="runs/sentiment",
            loggers=[MLflowLogger(tracking_uri="sqlite:///mlflow.db",
                                  experiment="sentiment")],
        )
        print(report.report_path)  # runs/sentiment/report.html
    """
    options = resolve_backward_options(backward, "backward")
    checked_loggers = check_loggers(loggers)
    stream: StreamRows | None = None
    if isinstance(trainset, IterableDataset):
        stream, val = _streamed_rows(
            chain, trainset, valset, batch_size, input_keys, label_key
        )
        train: list[Row] = []
    else:
        train, val = chain_rows(
            chain, trainset, valset, input_keys=input_keys, label_key=label_key
        )
    # a str row is the user's message to an agent (or to a binding around it)
    if is_graph(_wrapped(chain, sequences=False)):
        train = [
            (graph_input(_wrapped(chain, sequences=False), i), t) for i, t in train
        ]
        val = [(graph_input(_wrapped(chain, sequences=False), i), t) for i, t in val]
    model_client, completion_args = _clients(model_client, completion_args)
    traced = trace(chain, select, output_key=output_key)
    pairs: dict[str, Any] = {
        "train": stream.rows if stream is not None else train,
        "val": val,
    }
    names = {"train": "trainset", "val": "trainset" if valset is None else "valset"}

    def make_optimizer() -> TGD:
        return TGD(traced.parameters(), model_client=model_client, **completion_args)

    # an afnio evaluator function returns (score, explanation) itself
    is_evaluator = getattr(metric, "__module__", "") == "afnio.cognitive.functional"
    agent = _ChainAgent(
        traced, metric, pairs, names, make_optimizer, best_score, is_evaluator
    )
    before_prompts = traced.prompts()
    # every backward pass of the run (the fit's steps; validations and revert
    # checks make none) reads the options from this context
    with backward_options(options):
        outcome = train_agent(
            agent,
            n_train=len(train),
            n_val=len(val),
            score_key="val_accuracy",
            # the chain's own LM calls, and those of afnio modules inside it, count
            # in budgets and in the report
            clients=traced.llm_clients(),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            max_cost=max_cost,
            revert_on_regression=revert_on_regression,
            progress=progress,
            root_dir=root_dir,
            train_stream=stream,
            loggers=checked_loggers,
        )
    traced.write_back()
    report = outcome.report(before_prompts, traced.prompts())
    return chain, report


def _streamed_rows(
    chain: Any,
    trainset: IterableDataset,
    valset: Iterable[Any] | None,
    batch_size: int,
    input_keys: Sequence[str] | None,
    label_key: str | None,
) -> tuple[StreamRows, list[Row]]:
    """A streamed ``trainset`` (its rows checked as they are read) and the
    ``valset``'s rows (checked now, before any LM call)."""
    if valset is None:
        raise ValueError(
            "`trainset` is a stream (an IterableDataset), so it cannot also serve as "
            "the valset, which is scored as one batch, in memory: pass "
            "valset=[...] (rows as for trainset, e.g. a held-out sample of the "
            "file)."
        )
    if isinstance(trainset, JsonlDataset) and trainset.input:
        raise TypeError(
            f"`trainset` is {trainset!r}, built with input=/target=, so its samples "
            "are afnio Variables (to feed an afnio Module). optimize() reads rows as "
            "the chain takes them: build it without input=/target= (its rows are "
            "dicts) and pass label_key= (and input_keys=)."
        )
    variables = entry_variables(chain)
    val = normalize_rows(
        valset,
        "valset",
        input_keys=input_keys,
        label_key=label_key,
        variables=variables,
    )
    check_inputs(val, "valset", variables, input_keys=input_keys)
    check = row_checker(
        "trainset", input_keys=input_keys, label_key=label_key, variables=variables
    )
    graph = _wrapped(chain, sequences=False)
    if is_graph(graph):  # a str row is the user's message to the agent
        plain = check

        def check(row: Any, index: int) -> Row:
            inputs, target = plain(row, index)
            return graph_input(graph, inputs), target

    return stream_rows(trainset, check, keep=2 * batch_size), val
