"""save_chain / load_chain: whole LangChain chains holding a ChatOpenAI saved as
LangChain JSON (no pickle, no API key in the file) and loaded back, on the live
simulator; TracedChain.export() on such chains."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core._api import LangChainBetaWarning
from langchain_core.load import loads
from langchain_core.output_parsers import (
    JsonOutputParser,
    PydanticOutputParser,
    StrOutputParser,
)
from langchain_core.prompts import (
    ChatPromptTemplate,
    FewShotChatMessagePromptTemplate,
    FewShotPromptTemplate,
    PromptTemplate,
)
from langchain_core.runnables import (
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

import afnio_integrations.langchain as lc
from afnio.testing import SIMULATOR_MODEL, Simulator
from benchmarks.common import backward_client
from tests.integrations.langchain._chains import (
    CLASSIFY,
    TRAINSET,
    exact,
    run_without_afnio,
    sentiment_prompt,
    sim_chat,
)

KEY = "sk-test-S4veCha1nK3y9x7Q"  # distinctive: grep the saved file for it
RULE = 'If the message mentions "frustrated", the sentiment is negative.'
OPTIMIZED = f"{CLASSIFY} {RULE}"
MESSAGE = {"message": "I am frustrated with the heating."}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


def chat(sim: Simulator, **kwargs: Any) -> ChatOpenAI:
    """A ChatOpenAI on the simulator, its key passed explicitly."""
    return sim_chat(sim, api_key=KEY, **kwargs)


def classify_prompt(*, partial: bool = False) -> ChatPromptTemplate:
    if partial:
        prompt = ChatPromptTemplate.from_messages(
            [("system", CLASSIFY + " {style}"), ("human", "{message}")]
        )
        return prompt.partial(style="Answer with one word.")
    return sentiment_prompt()


@tool
def lookup(query: str) -> str:
    """Look up a customer by name."""
    return query


def few_shot_chat_prompt() -> ChatPromptTemplate:
    examples = FewShotChatMessagePromptTemplate(
        examples=[
            {"input": "I love the new lobby {really}", "output": "positive"},
            {"input": "Where is the invoice?", "output": "neutral"},
        ],
        example_prompt=ChatPromptTemplate.from_messages(
            [("human", "{input}"), ("ai", "{output}")]
        ),
    )
    return ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), examples, ("human", "{message}")]
    )


def few_shot_string_prompt() -> FewShotPromptTemplate:
    return FewShotPromptTemplate(
        examples=[{"q": "The lobby is great", "a": "positive"}],
        example_prompt=PromptTemplate.from_template("Message: {q}\nSentiment: {a}"),
        prefix=CLASSIFY,
        suffix="Message: {message}\nSentiment:",
        input_variables=["message"],
    )


CHAINS: dict[str, Callable[[Simulator], Any]] = {
    "prompt|model|parser, bound kwargs, partial variables": lambda sim: (
        classify_prompt(partial=True)
        | chat(sim).bind(temperature=0.0, stop=["\n\n"])
        | StrOutputParser()
    ),
    "bound tools": lambda sim: classify_prompt() | chat(sim).bind_tools([lookup]),
    "RunnableParallel": lambda sim: RunnableParallel(
        label=classify_prompt() | chat(sim) | StrOutputParser(),
        message=RunnablePassthrough(),
    ),
    "RunnablePassthrough.assign": lambda sim: RunnablePassthrough.assign(
        label=classify_prompt() | chat(sim, temperature=0.0) | StrOutputParser()
    ),
    "with_fallbacks and with_retry": lambda sim: (
        (classify_prompt() | chat(sim) | StrOutputParser())
        .with_retry(stop_after_attempt=2)
        .with_fallbacks([classify_prompt() | chat(sim) | StrOutputParser()])
    ),
    "few-shot chat prompt": lambda sim: (
        few_shot_chat_prompt() | chat(sim) | StrOutputParser()
    ),
    "few-shot string prompt": lambda sim: (
        few_shot_string_prompt() | chat(sim) | StrOutputParser()
    ),
}


def optimize_by_hand(chain: Any) -> Any:
    """What an optimizer step does: the traced system texts get the rule."""
    traced = lc.trace(chain)
    for param in traced.parameters():
        param.data = str(param.data).replace(CLASSIFY, OPTIMIZED)
    traced.write_back()
    return traced


def sent(sim: Simulator, run: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``run()``'s result and the request bodies the simulator received (sorted)."""
    sim.reset_stats()
    result = run()
    bodies = sorted(json.dumps(body, sort_keys=True) for body in sim.requests)
    return result, bodies


