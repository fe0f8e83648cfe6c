"""Estimate a training run's LM calls, tokens and cost before spending anything.

Where :mod:`afnio.trainer.projection` scales a pilot run's measured rates, this module
needs no LM call at all. It counts from what is known before a run:

* the **graph shape** (:class:`GraphShape`): how many LM calls the program makes per
  sample, the instructions those calls send, the trainable texts (one optimizer call
  each per step), whether an LM judge scores, whether the metric's own feedback is
  the gradient;
* the **data**: the dataset sizes and representative sample inputs;
* the **run**: epochs, batch size, a validation pass per epoch;
* **pricing** (:mod:`afnio.models.pricing`) for each phase's model;
* a few **assumptions** (:class:`Assumptions`), chiefly the share of training samples
  that fail and so get backward calls, and how long the texts the LMs write are.

Calls follow afnio's own rules (per-sample skip: only failed samples get backward
calls; the evaluator's feedback in groups of ``samples_per_call``; one chat-backward
call per failed sample and LM call; one optimizer call per parameter with feedback);
failures are counted as a binomial draw per batch, so the last, smaller batch and the
grouping are counted exactly in expectation. Prompt tokens are counted on afnio's real
prompt templates, rendered with texts of the assumed sizes.

The backward follows the :class:`~afnio.autodiff.options.BackwardOptions` the run
will use (``backward=``; by default the active ones,
:func:`afnio.autodiff.options.get_backward_options`, read when the estimate runs, so
``with afnio.backward_options("cheap"): trainer.estimate(...)`` estimates a cheap
fit):

* ``evaluator_feedback="direct"``: a deterministic evaluator writes each failed
  sample's feedback itself (no evaluator-backward call); the chat backward shows that
  text (:data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_FEEDBACK`) as the feedback.
  An LM judge (``judge_calls``) keeps its LM-written feedback;
* ``chat_samples_per_call=n > 1``: per prompt template (:attr:`GraphShape.templates`)
  and batch, the ``k`` failed samples' chat-backward requests go in
  ``ceil(k / n)`` calls (sizes as
  :func:`~afnio.autodiff.lm_backward.split_evenly` makes them), each sized on the
  grouped prompt (:data:`~afnio.autodiff.prompts.CHAT_BACKWARD_GROUP_SYSTEM` and
  :func:`~afnio.autodiff.lm_backward.chat_backward_group_user`): the shared system
  message and the variables once per call, each sample's own message, output and
  feedback once per sample. A group of one is the single-call prompt.

The estimate says which options it assumed (:attr:`RunEstimate.backward`).

Tokens are counted by ``tokenizer`` (default :func:`approx_tokens`, about 4 characters
a token, the usual rule of thumb for English with OpenAI's tokenizers), plus 3 tokens
per message of a request. Pass the tokenizer of the model you price for exact counts.

Example::

    >>> from afnio.trainer.estimate import Assumptions, GraphShape, estimate
    >>> shape = GraphShape(
    ...     forward_calls=1,
    ...     prompt_texts=("Classify the sentiment of the message.",),
    ...     parameters=("Classify the sentiment of the message.",),
    ...     inputs=("The heating is broken again.", "Thanks for the quick fix!"),
    ... )
    >>> run = estimate(shape, n_train=64, n_val=32, epochs=2, batch_size=8,
    ...                assumptions=Assumptions(failure_rate=0.25), models="gpt-4o-mini")
    >>> run.by_phase["forward"].calls   # 2 x 64 training + 2 x 32 validation samples
    192
    >>> run.by_phase["optimizer"].calls  # 16 steps x P(a batch of 8 has a failure)
    14
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from afnio._template import render
from afnio.autodiff import config
from afnio.autodiff.lm_backward import (
    ChatBackwardItem,
    VariableInfo,
    chat_backward_group_user,
    chat_backward_user,
    split_evenly,
)
from afnio.autodiff.lm_backward import format_variables as _format_variables
from afnio.autodiff.options import BackwardOptions, resolve_backward_options
from afnio.autodiff.prompts import (
    CHAT_BACKWARD_GROUP_SYSTEM,
    CHAT_BACKWARD_SYSTEM,
    DIRECT_EVALUATOR_FEEDBACK,
    EVALUATOR_BACKWARD_SYSTEM,
    EVALUATOR_BACKWARD_USER,
    EVALUATOR_SAMPLE_ELEMENT,
    PREDICTION_PLACEHOLDER,
)
from afnio.models.phases import PHASES, PhaseRow
from afnio.models.pricing import (
    ModelPrice,
    calculate_cost,
    get_batch_price,
    get_model_price,
)
from afnio.optim.prompts import TGD_SYSTEM, TGD_USER
from afnio.trainer.projection import (
    PhaseProjection,
    RunProjection,
    _batches,
    _binomial,
)

__all__ = [
    "Assumptions",
    "GraphShape",
    "RunEstimate",
    "Tokenizer",
    "approx_tokens",
    "estimate",
    "estimate_pass",
]

Tokenizer = Callable[[str], int]

MESSAGE_OVERHEAD_TOKENS = 3
"""Tokens a chat request adds per message (role and separators)."""


def approx_tokens(text: str) -> int:
    """About 4 characters a token (OpenAI's rule of thumb for English text).

    >>> approx_tokens("Classify the sentiment of the message.")
    10
    """
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class GraphShape:
    """What one sample costs the program, known without running it.

    Attributes:
        forward_calls: LM calls the program makes per sample.
        prompt_texts: every instruction text the forward calls send (system
            prompts, templates); their total divided by ``forward_calls`` is one
            call's.
        parameters: the trainable texts (each gets one optimizer call per step that
            gave it feedback).
        inputs: representative sample inputs (their mean size is used), e.g. every
            training input.
        judge_calls: LM-judge calls per sample (``LMJudgeEvaluator``).
        judge_texts: the judge's instructions (mean used).
        evaluator_feedback: whether the evaluator asks the backward LM for feedback
            on failed samples (``False`` when a metric's own feedback text is the
            gradient, as with a ``(score, feedback)`` metric).
        parameter_role: the role shown in backward and optimizer prompts.
        parameters_are_messages: whether each trainable text is a whole message (a
            system prompt: a backward prompt shows it once); ``False`` when it is part
            of a larger message (DSPy instructions inside the adapter's system
            message: shown again as the variable).
        templates: the distinct prompt templates the ``forward_calls`` go through
            (default ``forward_calls``: each call its own). With grouped chat
            backward (``chat_samples_per_call > 1``) the chat-backward requests of
            one template share calls: an agent that calls its model twice per input
            through one system prompt has ``forward_calls=2, templates=1``.
    """

    forward_calls: int
    prompt_texts: tuple[str, ...]
    parameters: tuple[str, ...]
    inputs: tuple[str, ...] = ("",)
    judge_calls: int = 0
    judge_texts: tuple[str, ...] = ()
    evaluator_feedback: bool = True
    parameter_role: str = "system prompt"
    parameters_are_messages: bool = True
    templates: int | None = None

    def __post_init__(self) -> None:
        if self.templates is None:
            object.__setattr__(self, "templates", self.forward_calls)
        for name, low in (("forward_calls", 1), ("judge_calls", 0), ("templates", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"`{name}` must be an int >= {low} (LM calls per sample), got "
                    f"{value!r}."
                )
        for name in ("prompt_texts", "parameters", "inputs", "judge_texts"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(t, str) for t in value):
                raise TypeError(f"`{name}` must be a tuple of str, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        if not self.parameters:
            raise ValueError(
                "`parameters` is empty: there is nothing to optimize (give the "
                "trainable texts)."
            )
        if not self.prompt_texts:
            raise ValueError("`prompt_texts` must hold at least one text.")
        if self.judge_calls and not self.judge_texts:
            raise ValueError("`judge_texts` must be given when `judge_calls` > 0.")
        if self.templates > self.forward_calls:
            raise ValueError(
                f"`templates` ({self.templates}) must be <= `forward_calls` "
                f"({self.forward_calls}): each template is used by at least one call."
            )

    @property
    def calls_per_template(self) -> float:
        """Forward calls per sample through each template (each gets a
        chat-backward request per failed sample)."""
        return self.forward_calls / self.templates  # type: ignore[operator]

    @classmethod
    def of_module(cls, agent: Any, inputs: Iterable[Any] = ()) -> GraphShape:
        """The shape of an afnio Module: one forward LM call per ``ChatCompletion``
        submodule, one judge call per ``LMJudgeEvaluator`` submodule, its Parameters
        that require grad as the trainable texts, those and its text buffers (the
        templates) as the instructions. ``inputs``: sample inputs (str, Variables,
        or dataset items whose first element is the input).

        A program that calls ``afnio.cognitive.functional.chat_completion`` directly
        has no submodule to count: build the :class:`GraphShape` yourself.
        """
        from afnio._variable import Variable
        from afnio.cognitive.modules.lm import (
            ChatCompletion,
            DeterministicEvaluator,
            ExactMatchEvaluator,
            LMJudgeEvaluator,
        )

        evaluators = (DeterministicEvaluator, ExactMatchEvaluator, LMJudgeEvaluator)

        modules = list(agent.modules())
        calls = sum(isinstance(m, ChatCompletion) for m in modules)
        if not calls:
            raise ValueError(
                f"{type(agent).__name__} has no ChatCompletion submodule to count its "
                "LM calls by: pass a GraphShape(forward_calls=..., ...) instead."
            )
        parameters = tuple(str(p.data) for p in agent.parameters() if p.requires_grad)
        buffers = tuple(  # templates; an evaluator's buffers name its functions
            b.data
            for m in modules
            if not isinstance(m, evaluators)
            for b in m.buffers(recurse=False)
            if isinstance(b, Variable) and isinstance(b.data, str)
        )
        judge = sum(isinstance(m, LMJudgeEvaluator) for m in modules)
        texts = []
        for item in inputs:
            if isinstance(item, tuple) and item:
                item = item[0]
            if isinstance(item, Variable):
                item = item.data
            texts.append(str(item))
        return cls(
            forward_calls=calls,
            prompt_texts=parameters + buffers,
            parameters=parameters,
            inputs=tuple(texts) or ("",),
            judge_calls=judge,
            judge_texts=(buffers + parameters) if judge else (),
        )


@dataclass(frozen=True)
class Assumptions:
    """What cannot be known before a run (defaults are deliberately cautious).

    Attributes:
        failure_rate: the share of training samples that do not get the best score
            (and so get backward calls). Use ``1 - accuracy`` of a first validation
            when you have one; ``1.0`` gives the most a run can cost.
        answer_tokens: tokens of one forward answer (a label: a few tokens).
        feedback_tokens: tokens of one feedback text written by the backward LM
            (and of an LM judge's explanation).
        growth_per_failure_tokens: tokens a parameter grows by per failed sample
            whose feedback the optimizer folds in (a batch with more failures
            teaches it more at once).
        max_growth_tokens: how much a parameter grows at most in a run (an
            optimizer folds new feedback into what is there rather than appending
            forever); every later call that shows the parameter carries its growth.
        samples_per_call: failed samples per evaluator-backward call (default
            :data:`afnio.autodiff.config.EVALUATOR_SAMPLES_PER_CALL`).
    """

    failure_rate: float = 0.5
    answer_tokens: int = 8
    feedback_tokens: int = 60
    growth_per_failure_tokens: float = 5.0
    max_growth_tokens: int = 200
    samples_per_call: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "failure_rate",
            "answer_tokens",
            "feedback_tokens",
            "growth_per_failure_tokens",
            "max_growth_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"`{name}` must be a number, got {value!r}.")
        per_call = self.samples_per_call
        if per_call is not None and (
            isinstance(per_call, bool) or not isinstance(per_call, int)
        ):
            raise TypeError(f"`samples_per_call` must be an int, got {per_call!r}.")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(
                f"`failure_rate` must be between 0 and 1, got {self.failure_rate!r}."
            )
        for name in (
            "answer_tokens",
            "feedback_tokens",
            "growth_per_failure_tokens",
            "max_growth_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0.")
        if self.samples_per_call is not None and self.samples_per_call < 1:
            raise ValueError("`samples_per_call` must be >= 1.")

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[PhaseRow],
        *,
        shape: GraphShape,
        train_samples: int,
        failure_rate: float,
        final_parameters: Sequence[str] | None = None,
        tokenizer: Tokenizer = approx_tokens,
        backward: BackwardOptions | str | None = None,
        **overrides: Any,
    ) -> Assumptions:
        """Assumptions tuned on a pilot run's phase rows (``trainer.phase_rows()``
        or ``LEDGER.since(...)``): answer and feedback lengths and the parameters'
        growth are read off its completion tokens. ``failure_rate`` is the pilot's
        (``1 -`` its training accuracy); ``train_samples`` the training samples it
        ran (over all its epochs); ``final_parameters`` the trainable texts after the
        pilot (how far they grew; without them the growth assumptions keep their
        defaults); ``backward``: the :class:`~afnio.autodiff.options.BackwardOptions`
        the pilot ran with (``"cheap"``, ``"upstream"``, or options; default: the
        active ones), which say whether its backward rows hold LM-written evaluator
        feedback; ``overrides`` set any other field."""
        options = resolve_backward_options(backward)
        totals: dict[str, list[int]] = {}
        for row in rows:
            t = totals.setdefault(row.phase, [0, 0])
            t[0] += row.calls
            t[1] += row.completion_tokens
        values: dict[str, Any] = {"failure_rate": failure_rate}
        forward = totals.get("forward")
        if forward and forward[0]:
            values["answer_tokens"] = round(forward[1] / forward[0])
        failed = failure_rate * train_samples
        backward = totals.get("backward")
        if backward and failed > 0:
            texts = failed * (
                shape.forward_calls + int(_evaluator_lm_feedback(shape, options))
            )
            values["feedback_tokens"] = round(backward[1] / texts)
        optimizer = totals.get("optimizer")
        if final_parameters is not None:
            base = _mean([tokenizer(t) for t in shape.parameters])
            final = _mean([tokenizer(t) for t in final_parameters])
            values["max_growth_tokens"] = max(0, round(final - base))
            if optimizer and optimizer[0] and failed > 0:
                # the answers are the values after each update: their mean growth
                # m = mean over updates u of min(u x g x failures per update, cap)
                updates = max(1, round(optimizer[0] / len(shape.parameters)))
                per_update = failed / updates
                mean = max(0.0, optimizer[1] / optimizer[0] - base)
                values["growth_per_failure_tokens"] = _solve_growth(
                    mean, updates, per_update, values["max_growth_tokens"]
                )
        values.update(overrides)
        return cls(**values)


def _evaluator_lm_feedback(shape: GraphShape, options: BackwardOptions) -> bool:
    """Whether failed samples get LM-written evaluator feedback (evaluator-backward
    calls): the evaluator asks for feedback at all (no metric feedback) and either
    the options say ``"lm"`` or it is an LM judge (which keeps it in both modes)."""
    return shape.evaluator_feedback and (
        options.evaluator_feedback == "lm" or shape.judge_calls > 0
    )


@dataclass(frozen=True)
class RunEstimate(RunProjection):
    """A :class:`~afnio.trainer.projection.RunProjection` made before any LM call,
    with the ``assumptions`` it rests on, the phases whose model has no price and
    (``backward``, inherited) the backward options it assumed."""

    assumptions: Assumptions = field(default_factory=Assumptions)
    unpriced: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = super().__str__().replace("projected:", "estimated:", 1)
        text += f"\n  assuming {self.assumptions.failure_rate:.0%} of samples fail"
        if self.unpriced:
            text += f"\n  no price (counted as $0): {', '.join(self.unpriced)}"
        return text


def _solve_growth(mean: float, updates: int, per_update: float, cap: float) -> float:
    """The growth per failure ``g`` whose capped linear growth
    ``min(u * g * per_update, cap)`` over updates ``u = 1..updates`` has mean
    ``mean`` (bisection; the mean rises with ``g``)."""
    if cap <= 0 or mean <= 0 or per_update <= 0:
        return 0.0
    mean = min(mean, cap)

    def mean_of(g: float) -> float:
        steps = range(1, updates + 1)
        return sum(min(u * g * per_update, cap) for u in steps) / updates

    low, high = 0.0, cap / per_update  # at `high` the first update reaches the cap
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_of(mid) < mean else (low, mid)
    return round((low + high) / 2, 3)


def _filler(tokens: float, word: str = "abc ") -> str:
    """A text of about ``tokens`` tokens for both :func:`approx_tokens` and
    word-counting tokenizers ("abc " is 4 characters and 1 word)."""
    return word * max(0, round(tokens))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class _Prompts:
    """Token counts of afnio's prompts rendered with texts of the assumed sizes."""

    def __init__(
        self,
        shape: GraphShape,
        a: Assumptions,
        tokenizer: Tokenizer,
        constraints: Sequence[str] = (),
        options: BackwardOptions | None = None,
    ) -> None:
        self.options = options or resolve_backward_options(None)
        # LM-written evaluator feedback, else (direct mode, deterministic evaluator)
        # the evaluator's own text is the feedback the chat backward shows
        self.evaluator_lm = _evaluator_lm_feedback(shape, self.options)
        self.direct = shape.evaluator_feedback and not self.evaluator_lm
        self.tok = tokenizer
        self.constraints = sum(tokenizer(c) + 2 for c in constraints)
        self.shape = shape
        self.a = a
        self.prompt = sum(tokenizer(t) for t in shape.prompt_texts) / (
            shape.forward_calls
        )
        self.input = _mean([tokenizer(t) for t in shape.inputs])
        self.parameter = _mean([tokenizer(t) for t in shape.parameters])
        self.judge = _mean([tokenizer(t) for t in shape.judge_texts])

    def request(self, *messages: str) -> float:
        return sum(self.tok(m) + MESSAGE_OVERHEAD_TOKENS for m in messages)

    def forward(self) -> float:
        return self.prompt + self.input + 2 * MESSAGE_OVERHEAD_TOKENS

    def judge_call(self) -> float:
        answer = 2 * self.a.answer_tokens  # the prediction and its target
        return self.judge + answer + self.input + MESSAGE_OVERHEAD_TOKENS

    def feedback(self) -> str:
        """The feedback on a failed sample's output that the chat backward shows:
        the evaluator's direct text in direct mode, else an LM-written one (the
        evaluator backward's, or the metric's own)."""
        if self.direct:
            return render(
                DIRECT_EVALUATOR_FEEDBACK,
                {
                    "metric": "exact match",
                    "prediction": _filler(self.a.answer_tokens),
                    "score": 0,
                    "target": _filler(self.a.answer_tokens),
                },
            )
        return _filler(self.a.feedback_tokens)

    def _item(self, index: int | None = None) -> ChatBackwardItem:
        """One failed sample's chat-backward request, with texts of the assumed
        sizes; ``index`` makes its user message differ from every other sample's (as
        real inputs do: only the system message is shared in a group)."""
        system = _filler(self.prompt)
        message = _filler(self.input)
        if index is not None and message:  # a first word of its own, same size
            message = f"{index % 1000:03d} " + message[4:]
        conversation = [
            {"role": "system", "content": system},
            {"role": "user", "content": message},
        ]
        # a parameter that is the whole system message is shown once; one inside a
        # larger message is shown again as the variable
        text = (
            system
            if self.shape.parameters_are_messages
            else _filler(self.parameter, "def ")  # a text of its own
        )
        variable = VariableInfo(self.shape.parameter_role, "system", True, text)
        return ChatBackwardItem(
            conversation=conversation,
            output_role="assistant",
            output=_filler(self.a.answer_tokens),
            feedback=self.feedback(),
            variables=[variable],
            key="estimate",
        )

    @functools.cache  # noqa: B019 (one short-lived instance per estimate)
    def chat_backward(self) -> float:
        """Prompt tokens of one single-sample chat-backward call."""
        item = self._item()
        user = chat_backward_user(
            item.conversation,
            item.output_role,
            item.output,
            item.feedback,
            list(item.variables),
        )
        return self.request(CHAT_BACKWARD_SYSTEM, user)

    @functools.cache  # noqa: B019
    def chat_backward_group(self, group: int) -> float:
        """Prompt tokens of one grouped chat-backward call about ``group`` samples
        of one template (``group == 1``: the single-sample prompt, as afnio sends
        it)."""
        if group == 1:
            return self.chat_backward()
        user = chat_backward_group_user([self._item(i) for i in range(group)])
        return self.request(CHAT_BACKWARD_GROUP_SYSTEM, user)

    @functools.cache  # noqa: B019
    def evaluator_backward(self, group: int) -> float:
        sample = render(
            EVALUATOR_SAMPLE_ELEMENT,
            {
                "index": 1,
                "input": _filler(self.input),
                "prediction_role": "prediction",
                "prediction": _filler(self.a.answer_tokens),
                "target": _filler(self.a.answer_tokens),
                "score": 0,
                # an LM judge's own explanation of the sample
                "details": _filler(self.a.feedback_tokens)
                if self.shape.judge_calls
                else "",
            },
        )
        user = render(
            EVALUATOR_BACKWARD_USER,
            {
                "purpose": "exact match",
                "explanation": _filler(50),  # the contract's batch explanation
                "feedback": "",
                "variable_count": 1,
                "variables": _format_variables(
                    [VariableInfo("prediction", "prediction", False, "")]
                ),
                "sample_count": group,
                "samples": "\n".join([sample] * group),
                "count": group,
            },
        )
        return self.request(EVALUATOR_BACKWARD_SYSTEM, user) + self.tok(
            PREDICTION_PLACEHOLDER
        )

    def optimizer(self, feedback_texts: float, past: float) -> float:
        """The optimizer prompt without the parameter's own text: every distinct
        feedback text (TGD condenses only texts that differ in quoted parts, which
        real feedback rarely does), ``past`` tokens of past iterations (momentum) and
        the constraints."""
        feedback = feedback_texts * self.a.feedback_tokens + 2 * feedback_texts
        user = render(
            TGD_USER,
            {
                "variable_role": self.shape.parameter_role,
                "variable": "",
                "feedback_count": 1,
                "feedback": _filler(feedback),
                "past_iterations": "",
                "constraints": "",
            },
        )
        return self.request(TGD_SYSTEM, user) + past + self.constraints


def _prices(
    models: str | Mapping[str, str] | None,
    batch: bool = False,
) -> tuple[dict[str, ModelPrice | None], list[str]]:
    """The price of each phase's model (its Batch API price with ``batch``)."""
    if models is None:
        return dict.fromkeys(PHASES), [f"{p} (no model)" for p in PHASES]
    if isinstance(models, str):
        names = dict.fromkeys(PHASES, models)
    else:
        unknown = sorted(set(models) - set(PHASES))
        if unknown:
            raise ValueError(
                f"`models` has unknown phases {unknown}: use {list(PHASES)}."
            )
        default = models.get("backward")
        names = {p: models.get(p, default) for p in PHASES}
    lookup = get_batch_price if batch else get_model_price
    prices = {p: (lookup(m) if m else None) for p, m in names.items()}
    unpriced = [
        f"{p} ({names[p] or 'no model'})" for p, v in prices.items() if v is None
    ]
    return prices, unpriced


def estimate(
    shape: GraphShape,
    *,
    n_train: int,
    n_val: int = 0,
    epochs: int = 1,
    batch_size: int = 1,
    validate_first: bool = False,
    validate_every_step: bool = False,
    momentum: int = 0,
    constraints: Sequence[str] = (),
    assumptions: Assumptions | None = None,
    models: str | Mapping[str, str] | None = None,
    tokenizer: Tokenizer = approx_tokens,
    batch_api: bool = False,
    backward: BackwardOptions | str | None = None,
) -> RunEstimate:
    """Estimate ``epochs`` of training on ``n_train`` samples in batches of
    ``batch_size`` (one optimizer step per batch), with a validation pass over
    ``n_val`` samples after each epoch (and one before, with ``validate_first``).

    Args:
        shape: the program's graph shape (:class:`GraphShape`).
        assumptions: failure rate and text lengths (:class:`Assumptions`).
        models: one model name for every phase, or ``{phase: model}`` (phases
            ``forward``, ``evaluator``, ``backward``, ``optimizer``; a missing phase
            takes the ``backward`` model); prices from
            :func:`afnio.models.pricing.get_model_price`. ``None``: cost 0, all
            phases listed as unpriced.
        validate_every_step: a validation pass after every optimizer step too
            (``Trainer(revert_on_regression=True)``).
        momentum, constraints: TGD's (past iterations and constraints are shown in
            every optimizer prompt).
        tokenizer: counts the tokens of a text (default :func:`approx_tokens`).
        batch_api: the validation passes go through the provider's Batch API: their
            calls are priced at the batch rate of the pricing table
            (:func:`afnio.models.pricing.get_batch_price`).
        backward: the :class:`~afnio.autodiff.options.BackwardOptions` the run will
            use (``"cheap"``, ``"upstream"`` or options); ``None`` (the default):
            the active ones (:func:`afnio.autodiff.options.get_backward_options`),
            read now. See the module docstring for what each changes.

    Raises:
        ValueError, TypeError: an argument out of range or of the wrong type (the
            message names it).
    """
    if not isinstance(shape, GraphShape):
        raise TypeError(f"`shape` must be a GraphShape, got {type(shape).__name__}.")
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_val", n_val, 0),
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("momentum", momentum, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    a = assumptions or Assumptions()
    options = resolve_backward_options(backward)
    samples_per_call = a.samples_per_call or config.EVALUATOR_SAMPLES_PER_CALL
    p = _Prompts(shape, a, tokenizer, constraints, options)
    # calls, prompt tokens, completion tokens per phase (synchronous, batch API)
    totals = {phase: [0.0, 0.0, 0.0] for phase in PHASES}
    batched = {phase: [0.0, 0.0, 0.0] for phase in PHASES}

    def add(
        phase: str, calls: float, prompt: float, completion: float, batch: bool = False
    ) -> None:
        t = (batched if batch else totals)[phase]
        t[0] += calls
        t[1] += calls * prompt
        t[2] += calls * completion

    # the parameters grow as the optimizer rewrites them: `grown` tokens so far
    # per parameter, which every later call that shows the parameter carries
    grown = 0.0
    updates = 0.0  # expected optimizer updates so far (for momentum)
    per_call = len(shape.parameters) / shape.forward_calls  # parameters per call

    def validation() -> None:
        if n_val:
            prompt = p.forward() + grown * per_call
            add(
                "forward",
                n_val * shape.forward_calls,
                prompt,
                a.answer_tokens,
                batch_api,
            )
            add(
                "evaluator",
                n_val * shape.judge_calls,
                p.judge_call(),
                a.feedback_tokens,
                batch_api,
            )

    binomial = functools.cache(lambda n: _binomial(n, a.failure_rate))
    if validate_first:
        validation()
    for _epoch in range(epochs):
        for size in _batches(n_train, batch_size):
            forward = p.forward() + grown * per_call
            add("forward", size * shape.forward_calls, forward, a.answer_tokens)
            add(
                "evaluator", size * shape.judge_calls, p.judge_call(), a.feedback_tokens
            )
            odds = binomial(size)
            failed = size * a.failure_rate
            # the grown parameter, in every chat-backward call that shows it (once
            # as its message, again as the variable when it is inside a message)
            shown_growth = (
                grown * per_call * (1 if shape.parameters_are_messages else 2)
            )
            if options.chat_samples_per_call == 1:
                # one chat-backward call per failed sample and LM call on its path
                add(
                    "backward",
                    failed * shape.forward_calls,
                    p.chat_backward() + shown_growth,
                    a.feedback_tokens,
                )
            else:
                # per template: its k failed samples' requests in ceil(k / n) calls
                for group, calls in _chat_groups(
                    odds, shape.calls_per_template, options.chat_samples_per_call
                ).items():
                    add(
                        "backward",
                        calls * shape.templates,  # type: ignore[operator]
                        p.chat_backward_group(group) + shown_growth,
                        group * a.feedback_tokens,
                    )
            if p.evaluator_lm:
                for k, prob in enumerate(odds):
                    full, rest = divmod(k, samples_per_call)
                    for group in [samples_per_call] * full + ([rest] if rest else []):
                        add(
                            "backward",
                            prob,
                            p.evaluator_backward(group),
                            group * a.feedback_tokens,
                        )
            any_failed = 1 - odds[0]
            if any_failed:
                mean_texts = failed / any_failed  # given that some sample failed
                before = p.parameter + grown
                # momentum shows the last iterations: each its value and feedback
                shown = min(updates, momentum)
                past = shown * (before + mean_texts * a.feedback_tokens)
                # E[failures] = P(any) x E[failures | any]: the expected growth
                grown = min(
                    grown + failed * a.growth_per_failure_tokens, a.max_growth_tokens
                )
                add(
                    "optimizer",
                    any_failed * len(shape.parameters),
                    p.optimizer(mean_texts, past) + before,
                    p.parameter + grown,  # the answer is the new value
                )
                updates += any_failed
            if validate_every_step:
                validation()
        validation()
    return _priced(totals, batched, models, a, options)


def _chat_groups(
    odds: Sequence[float], per_sample: float, per_call: int
) -> dict[int, float]:
    """Expected grouped chat-backward calls of one template in one batch, by group
    size: with ``k`` failed samples (probability ``odds[k]``) the template gets
    ``round(k * per_sample)`` requests, sent in the groups
    :func:`~afnio.autodiff.lm_backward.split_evenly` makes of at most
    ``per_call``."""
    calls: dict[int, float] = {}
    for k, prob in enumerate(odds):
        items = round(k * per_sample)
        if not items or prob < 1e-12:
            continue
        for group in split_evenly(items, per_call):
            calls[group] = calls.get(group, 0.0) + prob
    return calls


def _priced(
    totals: Mapping[str, list[float]],
    batched: Mapping[str, list[float]],
    models: str | Mapping[str, str] | None,
    a: Assumptions,
    options: BackwardOptions | None = None,
) -> RunEstimate:
    """The estimate of synchronous (``totals``) and Batch API (``batched``) calls,
    each priced at its own rate."""
    prices, unpriced = _prices(models)
    batch_prices, _ = _prices(models, batch=True)
    by_phase = {}
    for phase in PHASES:
        sync, batch = totals[phase], batched[phase]
        calls, prompt, completion = (x + y for x, y in zip(sync, batch, strict=True))
        if not calls:
            continue
        cost = 0.0
        for part, price in ((sync, prices[phase]), (batch, batch_prices[phase])):
            if price and part[0]:
                usage = {"prompt_tokens": part[1], "completion_tokens": part[2]}
                cost += calculate_cost(usage, price)
        by_phase[phase] = PhaseProjection(
            round(calls), round(prompt), round(completion), cost
        )
    return RunEstimate.of_phases(
        by_phase,
        assumptions=a,
        unpriced=tuple(u for u in unpriced if u.split(" ")[0] in by_phase),
        backward=options,
    )


def estimate_pass(
    shape: GraphShape,
    n: int,
    *,
    assumptions: Assumptions | None = None,
    models: str | Mapping[str, str] | None = None,
    tokenizer: Tokenizer = approx_tokens,
    batch_api: bool = False,
) -> RunEstimate:
    """Estimate one ``validate``/``test``/``predict`` pass over ``n`` samples: the
    forward calls and the LM judge's (``predict``: pass a shape without a judge),
    priced at the Batch API rate with ``batch_api`` (as
    ``Trainer.validate(..., batch_api=True)`` pays), else at the synchronous one.

    Example::

        >>> shape = GraphShape(forward_calls=1, prompt_texts=("Classify it.",),
        ...                    parameters=("Classify it.",), inputs=("Hi there",))
        >>> sync = estimate_pass(shape, 2000, models="gpt-4o-mini")
        >>> batch = estimate_pass(shape, 2000, models="gpt-4o-mini", batch_api=True)
        >>> round(batch.cost / sync.cost, 6)
        0.5
    """
    if not isinstance(shape, GraphShape):
        raise TypeError(f"`shape` must be a GraphShape, got {type(shape).__name__}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}.")
    a = assumptions or Assumptions()
    p = _Prompts(shape, a, tokenizer)
    totals = {phase: [0.0, 0.0, 0.0] for phase in PHASES}
    batched = {phase: [0.0, 0.0, 0.0] for phase in PHASES}
    target = batched if batch_api else totals
    for phase, calls, prompt, completion in (
        ("forward", n * shape.forward_calls, p.forward(), a.answer_tokens),
        ("evaluator", n * shape.judge_calls, p.judge_call(), a.feedback_tokens),
    ):
        target[phase][:] = [calls, calls * prompt, calls * completion]
    return _priced(totals, batched, models, a)
