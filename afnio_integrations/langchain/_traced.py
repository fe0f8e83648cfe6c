"""``trace(chain)``: an afnio Module around a user's LCEL chain (left untouched)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afnio._variable import Variable
from afnio.cognitive.modules.module import Module
from afnio.cognitive.parameter import Parameter
from afnio_integrations._recorded import RecordedChatCall, StackSamples, StepOutput
from afnio_integrations._usage import ProgramUsage
from afnio_integrations.langchain._discovery import (
    METADATA_KEY,
    PromptSlot,
    Selector,
    find_prompt_slots,
)
from afnio_integrations.langchain._tracing import (
    OUTPUT_ROLE,
    RunCollector,
    conversation_of,
    output_of,
)
from afnio_integrations.langchain._writeback import apply_template, checked_template

__all__ = ["TracedChain", "load_chain", "trace"]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    content = getattr(value, "content", None)  # a message
    if isinstance(content, str):
        return content
    if hasattr(value, "model_dump"):  # a pydantic object (structured output)
        return json.dumps(value.model_dump(), default=str)
    try:
        return json.dumps(value, default=str)
    except TypeError:
        return str(value)


def _prompt_contents(value: Any) -> list[str]:
    """The message texts a prompt run produced (a plain template's text is one
    message)."""
    messages = getattr(value, "messages", None)
    if messages is not None:
        return [_text(m) for m in messages]
    text = getattr(value, "text", None)
    return [str(text)] if text is not None else []


def _runs(root: Any) -> list[Any]:
    out, stack = [], [root]
    while stack:
        run = stack.pop()
        out.append(run)
        stack.extend(sorted(run.child_runs, key=lambda r: r.dotted_order, reverse=True))
    return sorted(out, key=lambda r: r.dotted_order)


class TracedChain(Module):
    """An afnio Module whose Parameters are prompt texts of a LangChain chain.

    Calling it runs the user's chain (with a tracer callback) and returns the output
    as a Variable wired into an afnio graph; after an optimizer step,
    :meth:`write_back` puts the Parameters' texts into the user's own templates.
    """

    def __init__(
        self, chain: Any, select: Selector = "system", include: Sequence[Any] = ()
    ) -> None:
        super().__init__()
        object.__setattr__(self, "chain", chain)
        slots = find_prompt_slots(chain, select, include)
        if not slots:
            raise ValueError(
                "No prompt template text was found to optimize with select="
                f"{select!r}: the chain needs a ChatPromptTemplate with such messages."
            )
        self._slot_list: list[tuple[PromptSlot, Parameter]] = []
        by_prompt: dict[str, list[tuple[PromptSlot, Parameter]]] = {}
        for k, slot in enumerate(slots):
            param = Parameter(
                slot.text, role=f"{slot.role} prompt of the chain ({slot.key})"
            )
            self.register_parameter(f"prompt_{k}", param)
            self._slot_list.append((slot, param))
            prompt_key = slot.key.split(".")[0]
            if by_prompt.get(prompt_key) is None:
                slot.prompt.metadata = {
                    **(slot.prompt.metadata or {}),
                    METADATA_KEY: prompt_key,
                }
            by_prompt.setdefault(prompt_key, []).append((slot, param))
        self._by_prompt = by_prompt
        object.__setattr__(self, "usage", ProgramUsage("LangChain chain LMs"))

    def extra_repr(self) -> str:
        return ", ".join(slot.key for slot, _ in self._slot_list)

    # -- calling -----------------------------------------------------------------------

    def _sync(self) -> None:
        """Make the chain use the Parameters' current texts (after an optimizer step,
        the next call already runs with the new prompts)."""
        if any(str(param.data) != slot.text for slot, param in self._slot_list):
            self.write_back()

    @staticmethod
    def _config(
        config: dict[str, Any] | None, collector: RunCollector
    ) -> dict[str, Any]:
        config = dict(config or {})
        callbacks = config.get("callbacks") or []
        config["callbacks"] = [*callbacks, collector]
        return config

    def forward(self, inputs: Any, config: dict[str, Any] | None = None) -> Variable:
        return self.invoke(inputs, config)

    def invoke(self, inputs: Any, config: dict[str, Any] | None = None) -> Variable:
        """Run the chain on ``inputs``; the output as a Variable in the afnio graph."""
        self._sync()
        collector = RunCollector()
        result = self.chain.invoke(inputs, config=self._config(config, collector))
        return self._build(collector.roots[-1], result)

    async def ainvoke(
        self, inputs: Any, config: dict[str, Any] | None = None
    ) -> Variable:
        """Async :meth:`invoke`."""
        self._sync()
        collector = RunCollector()
        result = await self.chain.ainvoke(
            inputs, config=self._config(config, collector)
        )
        return self._build(collector.roots[-1], result)

    def _batch_output(
        self, inputs: Sequence[Any], results: list[Any], roots: list[Any]
    ) -> Variable:
        remaining = list(roots)
        samples = []
        for item, result in zip(inputs, results, strict=True):
            match = (
                next((r for r in remaining if r.inputs == item), None) or remaining[0]
            )
            remaining.remove(match)
            samples.append(self._build(match, result))
        return StackSamples.apply(samples, "outputs of the chain")

    def batch(
        self, inputs: Sequence[Any], config: dict[str, Any] | None = None
    ) -> Variable:
        """Run the chain on every input (concurrently, as ``chain.batch`` does); one
        batched Variable, aligned with ``inputs``."""
        self._sync()
        collector = RunCollector()
        results = self.chain.batch(list(inputs), config=self._config(config, collector))
        return self._batch_output(inputs, results, collector.roots)

    async def abatch(
        self, inputs: Sequence[Any], config: dict[str, Any] | None = None
    ) -> Variable:
        """Async :meth:`batch`."""
        self._sync()
        collector = RunCollector()
        results = await self.chain.abatch(
            list(inputs), config=self._config(config, collector)
        )
        return self._batch_output(inputs, results, collector.roots)

    def stream(self, inputs: Any, config: dict[str, Any] | None = None) -> Variable:
        """Stream the chain (its chunks are joined); the output as a Variable."""
        self._sync()
        collector = RunCollector()
        chunks = list(self.chain.stream(inputs, config=self._config(config, collector)))
        result: Any = (
            "".join(map(str, chunks))
            if all(isinstance(c, str) for c in chunks)
            else chunks[-1]
        )
        return self._build(collector.roots[-1], result)

    async def astream(
        self, inputs: Any, config: dict[str, Any] | None = None
    ) -> Variable:
        """Async :meth:`stream`."""
        self._sync()
        collector = RunCollector()
        chunks = [
            chunk
            async for chunk in self.chain.astream(
                inputs, config=self._config(config, collector)
            )
        ]
        result: Any = (
            "".join(map(str, chunks))
            if all(isinstance(c, str) for c in chunks)
            else chunks[-1]
        )
        return self._build(collector.roots[-1], result)

    # -- the graph ---------------------------------------------------------------------

    def _build(self, root: Any, result: Any) -> Variable:
        produced: list[tuple[str, Variable]] = []
        last: Variable | None = None
        prompt_runs: list[Any] = []
        for run in _runs(root):
            if run.run_type == "prompt":
                prompt_runs.append(run)
            elif run.run_type in ("chat_model", "llm"):
                conversation = conversation_of(run)
                contents = [m["content"] for m in conversation]
                variables: list[Variable] = []
                locations: list[str] = []
                source = next(
                    (
                        p
                        for p in reversed(prompt_runs)
                        if _prompt_contents((p.outputs or {}).get("output")) == contents
                    ),
                    None,
                )
                if source is not None:
                    for slot, param in self._by_prompt.get(
                        source.metadata.get(METADATA_KEY), []
                    ):
                        variables.append(param)
                        locations.append(slot.role)
                    for key, value in (source.inputs or {}).items():
                        text = _text(value)
                        var = next(
                            (v for t, v in reversed(produced) if t == text), None
                        )
                        if var is not None:
                            variables.append(var)
                            locations.append(f"input:{key}")
                self._account(run)
                last = RecordedChatCall.apply(
                    conversation, output_of(run), variables, locations, OUTPUT_ROLE
                )
                produced.append((str(last.data), last))
            elif run.run_type == "parser" and last is not None:
                text = _text((run.outputs or {}).get("output"))
                feeding = _text((run.inputs or {}).get("input"))
                src = next((v for t, v in reversed(produced) if t == feeding), last)
                var = StepOutput.apply(src, text, run.name)
                produced.append((text, var))
            elif run.run_type == "chain" and run is not root and produced:
                # a lambda (or any step) transforming an earlier output: feedback on
                # its output passes to that earlier output
                feeding = _text((run.inputs or {}).get("input"))
                src = next((v for t, v in reversed(produced) if t == feeding), None)
                if src is not None and run.outputs:
                    # a dict output is stored as the outputs themselves
                    output = run.outputs.get("output", run.outputs)
                    text = _text(output)
                    if text != feeding:
                        var = StepOutput.apply(src, text, run.name)
                        produced.append((text, var))
                        if isinstance(output, dict):  # e.g. {"text": ...} for a prompt
                            produced.extend((_text(v), var) for v in output.values())
        final = _text(result)
        if not produced:
            return Variable(final, role="output of the chain")
        same = next((v for t, v in reversed(produced) if t == final), None)
        if same is not None:
            return same
        return StepOutput.apply(produced[-1][1], final, "chain output")

    def _account(self, run: Any) -> None:
        """Count the chain's own LM call: tokens and cost from the run's usage."""
        llm_output = (run.outputs or {}).get("llm_output") or {}
        usage = llm_output.get("token_usage") or {}
        self.usage.record(llm_output.get("model_name") or "unknown", usage)

    @property
    def lm_calls(self) -> int:
        """The chain's own LM calls traced so far."""
        return self.usage.calls

    @property
    def lm_tokens(self) -> int:
        """Their tokens."""
        return int(self.usage.get_usage().get("total_tokens", 0))

    @property
    def lm_cost(self) -> float:
        """Their cost in USD (afnio's price table)."""
        return float(self.usage.get_usage()["cost"]["amount"])

    # -- write-back and export ---------------------------------------------------------

    def write_back(self) -> None:
        """Put every Parameter's text into the user's own template objects. All texts
        are checked first (a text that drops or adds a placeholder raises
        ``PlaceholderMismatchError``); nothing changes unless all are valid."""
        staged = [
            (slot, checked_template(slot, str(param.data)))
            for slot, param in self._slot_list
        ]
        for slot, template in staged:
            apply_template(slot, template)

    def prompts(self) -> dict[str, str]:
        """The current texts by slot key (e.g. ``"prompt0.system0"``)."""
        return {slot.key: str(param.data) for slot, param in self._slot_list}

    def save_prompts(self, path: str | Path) -> None:
        """Save :meth:`prompts` as JSON (to re-apply to a freshly built chain)."""
        Path(path).write_text(
            json.dumps(self.prompts(), indent=2, ensure_ascii=False), "utf-8"
        )

    def load_prompts(self, path: str | Path) -> None:
        """Load texts saved by :meth:`save_prompts` into the Parameters and write them
        back into the chain."""
        texts = json.loads(Path(path).read_text("utf-8"))
        unknown = sorted(set(texts) - {slot.key for slot, _ in self._slot_list})
        if unknown:
            raise KeyError(
                f"Unknown prompt slots {unknown}; this chain has "
                f"{sorted(self.prompts())}."
            )
        before = {slot.key: str(param.data) for slot, param in self._slot_list}
        for slot, param in self._slot_list:
            if slot.key in texts:
                param.data = texts[slot.key]
        try:
            self.write_back()
        except Exception:
            for slot, param in self._slot_list:
                param.data = before[slot.key]
            raise

    def save_chain(self, path: str | Path) -> None:
        """Save :meth:`export`'s chain as LangChain JSON (``langchain_core.load``
        format; API keys are stored as references to environment variables, never as
        values). Load it without afnio with ``langchain_core.load.loads`` (see
        :func:`load_chain` for the options)."""
        from langchain_core.load import dumpd

        self.write_back()

        def scrub(node: Any) -> Any:  # drop afnio's bookkeeping from prompt metadata
            if isinstance(node, dict):
                return {k: scrub(v) for k, v in node.items() if k != METADATA_KEY}
            if isinstance(node, list):
                return [scrub(v) for v in node]
            return node

        text = json.dumps(scrub(dumpd(self.chain)), indent=2)
        Path(path).write_text(text, "utf-8")

    def export(self) -> Any:
        """A deep copy of the user's chain with the current texts written in and no
        afnio metadata: a plain LangChain chain that needs no afnio at run time. (A
        model client that holds open connections may refuse to be copied; then use
        :meth:`save_chain` and load the file.)"""
        self.write_back()
        exported = copy.deepcopy(self.chain)
        for slot in find_prompt_slots(exported, "all"):
            if slot.prompt.metadata and METADATA_KEY in slot.prompt.metadata:
                slot.prompt.metadata = {
                    k: v for k, v in slot.prompt.metadata.items() if k != METADATA_KEY
                } or None
        return exported