def comparable(result: Any) -> Any:
    """A chain's answer without per-response ids."""
    if hasattr(result, "tool_calls"):
        return (result.content, result.tool_calls)
    if isinstance(result, dict):
        return {k: comparable(v) for k, v in result.items()}
    return result


@pytest.mark.parametrize("shape", list(CHAINS))
def test_saved_chain_loads_and_sends_exactly_the_optimized_requests(
    shape: str,
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chain = CHAINS[shape](sim)
    path = tmp_path / "chain.json"
    if "string" in shape:  # trace() does not discover string few-shot prompts
        chain.first.prefix = OPTIMIZED
        classes = lc.save_chain(chain, path)
    else:
        classes = optimize_by_hand(chain).save_chain(path)  # the TracedChain method
    text = path.read_text("utf-8")
    assert KEY not in text
    assert "afnio_prompt_id" not in text and "afnio_integrations" not in text
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-from-the-environment")
    loaded = lc.load_chain(path)

    before, requests_before = sent(sim, lambda: chain.invoke(MESSAGE))
    after, requests_after = sent(sim, lambda: loaded.invoke(MESSAGE))
    assert requests_after == requests_before  # same messages, tools, kwargs
    contents = [m["content"] for m in json.loads(requests_after[0])["messages"]]
    assert any(RULE in content for content in contents)
    assert comparable(after) == comparable(before)
    assert "negative" in json.dumps(comparable(after))

    # plain LangChain, with the classes save_chain returned as allowed_objects
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LangChainBetaWarning)
        plain = loads(
            text,
            allowed_objects=classes,
            secrets_map={"OPENAI_API_KEY": "sk-test-plain"},
        )
    again, requests_plain = sent(sim, lambda: plain.invoke(MESSAGE))
    assert requests_plain == requests_before
    assert comparable(again) == comparable(before)


