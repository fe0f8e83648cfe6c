"""The learning proof of issue 19: a LangChain agent and a LangGraph app learn tool
routing on Facility Support messages with :func:`optimize`, offline, on the bundled
simulator (live and deterministic, as ``tests/trainer/test_urgency.py``; no cassette).

The task (``_facility_tools``): each message's annotated categories give one of three
tools by a fixed rule (repairs and maintenance -> ``repairs``, else cleaning ->
``cleaning``, else ``general``); 67 rows (every third) are held out, the seed draws
the :data:`N_TRAIN` training rows from the other 133.

(a) A ``create_agent`` support agent starts from a system prompt without routing
rules and plain tool descriptions (``make_tools``: what a plain docstring says,
"Send a technician to fix or maintain equipment.", "Schedule a cleaning.", "Answer
any other request.", none of the dataset's category vocabulary): the simulator calls
no tool, so
its held-out tool-choice accuracy (exactly the expected tool called) is 0%. One
``optimize(agent, rows, trajectory_match("strict"), epochs=3, batch_size=N_TRAIN)``
per seed; the same agent object is scored before and after. Controls, same protocol:
the training tools shuffled among the rows (``shuffled_tools``); the system prompt
and tool descriptions frozen (``select="tool_arg"``: only the tools' argument
descriptions are trainable, so the whole loop runs, forward, feedback and optimizer
calls, but the texts that route are never changed; a ``select`` naming nothing
trainable would be an error, and scoring the untrained agent would test nothing).
A third control uses no training label at all: the *label-free router*
(:func:`label_free_accuracy`) routes each held-out message by its earliest word that
names a tool or occurs in the initial tool descriptions (the simulator's own
stemmer); what it reaches, the initial texts' vocabulary gives without learning, so
the trained agent must gain at least twice as much.

The assertions are the issue's thresholds, all met (held-out tool choice 0.000 ->
0.791 / 0.806 / 0.821 on seeds 0-2; shuffled labels 0.358 / 0.403 / 0.403; frozen
0.000). A fourth run starts from a wrong routing rule (:data:`WRONG_RULE`, 0.358
held out) and must reach 75% too: there the agent calls tools from the start, so
the confirmations and corrections of every epoch do the learning, not only the
first step's proposals. The label-free router (an extra control, not the issue's)
reaches 0.493, more than half the trained gain: that assertion is
``xfail(strict=True)`` with the figures in its reason.

(b) A two-node LangGraph app on the same rows: ``route`` (a prompt and a model with
the three tools bound) picks the tool, ``answer`` runs it and a model answers the
customer from its result; final-answer accuracy is the answer of the expected tool.

The figures are printed at the end of the run (``-rA``); the whole file takes about
three minutes on 2 cores.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain extra")
pytest.importorskip("langgraph", reason="needs the agents extra")

from langchain.agents import create_agent
from langchain_core.messages import AnyMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import tools_condition

from afnio.testing import SIMULATOR_MODEL
from afnio_integrations.langchain import (
    answer_match,
    final_answer_of,
    optimize,
    tool_calls_of,
    trajectory_match,
)
from benchmarks.common import simulated
from tests._shared_data import needs_shared_dataset
from tests.integrations.langchain import _facility_tools as facility

pytestmark = [
    needs_shared_dataset("the agent learning proof"),
    # a module fixture trains 3 agents (about 30 s each on 2 cores) in its setup
    pytest.mark.timeout(600),
]

SEEDS = (0, 1, 2)
N_TRAIN = 80
"""Training rows per seed (of the 133 that are not held out); one batch of them."""
EPOCHS = 3

UNMET_LABEL_FREE = (
    "unmet: the label-free router reaches 0.493 held out, more than half the trained "
    "gains (0.791 / 0.806 / 0.821); the trained agent beats it by 30 points"
)


ROUTER_PROMPT = (
    "You route the e-mails of ProCare Facility Solutions' customers to the team that "
    "handles them."
)
"""The two-node app's routing prompt (no routing rule)."""