def load_chain(path: str | Path, **kwargs: Any) -> Any:
    """Load a chain saved by :meth:`TracedChain.save_chain` (plain LangChain: this
    is what a deployment without afnio runs; secrets come from the environment).

    Only for files you trust: like ``langchain_core.load.loads`` it instantiates
    LangChain classes with the file's constructor arguments (a model's ``base_url``
    included) and reads API keys from the environment, so a tampered file could send
    the key to another host. For a file you did not write, build the chain yourself
    and apply its texts with :meth:`TracedChain.load_prompts` (texts only,
    placeholders checked). ``kwargs`` override the options passed to ``loads``."""
    from langchain_core.load import loads

    options: dict[str, Any] = {
        "secrets_from_env": True,
        "valid_namespaces": ["langchain_openai", "langchain_anthropic"],
        "allowed_objects": "all",
    }
    options.update(kwargs)
    return loads(Path(path).read_text("utf-8"), **options)


def trace(
    chain: Any, select: Selector = "system", include: Sequence[Any] = ()
) -> TracedChain:
    """Trace a LangChain chain: an afnio Module whose Parameters are the chain's
    prompt texts chosen by ``select`` (``"system"`` by default; a role, roles,
    ``"all"``, or a predicate on a :class:`PromptSlot`). ``include`` lists
    sub-chains only called from inside ``RunnableLambda`` functions (invisible to the
    chain's structure); their calls are traced like the rest.

    Example::

        traced = trace(prompt | ChatOpenAI(model="gpt-4o-mini") | StrOutputParser())
        prediction = traced.invoke({"message": "The heater is broken again."})
        score, explanation = F.exact_match_evaluator(prediction, "negative")
        explanation.backward()
        TGD(traced.parameters(), model_client=client).step()
        traced.write_back()          # the user's chain now sends the improved prompt
    """
    return TracedChain(chain, select, include)