def test_optimize_then_save_chain_directly_then_load_chain(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with backward_client(sim):
        prompt = classify_prompt()
        chain = prompt | chat(sim) | StrOutputParser()
        chain, report = lc.optimize(
            chain,
            TRAINSET,
            exact,
            epochs=2,
            batch_size=4,
            progress=False,
            model=SIMULATOR_MODEL,
        )
    optimized = prompt.messages[0].prompt.template
    assert optimized != CLASSIFY and report.score_after > report.score_before

    path = tmp_path / "chain.json"
    lc.save_chain(chain, path)  # the chain optimize returned: no trace() again
    assert KEY not in path.read_text("utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-from-the-environment")
    loaded = lc.load_chain(path)
    assert loaded.first.messages[0].prompt.template == optimized
    assert loaded.first.messages[0].prompt.metadata in (None, {})
    assert loaded.invoke({"message": "Awful service again."}) == chain.invoke(
        {"message": "Awful service again."}
    )
    assert sim.requests[-1]["messages"][0]["content"] == optimized


def test_the_file_holds_no_api_key_explicit_or_from_the_environment(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "explicit.json"
    lc.save_chain(classify_prompt() | chat(sim) | StrOutputParser(), explicit)
    text = explicit.read_text("utf-8")
    assert KEY not in text and "sk-" not in text
    node = json.loads(text)["kwargs"]["middle"][0]["kwargs"]["openai_api_key"]
    assert node == {"lc": 1, "type": "secret", "id": ["OPENAI_API_KEY"]}

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-EnvKey5566778899")
    from_env = tmp_path / "from_env.json"
    model = ChatOpenAI(model=SIMULATOR_MODEL, base_url=sim.base_url)
    lc.save_chain(classify_prompt() | model, from_env)
    assert "sk-test-EnvKey5566778899" not in from_env.read_text("utf-8")


def test_load_chain_takes_the_key_from_the_environment_or_secrets_map(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chain.json"
    lc.save_chain(classify_prompt() | chat(sim) | StrOutputParser(), path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(lc.ChainLoadError, match="needs the secret OPENAI_API_KEY"):
        lc.load_chain(path)
    mapped = lc.load_chain(path, secrets_map={"OPENAI_API_KEY": "sk-test-mapped"})
    assert mapped.middle[0].openai_api_key.get_secret_value() == "sk-test-mapped"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-env")
    loaded = lc.load_chain(path)
    assert loaded.middle[0].openai_api_key.get_secret_value() == "sk-test-env"
    assert loaded.middle[0].openai_api_base == sim.base_url
    with pytest.raises(lc.ChainLoadError, match="pass secrets_map"):
        lc.load_chain(path, secrets_from_env=False)


PLAIN_LOADER = """
import json, os, sys
from pathlib import Path

# the call documented for plain langchain_core (docs: Saving and loading a chain)
from langchain_core.load import loads
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import (
    ChatPromptTemplate,
    HumanMessagePromptTemplate,
    PromptTemplate,
    SystemMessagePromptTemplate,
)
from langchain_core.runnables import RunnableSequence
from langchain_openai import ChatOpenAI

chain = loads(
    Path(sys.argv[1]).read_text("utf-8"),
    allowed_objects=[
        RunnableSequence,
        ChatPromptTemplate,
        SystemMessagePromptTemplate,
        HumanMessagePromptTemplate,
        PromptTemplate,
        ChatOpenAI,
        StrOutputParser,
    ],
    secrets_map={"OPENAI_API_KEY": os.environ["OPENAI_API_KEY"]},
)
print(json.dumps(chain.invoke({"message": "I am frustrated with the heating."})))
"""


def test_plain_langchain_loads_the_file_with_the_documented_call(
    sim: Simulator, tmp_path: Path
) -> None:
    from langchain_core.prompts import (
        HumanMessagePromptTemplate,
        SystemMessagePromptTemplate,
    )
    from langchain_core.runnables import RunnableSequence

    chain = classify_prompt() | chat(sim) | StrOutputParser()
    traced = optimize_by_hand(chain)
    path = tmp_path / "chain.json"
    classes = lc.save_chain(traced, path)
    assert set(classes) == {
        RunnableSequence,
        ChatPromptTemplate,
        SystemMessagePromptTemplate,
        HumanMessagePromptTemplate,
        PromptTemplate,
        ChatOpenAI,
        StrOutputParser,
    }
    sim.reset_stats()
    assert run_without_afnio(PLAIN_LOADER, path, "sk-test-plain") == "negative"
    assert sim.requests[-1]["messages"][0]["content"] == OPTIMIZED


def test_export_copies_a_chain_holding_a_chat_openai(sim: Simulator) -> None:
    prompt = classify_prompt()
    model = chat(sim)
    chain = prompt | model | StrOutputParser()
    traced = optimize_by_hand(chain)
    exported = traced.export()
    assert exported is not chain and exported.first is not prompt
    assert exported.first.messages[0].prompt.template == OPTIMIZED
    assert "afnio_prompt_id" not in (exported.first.metadata or {})
    copied = exported.middle[0]
    assert copied is not model and copied.root_client is model.root_client
    copied.temperature = 0.5  # the copy has its own settings
    assert model.temperature is None
    assert exported.invoke(MESSAGE) == chain.invoke(MESSAGE) == "negative"
    exported.first.messages[0].prompt.template = CLASSIFY
    assert prompt.messages[0].prompt.template == OPTIMIZED


def shout(message: Any) -> str:
    return str(message.content).upper()


def test_save_chain_names_a_runnable_lambda_and_says_what_to_do(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "chain.json"
    chain = classify_prompt() | chat(sim) | RunnableLambda(shout)
    with pytest.raises(lc.ChainSaveError) as caught:
        lc.save_chain(chain, path)
    message = str(caught.value)
    assert "chain.last: RunnableLambda(shout at test_save.py:" in message
    assert "save_prompts" in message and "load_prompts" in message
    assert not path.exists()


def test_save_chain_names_every_part_langchain_cannot_serialize(
    sim: Simulator, tmp_path: Path
) -> None:
    from langchain_core.example_selectors import LengthBasedExampleSelector

    selector = LengthBasedExampleSelector(
        examples=[{"input": "a", "output": "b"}],
        example_prompt=PromptTemplate.from_template("{input} {output}"),
    )
    dynamic = FewShotChatMessagePromptTemplate(
        example_selector=selector,
        example_prompt=ChatPromptTemplate.from_messages(
            [("human", "{input}"), ("ai", "{output}")]
        ),
        input_variables=["message"],
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), dynamic, ("human", "{message}")]
    )
    chain = RunnableParallel(
        a=prompt | chat(sim) | StrOutputParser(),
        b=classify_prompt() | chat(sim) | JsonOutputParser(),
    )
    with pytest.raises(lc.ChainSaveError) as caught:
        lc.save_chain(chain, tmp_path / "chain.json")
    message = str(caught.value)
    assert "chain.steps__['a'].first.messages[1]" in message
    assert "example_selector" in message
    assert "chain.steps__['b'].last: JsonOutputParser()" in message


LIVE = "live-Key-0123456789abcdef"  # a live key that matches no credential pattern


def openai(**kwargs: Any) -> ChatOpenAI:
    """A ChatOpenAI that is only saved, never called."""
    kwargs.setdefault("base_url", "http://127.0.0.1:9/v1")
    return ChatOpenAI(model=SIMULATOR_MODEL, api_key=KEY, max_retries=0, **kwargs)


# each case is caught by one rule only (the values match no other rule)
CREDENTIALS: dict[str, tuple[Callable[[], Any], str, str]] = {
    "URL password": (
        lambda: classify_prompt() | openai(base_url="http://me:pw-1234@127.0.0.1:9/v1"),
        "chain.last.openai_api_base",
        "a URL holding a credential",
    ),
    "proxy password": (
        lambda: (
            classify_prompt()
            | openai(openai_proxy="http://me:pw-1234@proxy.invalid:8080")
        ),
        "chain.last.openai_proxy",
        "a URL holding a credential",
    ),
    "default_query name": (
        lambda: classify_prompt() | openai(default_query={"key": "q-1234"}),
        "chain.last.default_query['key']",
        "a query parameter named as a credential",
    ),
    "header name": (
        lambda: classify_prompt() | openai(default_headers={"X-Vault-Token": "v-1"}),
        "chain.last.default_headers['X-Vault-Token']",
        "a header named as a credential",
    ),
    "header value": (
        lambda: (
            classify_prompt()
            | openai(default_headers={"X-Custom": "Bearer abc.def.ghi"})
        ),
        "chain.last.default_headers['X-Custom']",
        "a value that looks like a credential",
    ),
    "model_kwargs extra_headers": (
        lambda: (
            classify_prompt()
            | openai(model_kwargs={"extra_headers": {"X-Vault-Token": "v-1"}})
        ),
        "chain.last.model_kwargs['extra_headers']['X-Vault-Token']",
        "a header named as a credential",
    ),
    "bind(extra_headers=)": (
        lambda: (
            classify_prompt()
            | openai().bind(extra_headers={"Authorization": "Token t-1234"})
        ),
        "chain.last.kwargs['extra_headers']['Authorization']",
        "a header named as a credential",
    ),
    "with_config(configurable=)": (
        lambda: (
            classify_prompt() | openai().with_config(configurable={"api_key": "c-1234"})
        ),
        "chain.last.config['configurable']['api_key']",
        "a key named as a credential",
    ),
    "the live key in a prompt text": (
        lambda: (
            ChatPromptTemplate.from_messages(
                [("system", f"Use the token {LIVE}."), ("human", "{message}")]
            )
            | ChatOpenAI(model=SIMULATOR_MODEL, api_key=LIVE, base_url="http://h/v1")
        ),
        "chain.first.messages[0].prompt.template",
        "the API key of a model of the chain",
    ),
}


@pytest.mark.parametrize("case", list(CREDENTIALS))
def test_save_chain_refuses_a_credential_outside_the_api_key(
    case: str, tmp_path: Path
) -> None:
    build, where, why = CREDENTIALS[case]
    path = tmp_path / "chain.json"
    with pytest.raises(lc.ChainSaveError) as caught:
        lc.save_chain(build(), path)
    assert f"{where}: {why}" in str(caught.value)
    assert "add it to the loaded chain" in str(caught.value)
    assert not path.exists()


def test_save_chain_keeps_headers_that_are_no_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = {"X-Session-Id": "run-42", "X-Request-Id": "r-7", "X-Trace": "on"}
    path = tmp_path / "chain.json"
    lc.save_chain(classify_prompt() | openai(default_headers=headers), path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-env")
    assert lc.load_chain(path).last.default_headers == headers


def test_save_chain_refuses_jinja2_templates_which_the_loader_refuses(
    sim: Simulator, tmp_path: Path
) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{{ message }}")], template_format="jinja2"
    )
    with pytest.raises(lc.ChainSaveError, match="jinja2"):
        lc.save_chain(prompt | chat(sim), tmp_path / "chain.json")


def test_save_chain_path_errors_name_the_argument(
    sim: Simulator, tmp_path: Path
) -> None:
    chain = classify_prompt() | chat(sim)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        lc.save_chain(chain, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist: create it first"):
        lc.save_chain(chain, tmp_path / "missing" / "chain.json")
    with pytest.raises(TypeError, match="`path` must be a file path"):
        lc.save_chain(chain, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`chain` must be a LangChain chain"):
        lc.save_chain({"not": "a chain"}, tmp_path / "chain.json")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_the_previous_file_whole(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chain.json"
    lc.save_chain(classify_prompt() | chat(sim) | StrOutputParser(), path)
    first = path.read_text("utf-8")
    traced = optimize_by_hand(classify_prompt() | chat(sim) | StrOutputParser())

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        lc.save_chain(traced, path)
    assert path.read_text("utf-8") == first
    assert [p.name for p in tmp_path.iterdir()] == ["chain.json"]


def tampered(path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    tree = json.loads(path.read_text("utf-8"))
    edit(tree)
    out = path.with_name("tampered.json")
    out.write_text(json.dumps(tree), "utf-8")
    return out


def test_load_chain_admits_only_the_classes_of_its_allowlist(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_openai import OpenAI as OpenAILLM

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-env")
    path = tmp_path / "chain.json"
    lc.save_chain(classify_prompt() | chat(sim) | StrOutputParser(), path)

    def to_llm(tree: dict[str, Any]) -> None:
        tree["kwargs"]["middle"][0]["id"] = ["langchain", "llms", "openai", "OpenAI"]
        tree["kwargs"]["middle"][0]["kwargs"].pop("openai_api_base")

    llm = tampered(path, to_llm)
    with pytest.raises(lc.ChainLoadError, match=r"allow=\[TheClass"):
        lc.load_chain(llm)
    assert isinstance(lc.load_chain(llm, allow=[OpenAILLM]).middle[0], OpenAILLM)

    def to_community(tree: dict[str, Any]) -> None:
        tree["kwargs"]["last"]["id"] = ["langchain_community", "llms", "X", "Y"]

    with pytest.raises(lc.ChainLoadError, match="does not load by default"):
        lc.load_chain(tampered(path, to_community))

    def to_os(tree: dict[str, Any]) -> None:
        tree["kwargs"]["last"]["id"] = ["os", "system"]

    with pytest.raises(lc.ChainLoadError, match="no LangChain class"):
        lc.load_chain(tampered(path, to_os))


def test_load_chain_reads_only_the_secrets_its_classes_declare(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-env")
    monkeypatch.setenv("AFNIO_TEST_OTHER_SECRET", "not-for-the-model")
    path = tmp_path / "chain.json"
    lc.save_chain(classify_prompt() | chat(sim) | StrOutputParser(), path)

    def rename(tree: dict[str, Any]) -> None:
        secret = tree["kwargs"]["middle"][0]["kwargs"]["openai_api_key"]
        secret["id"] = ["AFNIO_TEST_OTHER_SECRET"]

    with pytest.raises(lc.ChainLoadError, match="no class of the chain declares"):
        lc.load_chain(tampered(path, rename))

    def header(tree: dict[str, Any]) -> None:
        tree["kwargs"]["middle"][0]["kwargs"]["default_headers"] = {
            "X-Leak": {"lc": 1, "type": "secret", "id": ["OPENAI_API_KEY"]}
        }

    with pytest.raises(lc.ChainLoadError, match=r"default_headers\['X-Leak'\]"):
        lc.load_chain(tampered(path, header))


def test_load_chain_says_what_a_file_is_when_it_is_no_saved_chain(
    sim: Simulator, tmp_path: Path
) -> None:
    traced = optimize_by_hand(classify_prompt() | chat(sim) | StrOutputParser())
    prompts = tmp_path / "prompts.json"
    traced.save_prompts(prompts)
    with pytest.raises(lc.ChainLoadError, match="load_prompts"):
        lc.load_chain(prompts)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", "utf-8")
    with pytest.raises(lc.ChainLoadError, match="not JSON"):
        lc.load_chain(broken)
    with pytest.raises(FileNotFoundError, match="save_chain"):
        lc.load_chain(tmp_path / "missing.json")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        lc.load_chain(tmp_path)


def saved_chain(tmp_path: Path) -> Path:
    """``prompt | ChatOpenAI | parser`` saved (its model never called)."""
    path = tmp_path / "chain.json"
    lc.save_chain(classify_prompt() | openai() | StrOutputParser(), path)
    return path


def secret(ids: Any) -> dict[str, Any]:
    return {"lc": 1, "type": "secret", "id": ids}


def test_load_chain_refuses_a_secret_reference_whose_id_is_not_a_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LangChain's loader unpacks any iterable ([key] = value["id"]): a dict id
    # would fill the real key into a header or a prompt text
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-RealKey0123456789")
    path = saved_chain(tmp_path)

    def header(tree: dict[str, Any]) -> None:
        model = tree["kwargs"]["middle"][0]["kwargs"]
        model["default_headers"] = {"X-Leak": secret({"OPENAI_API_KEY": 0})}

    def prompt(tree: dict[str, Any]) -> None:
        message = tree["kwargs"]["first"]["kwargs"]["messages"][0]
        message["kwargs"]["prompt"]["kwargs"]["template"] = secret(
            {"OPENAI_API_KEY": 0}
        )

    def two_names(tree: dict[str, Any]) -> None:
        model = tree["kwargs"]["middle"][0]["kwargs"]
        model["openai_api_key"] = secret(["OPENAI_API_KEY", "OTHER"])

    for edit, where in [
        (header, r"chain\.middle\[0\]\.default_headers\['X-Leak'\]"),
        (prompt, r"chain\.first\.messages\[0\]\.prompt\.template"),
        (two_names, r"chain\.middle\[0\]\.openai_api_key"),
    ]:
        with pytest.raises(
            lc.ChainLoadError, match=f"malformed LangChain secret.*{where}"
        ):
            lc.load_chain(tampered(path, edit))
        with pytest.raises(lc.ChainLoadError, match="malformed"):
            lc.load_chain(tampered(path, edit), secrets_map={"OPENAI_API_KEY": "k"})


def test_secrets_map_fills_a_key_only_into_the_argument_its_class_declares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = saved_chain(tmp_path)
    mapped = {"OPENAI_API_KEY": "sk-test-mapped", "OTHER_KEY": "sk-test-other"}

    def header(tree: dict[str, Any]) -> None:
        model = tree["kwargs"]["middle"][0]["kwargs"]
        model["default_headers"] = {"X-Leak": secret(["OPENAI_API_KEY"])}
        model["openai_api_base"] = "https://attacker.invalid/v1"

    with pytest.raises(lc.ChainLoadError, match=r"default_headers\['X-Leak'\]"):
        lc.load_chain(tampered(path, header), secrets_map=mapped)

    def hidden(tree: dict[str, Any]) -> None:  # outside kwargs: revived all the same
        tree["kwargs"]["middle"][0]["graph"] = secret(["OPENAI_API_KEY"])

    with pytest.raises(lc.ChainLoadError, match=r"chain\.middle\[0\]\['graph'\]"):
        lc.load_chain(tampered(path, hidden), secrets_map=mapped)

    def rename(tree: dict[str, Any]) -> None:
        model = tree["kwargs"]["middle"][0]["kwargs"]
        model["openai_api_key"] = secret(["OTHER_KEY"])

    with pytest.raises(lc.ChainLoadError, match="no class of the chain declares"):
        lc.load_chain(tampered(path, rename), secrets_map=mapped)

    loaded = lc.load_chain(path, secrets_map=mapped)  # the declared place: filled
    assert loaded.middle[0].openai_api_key.get_secret_value() == "sk-test-mapped"


class Joke(BaseModel):
    setup: str


def save_error(chain: Any, tmp_path: Path) -> str:
    with pytest.raises(lc.ChainSaveError) as caught:
        lc.save_chain(chain, tmp_path / "chain.json")
    assert not (tmp_path / "chain.json").exists()
    return str(caught.value)


def test_save_chain_gives_the_reason_for_a_pydantic_class_not_exceptions(
    tmp_path: Path,
) -> None:
    bound = save_error(
        classify_prompt() | openai().bind(response_format=Joke), tmp_path
    )
    assert "chain.last.kwargs['response_format']" in bound
    assert "pydantic class Joke as response_format" in bound
    assert "Joke.model_json_schema()" in bound
    assert "exception" not in bound

    structured = save_error(
        classify_prompt() | openai().with_structured_output(Joke), tmp_path
    )
    assert "the pydantic class Joke: LangChain cannot serialize a class" in structured
    assert "exception" not in structured

    parser = save_error(
        classify_prompt() | openai() | PydanticOutputParser(pydantic_object=Joke),
        tmp_path,
    )
    assert "chain.last: PydanticOutputParser" in parser
    assert "it holds your pydantic class" in parser


def test_save_chain_explains_a_function_given_to_partial(tmp_path: Path) -> None:
    def today() -> str:
        return "Monday"

    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY + " Today is {day}."), ("human", "{message}")]
    ).partial(day=today)
    message = save_error(prompt | openai(), tmp_path)
    assert "chain.first.partial_variables['day']: function " in message
    assert "test_save_chain_explains_a_function_given_to_partial.<locals>.today" in (
        message
    )
    assert "a function given to .partial()" in message


def test_save_chain_refuses_fallbacks_and_retries_on_other_exception_types(
    tmp_path: Path,
) -> None:
    step = classify_prompt() | openai() | StrOutputParser()
    retry = save_error(step.with_retry(retry_if_exception_type=(ValueError,)), tmp_path)
    assert "chain.retry_exception_types[0]: <class 'ValueError'>" in retry
    assert "an exception type" in retry and "retry_if_exception_type=" in retry
    fallbacks = save_error(
        step.with_fallbacks([step], exceptions_to_handle=(KeyError,)), tmp_path
    )
    assert "chain.exceptions_to_handle[0]: <class 'KeyError'>" in fallbacks
    assert "an exception type" in fallbacks


def test_load_chain_argument_errors_name_the_argument_and_the_form(
    tmp_path: Path,
) -> None:
    path = saved_chain(tmp_path)
    with pytest.raises(TypeError, match=r"`allow` .*write allow=\[ChatOpenAI\]"):
        lc.load_chain(path, allow=ChatOpenAI)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`allow` .*got the str 'ChatOpenAI'"):
        lc.load_chain(path, allow="ChatOpenAI")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`allow` must be a list .*got int"):
        lc.load_chain(path, allow=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as caught:
        lc.load_chain(path, secrets_map="sk-test-NotAMap0123")  # type: ignore[arg-type]
    assert "`secrets_map` must be a dict" in str(caught.value)
    assert "{'OPENAI_API_KEY': key}" in str(caught.value)
    assert "sk-test-NotAMap0123" not in str(caught.value)  # the value is not shown
    with pytest.raises(TypeError, match="`secrets_map` must map variable names"):
        lc.load_chain(path, secrets_map={"OPENAI_API_KEY": None})  # type: ignore[dict-item]


def test_load_chain_tells_a_missing_class_from_a_missing_package(
    tmp_path: Path,
) -> None:
    path = saved_chain(tmp_path)
    for ids in (
        ["langchain_openai", "no_such_module", "ChatOpenAI"],
        ["langchain_openai", "chat_models", "NoSuchChat"],
    ):

        def rename(tree: dict[str, Any], ids: list[str] = ids) -> None:
            tree["kwargs"]["middle"][0]["id"] = ids

        with pytest.raises(lc.ChainLoadError) as caught:
            lc.load_chain(tampered(path, rename), secrets_map={"OPENAI_API_KEY": "k"})
        message = str(caught.value)
        assert "langchain-openai" in message and "does not have" in message
        assert "saved with another version" in message
        assert "not installed" not in message and "pip install" not in message

    def absent(tree: dict[str, Any]) -> None:
        tree["kwargs"]["middle"][0]["id"] = ["afnio_no_such_pkg", "chat", "Chat"]

    with pytest.raises(lc.ChainLoadError, match="no LangChain class"):
        lc.load_chain(tampered(path, absent))
    if importlib.util.find_spec("langchain_anthropic") is None:

        def anthropic(tree: dict[str, Any]) -> None:
            tree["kwargs"]["middle"][0]["id"] = [
                "langchain_anthropic",
                "chat_models",
                "ChatAnthropic",
            ]

        with pytest.raises(lc.ChainLoadError, match="pip install langchain-anthropic"):
            lc.load_chain(tampered(path, anthropic))


def test_export_gives_each_model_its_own_dict_settings(sim: Simulator) -> None:
    model = chat(sim, model_kwargs={"user": "u-1"}, default_headers={"X-Trace": "a"})
    chain = classify_prompt() | model | StrOutputParser()
    exported = optimize_by_hand(chain).export()
    copied = exported.middle[0]
    copied.model_kwargs["user"] = "u-2"
    copied.default_headers["X-Trace"] = "b"
    assert model.model_kwargs == {"user": "u-1"}
    assert model.default_headers == {"X-Trace": "a"}
    assert copied.root_client is model.root_client  # the HTTP client is shared
    assert exported.invoke(MESSAGE) == "negative"


def jinja2_template(tree: dict[str, Any]) -> None:
    """The human message's template made a jinja2 one."""
    message = tree["kwargs"]["first"]["kwargs"]["messages"][1]
    prompt = message["kwargs"]["prompt"]["kwargs"]
    prompt["template"] = "{{ message }}"
    prompt["template_format"] = "jinja2"


def nested_deeper_than_langchain_loads(tree: dict[str, Any]) -> None:
    """The parser's tags nested 250 lists deep."""
    nested: Any = "bottom"
    for _ in range(250):
        nested = [nested]
    tree["kwargs"]["last"]["kwargs"]["tags"] = nested


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (jinja2_template, "jinja2"),
        (nested_deeper_than_langchain_loads, "nests deeper than 200 levels"),
    ],
    ids=["a jinja2 template", "a file nested deeper than LangChain loads"],
)
def test_load_chain_refuses_a_file_langchain_cannot_load_safely(
    edit: Callable[[dict[str, Any]], None],
    match: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-env")
    path = saved_chain(tmp_path)
    with pytest.raises(lc.ChainLoadError, match=match):
        lc.load_chain(tampered(path, edit))