@dataclass(frozen=True)
class Outcome:
    """One run: held-out accuracy before and after optimize(), the learned texts."""

    what: str
    seed: int
    before: float
    after: float
    texts: dict[str, str]
    seconds: float

    @property
    def gain(self) -> float:
        return self.after - self.before


def _client(base_url: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=SIMULATOR_MODEL,
        base_url=base_url,
        api_key="sk-test",
        temperature=0,
        max_retries=0,
    )


def _user(message: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": message}]}


def _tool_choice_accuracy(agent: Any, rows: tuple[facility.FacilityRow, ...]) -> float:
    states = agent.batch([_user(row.message) for row in rows])
    hits = sum(
        facility.tool_choice_correct(tool_calls_of(state), row)
        for state, row in zip(states, rows, strict=True)
    )
    return hits / len(rows)


def _optimize(program: Any, rows: Any, metric: Callable, seed: int, **kw: Any) -> Any:
    with tempfile.TemporaryDirectory() as out:
        _, report = optimize(
            program,
            [(row.message, row.tool) for row in rows],
            metric,
            epochs=EPOCHS,
            batch_size=len(rows),
            seed=seed,
            progress=False,
            model=SIMULATOR_MODEL,
            root_dir=out,
            **kw,
        )
    return report


WRONG_RULE = ' If the message mentions "team", call general.'
"""A routing rule the ``"wrong start"`` agent begins with: nearly every e-mail
greets the "Team", so it sends nearly everything to ``general``."""


def run_agent(base_url: str, seed: int, control: str | None = None) -> Outcome:
    """Optimize a fresh support agent on the seed's training rows (``control``:
    ``"shuffled"`` labels, ``"frozen"`` routing texts, or a ``"wrong start"``: the
    system prompt begins with :data:`WRONG_RULE`) and score it on the held-out rows
    before and after."""
    start = time.perf_counter()
    rows = facility.load_rows()
    heldout = facility.heldout(rows)
    train = facility.training_split(seed, N_TRAIN, rows)
    if control == "shuffled":
        train = facility.shuffled_tools(train, seed)
    agent = create_agent(
        _client(base_url),
        tools=facility.make_tools(),
        system_prompt=facility.INITIAL_SYSTEM_PROMPT
        + (WRONG_RULE if control == "wrong start" else ""),
    )
    before = _tool_choice_accuracy(agent, heldout)
    # frozen: only the argument descriptions are trainable (a discovered system
    # prompt left out by select= is not warned about)
    report = _optimize(
        agent,
        train,
        trajectory_match("strict"),
        seed,
        select="tool_arg" if control == "frozen" else None,
    )
    after = _tool_choice_accuracy(agent, heldout)  # the same object, written back
    return Outcome(
        f"agent {control or 'trained'}",
        seed,
        before,
        after,
        dict(report.prompts_after),
        time.perf_counter() - start,
    )


RESULTS: dict[str, list[Outcome]] = {}
"""Every run of the module, by group, for the summary printed at the end."""


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def two_node_app(base_url: str) -> tuple[Any, dict[str, str]]:
    """The LangGraph app (``route`` -> ``answer``) and each tool's answer."""
    llm = _client(base_url)
    tools = facility.make_tools()
    by_name = {tool.name: tool for tool in tools}
    replies = {tool.name: str(tool.invoke({"request": ""})) for tool in tools}
    prompt = ChatPromptTemplate.from_messages(
        [("system", ROUTER_PROMPT), ("placeholder", "{messages}")]
    )
    router = prompt | llm.bind_tools(tools)
    answerer = llm.bind_tools(tools, tool_choice="none")

    def route(state: State) -> dict[str, Any]:
        return {"messages": [router.invoke({"messages": state["messages"]})]}

    def answer(state: State) -> dict[str, Any]:
        calls = state["messages"][-1].tool_calls
        results = [by_name[call["name"]].invoke(call) for call in calls]
        return {"messages": [*results, answerer.invoke([*state["messages"], *results])]}

    graph = StateGraph(State)
    graph.add_node("route", route)
    graph.add_node("answer", answer)
    graph.add_edge(START, "route")
    graph.add_conditional_edges("route", tools_condition, {"tools": "answer", END: END})
    graph.add_edge("answer", END)
    return graph.compile(), replies


def run_app(base_url: str, seed: int) -> Outcome:
    """Optimize the two-node app on the seed's rows with a final-answer metric and
    score its final answers on the held-out rows before and after."""
    start = time.perf_counter()
    rows = facility.load_rows()
    heldout = facility.heldout(rows)
    app, replies = two_node_app(base_url)
    match = answer_match()

    def final_answer_metric(prediction: Any, tool: str) -> tuple[float, str]:
        score, feedback = match(prediction, replies[tool])
        if score:
            return score, feedback
        # the user knows which team's answer was due: the feedback says so
        return 0.0, (
            f"{feedback} That answer comes from the {tool} tool: expected a call to "
            f"{tool}."
        )

    def accuracy() -> float:
        states = app.batch([_user(row.message) for row in heldout])
        return sum(
            final_answer_of(state) == replies[row.tool]
            for state, row in zip(states, heldout, strict=True)
        ) / len(heldout)

    before = accuracy()
    report = _optimize(
        app, facility.training_split(seed, N_TRAIN, rows), final_answer_metric, seed
    )
    return Outcome(
        "two-node app",
        seed,
        before,
        accuracy(),
        dict(report.prompts_after),
        time.perf_counter() - start,
    )


@pytest.fixture(scope="module", autouse=True)
def _print_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the figures of every run at the end of the module."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and RESULTS:
        reporter.write_line("")
        reporter.write_line(
            f"agent learning proof (held-out tool choice / final answer, 67 rows; "
            f"{N_TRAIN} training rows, {EPOCHS} epochs):"
        )
        for group in RESULTS.values():
            for o in group:
                reporter.write_line(
                    f"  {o.what:16} seed {o.seed}: {o.before:.3f} -> {o.after:.3f} "
                    f"({o.seconds:.1f} s)"
                )


def _runs(group: str, run: Callable[[str, int], Outcome], seeds: tuple[int, ...]):
    """``run(base_url, seed)`` per seed on a fresh simulator (set as afnio's
    backward client for the group: the tests' fixtures reset it after each test)."""
    with simulated() as (sim, _):
        RESULTS[group] = [run(sim.base_url, seed) for seed in seeds]
    return RESULTS[group]


@pytest.fixture(scope="module")
def trained() -> list[Outcome]:
    return _runs("trained", run_agent, SEEDS)


@pytest.fixture(scope="module")
def shuffled() -> list[Outcome]:
    # every seed: the bound is per seed, and a control on one seed proves little
    return _runs("shuffled", lambda url, s: run_agent(url, s, "shuffled"), SEEDS)


@pytest.fixture(scope="module")
def frozen() -> list[Outcome]:
    # the frozen routing texts cannot change (checked below): one seed shows it
    return _runs("frozen", lambda url, s: run_agent(url, s, "frozen"), (0,))


@pytest.fixture(scope="module")
def wrong_start() -> list[Outcome]:
    # the agent already calls tools, so later epochs' confirmations and corrections
    # (not only the first step's proposals) must do the learning
    return _runs("wrong start", lambda url, s: run_agent(url, s, "wrong start"), (0,))


@pytest.fixture(scope="module")
def app() -> Outcome:
    return _runs("app", run_app, (0,))[0]


def label_free_accuracy() -> float:
    """Held-out tool-choice accuracy of the label-free router: each message goes to
    the tool whose vocabulary (its name and initial description, see
    :func:`afnio.testing.world.tool_vocabulary`) holds the message's earliest content
    word that any tool's does (no call when none does). No training label is read."""
    from afnio.testing import world

    specs = [world.ToolSpec(t.name, t.description) for t in facility.make_tools()]
    vocabulary = {spec.name: world.tool_vocabulary([spec]) for spec in specs}
    hits = 0
    heldout = facility.heldout(facility.load_rows())
    for row in heldout:
        routed = None
        for word, _ in world._content_words(world.strip_rules(row.message)):
            names = [n for n, v in vocabulary.items() if world._stem(word) in v]
            if len(word) >= 3 and names:
                routed = names[0]
                break
        hits += routed == row.tool
    return hits / len(heldout)


def _median_gain(group: list[Outcome]) -> float:
    return statistics.median(o.gain for o in group)


def _figures(group: list[Outcome]) -> str:
    return ", ".join(f"seed {o.seed}: {o.before:.3f}->{o.after:.3f}" for o in group)


def test_the_untrained_support_agent_routes_poorly(trained: list[Outcome]) -> None:
    for outcome in trained:
        assert outcome.before <= 0.40, _figures(trained)


def test_the_agent_learns_routing_rules_of_the_grammar(
    trained: list[Outcome],
) -> None:
    for outcome in trained:
        assert "call repairs." in outcome.texts["agent.system"]
        assert "Use this tool when" in outcome.texts["tool.repairs"]
        assert outcome.after > outcome.before, _figures(trained)


def test_the_agent_learns_tool_routing_to_75_percent_held_out(
    trained: list[Outcome],
) -> None:
    assert statistics.median(o.after for o in trained) >= 0.75, _figures(trained)


@pytest.mark.parametrize(
    "control",
    [
        "shuffled",
        "frozen",
    ],
)
def test_a_control_gains_at_most_half_as_much_per_seed(
    request: pytest.FixtureRequest, trained: list[Outcome], control: str
) -> None:
    runs: list[Outcome] = request.getfixturevalue(control)
    by_seed = {o.seed: o for o in trained}
    for run in runs:
        assert run.gain <= by_seed[run.seed].gain / 2, (
            f"{control}: {_figures(runs)}; trained: {_figures(trained)}"
        )


@pytest.mark.xfail(strict=True, reason=UNMET_LABEL_FREE)
def test_the_label_free_router_gains_at_most_half_as_much(
    trained: list[Outcome],
) -> None:
    accuracy = label_free_accuracy()
    for outcome in trained:
        assert accuracy - outcome.before <= outcome.gain / 2, (
            f"label-free router: {accuracy:.3f}; trained: {_figures(trained)}"
        )


def test_an_agent_that_already_routes_wrongly_corrects_its_routing(
    wrong_start: list[Outcome],
) -> None:
    for outcome in wrong_start:
        assert outcome.before <= 0.40, _figures(wrong_start)
        assert outcome.after >= 0.75, _figures(wrong_start)
        assert '"team", call general' not in outcome.texts["agent.system"]


def test_the_written_back_descriptions_do_not_contradict_each_other(
    trained: list[Outcome],
) -> None:
    """No word routes to two tools: each description rule's word is in one
    description only."""
    from afnio.testing import world

    for outcome in trained:
        owners: dict[str, set[str]] = {}
        for name in facility.TOOL_NAMES:
            spec = world.ToolSpec(name, outcome.texts[f"tool.{name}"])
            for rule in spec.rules():
                owners.setdefault(rule.word.casefold(), set()).add(name)
        shared = {w: sorted(n) for w, n in owners.items() if len(n) > 1}
        assert not shared, f"seed {outcome.seed}: {shared}"


def test_the_frozen_control_leaves_the_routing_texts_unchanged(
    frozen: list[Outcome],
) -> None:
    for outcome in frozen:
        assert "agent.system" not in outcome.texts
        assert not any(f"tool.{name}" in outcome.texts for name in facility.TOOL_NAMES)
        assert outcome.after == outcome.before


def test_a_two_node_langgraph_app_improves_its_final_answers(app: Outcome) -> None:
    assert app.before <= 0.50, _figures([app])
    assert app.after >= app.before + 0.20, _figures([app])
    assert "call " in app.texts["prompt0.system0"]  # the route node's prompt learned
