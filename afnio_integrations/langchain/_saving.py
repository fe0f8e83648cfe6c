"""Saving a whole LangChain chain and loading it back: :func:`save_chain` and
:func:`load_chain`, with LangChain's own serialization (``langchain_core.load``), never
pickle.

**The file** is what ``langchain_core.load.dumpd`` makes of the chain, as UTF-8 JSON,
written atomically (:func:`afnio.serialization.write_atomic`), with afnio's prompt ids
removed from the prompts' metadata. Two rewrites keep the loaded chain equivalent
where LangChain cannot serialize a part as it is: a few-shot prompt with a fixed list
of examples (``FewShotChatMessagePromptTemplate``/``FewShotPromptTemplate`` with
``examples=[...]``) is saved as the ``ChatPromptTemplate``/``PromptTemplate`` it
formats to, examples written in; and ``with_fallbacks``/``with_retry`` that handle
``Exception`` (their default) are saved without that argument, so the default applies
again on load. Anything else LangChain cannot serialize (a ``RunnableLambda`` of your
code, a branch condition, ``JsonOutputParser``, ``PydanticOutputParser``,
``with_structured_output``, a pydantic class bound as ``response_format``, a function
given to ``.partial()``, a few-shot prompt with an ``example_selector``) makes
:func:`save_chain` raise :class:`ChainSaveError` naming where it is in the chain and
why.

**No credential is written.** A model's API key (``ChatOpenAI(api_key=...)`` or from
the environment) is stored by LangChain as a reference to its environment variable
(``{"lc": 1, "type": "secret", "id": ["OPENAI_API_KEY"]}``), never as a value;
:func:`save_chain` also refuses a chain whose file would hold a credential anywhere
else: a string under a credential name (``Authorization``, ``api_key``, and in
headers and queries any name containing ``auth``, ``key``, ``token``, ``secret``...,
but not an identifier such as ``X-Session-Id``), a credential-like value (``sk-...``,
``Bearer ...``), a URL with a password or key parameter, or any live API key value
of the chain's models.

**Loading** (:func:`load_chain`) admits exactly the classes the file names, and only
those of LangChain's own prompts, messages, runnables and output parsers
(``langchain_core``, classes LangChain marks serializable) and the chat models of
``langchain_openai``/``langchain_anthropic``, plus the classes given with ``allow=``;
each secret reference is filled only into the very argument its class declares
as a secret, under the variable it declares (``ChatOpenAI``'s ``openai_api_key`` <-
``OPENAI_API_KEY``), from ``secrets_map`` or else from the environment; a reference
anywhere else (a header, a prompt text) or under another variable is refused,
whichever source would fill it, and so is a malformed one.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel, BaseLanguageModel
from langchain_core.load import dumpd, loads
from langchain_core.load.serializable import Serializable
from langchain_core.prompts import (
    ChatPromptTemplate,
    FewShotChatMessagePromptTemplate,
    FewShotPromptTemplate,
    PromptTemplate,
)
from langchain_core.runnables import RunnableGenerator, RunnableLambda
from pydantic import BaseModel

from afnio._secrets import is_credential_name, looks_like_credential, mask_url
from afnio.serialization import write_atomic
from afnio_integrations.langchain._discovery import METADATA_KEY

__all__ = [
    "CORE_MODULES",
    "PARTNER_NAMESPACES",
    "ChainLoadError",
    "ChainSaveError",
    "copy_chain",
    "load_chain",
    "save_chain",
]

PARTNER_NAMESPACES = ("langchain_openai", "langchain_anthropic")
"""Packages whose chat models :func:`load_chain` loads without ``allow=``."""

CORE_MODULES = ("prompts", "messages", "runnables", "output_parsers", "prompt_values")
"""The ``langchain_core`` subpackages whose serializable classes :func:`load_chain`
loads without ``allow=``."""

_ESCAPED = "__lc_escaped__"  # LangChain's wrapper of user data that looks like a node
_NODE_TYPES = ("constructor", "secret", "not_implemented")


class ChainSaveError(ValueError):
    """:func:`save_chain` cannot write this chain: a part LangChain cannot serialize,
    a template LangChain's loader refuses, or a credential the file would hold."""


class ChainLoadError(ValueError):
    """:func:`load_chain` refuses this file or cannot build a chain from it."""


def _mappings() -> dict[tuple[str, ...], tuple[str, ...]]:
    """LangChain's map from the class paths written in files (old ones included) to
    the paths their classes are imported from: the one its loader uses."""
    module = importlib.import_module("langchain_core.load.load")
    found = getattr(module, "ALL_SERIALIZABLE_MAPPINGS", None)
    if isinstance(found, Mapping):
        return {tuple(k): tuple(v) for k, v in found.items()}
    from langchain_core.load import mapping

    merged: dict[tuple[str, ...], tuple[str, ...]] = {}
    for name in ("SERIALIZABLE_MAPPING", "OLD_CORE_NAMESPACES_MAPPING"):
        merged.update(getattr(mapping, name, {}))
    return merged


_MAPPINGS = _mappings()


# -- walking chains and files ------------------------------------------------------


def _objects(root: Any) -> Iterator[Any]:
    """Every pydantic object reachable from ``root`` through fields, lists, tuples and
    dicts, once each; a language model is yielded but not entered (its clients hold
    connections, not chain parts)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, BaseModel):
            yield obj
            if not isinstance(obj, BaseLanguageModel):
                stack.extend(vars(obj).values())
                stack.extend((obj.__pydantic_extra__ or {}).values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())


def _is_node(value: Any, kind: str | None = None) -> bool:
    """Whether LangChain's loader takes ``value`` for a node (of ``kind``): a dict
    with ``"lc": 1``, a node ``type`` and an ``id``, whatever that ``id`` holds (the
    loader unpacks any iterable: ``[key] = value["id"]``). :func:`_nodes` refuses a
    node whose ``id`` is not a list of strings."""
    return (
        isinstance(value, dict)
        and value.get("lc") == 1
        and isinstance(value.get("type"), str)
        and value["type"] in _NODE_TYPES
        and "id" in value
        and (kind is None or value["type"] == kind)
    )


def _well_formed(node: dict[str, Any]) -> bool:
    """Whether a node's ``id`` is what ``dumpd`` writes: a non-empty list of
    strings (one variable name for a secret)."""
    ids = node["id"]
    return (
        isinstance(ids, list)
        and bool(ids)
        and all(isinstance(part, str) for part in ids)
        and (node["type"] != "secret" or len(ids) == 1)
    )


def _nodes(tree: Any, where: str = "chain") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every node of a dumped tree with its location, written as an attribute path
    on the chain (``chain.middle[0].bound``), in document order: the nodes of a
    constructor's arguments, and also those under its other keys and under a
    secret's (LangChain's loader revives every dict it walks). User data that
    LangChain escaped is not entered.

    Raises:
        ChainLoadError: for a node whose ``id`` is not a non-empty list of strings
            (``dumpd`` never writes one; LangChain's loader would read a secret's
            variable name out of any iterable, e.g. ``{"OPENAI_API_KEY": 0}``).
    """
    if isinstance(tree, dict):
        if set(tree) == {_ESCAPED}:
            return
        if _is_node(tree):
            if not _well_formed(tree):
                raise ChainLoadError(
                    f"a malformed LangChain {tree['type']} node at {where}: its id "
                    "must be a list of names"
                    + (" (one, for a secret)" if tree["type"] == "secret" else "")
                    + f", got {tree['id']!r:.60}. It is not a chain saved by "
                    "save_chain."
                )
            yield where, tree
            if tree["type"] == "constructor":
                for key, value in _kwargs(tree).items():
                    yield from _nodes(value, f"{where}.{key}")
            for key, value in tree.items():
                if key not in ("lc", "type", "id", "kwargs"):
                    yield from _nodes(value, f"{where}[{key!r}]")
            return
        for key, value in tree.items():
            yield from _nodes(value, f"{where}[{key!r}]")
    elif isinstance(tree, list):
        for k, value in enumerate(tree):
            yield from _nodes(value, f"{where}[{k}]")


def _kwargs(node: dict[str, Any]) -> dict[str, Any]:
    """A constructor node's arguments (none when malformed)."""
    kwargs = node.get("kwargs")
    return kwargs if isinstance(kwargs, dict) else {}


def _depth(tree: Any) -> int:
    """How deeply ``tree``'s lists and dicts nest (iteratively: any depth)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            items = node.values() if isinstance(node, dict) else node
            stack.extend((item, level + 1) for item in items)
    return deepest


_MAX_DEPTH = 200  # as LangChain's loader


def _class_path(node: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(part) for part in node["id"])


def _import_path(class_path: tuple[str, ...]) -> tuple[str, ...]:
    """Where LangChain's loader imports the class a file names from."""
    return _MAPPINGS.get(class_path, class_path)


def _missing_class(target: tuple[str, ...]) -> str:
    """The error for a class path whose package is installed but has no such
    module or class: most likely a file saved with another version."""
    package = target[0].replace("_", "-")
    try:
        installed = f"{package} {importlib.metadata.version(package)}, the version "
        installed += "installed,"
    except importlib.metadata.PackageNotFoundError:
        installed = f"the installed version of {package}"
    return (
        f"The chain names {'.'.join(target)}, a class that {installed} does not "
        f"have: the file was probably saved with another version of {package}. "
        "Install that version, or save the chain again with this one."
    )


def _resolve(
    class_path: tuple[str, ...], namespaces: Iterable[str], missing_ok: bool = True
) -> type | None:
    """The ``Serializable`` class a file's node names, imported only from
    ``namespaces``; ``None`` when it names none there (nothing is imported then).

    Raises:
        ChainLoadError: when the package the class path names is not installed;
            or has no such module (or, unless ``missing_ok``, no such class).
    """
    target = _import_path(class_path)
    if len(target) < 2 or target[0] not in set(namespaces):
        return None
    try:
        module = importlib.import_module(".".join(target[:-1]))
    except ImportError as exc:
        if not (exc.name and exc.name.split(".")[0] == target[0]):
            return None
        if importlib.util.find_spec(target[0]) is None:
            raise ChainLoadError(
                f"The chain needs {target[-1]} from the package {target[0]}, which is "
                f"not installed: pip install {target[0].replace('_', '-')}."
            ) from exc
        raise ChainLoadError(_missing_class(target)) from exc
    cls = getattr(module, target[-1], None)
    if cls is None and not missing_ok:
        raise ChainLoadError(_missing_class(target))
    if isinstance(cls, type) and issubclass(cls, Serializable):
        return cls
    return None


def _admitted_by_default(cls: type) -> bool:
    """Whether :func:`load_chain` loads ``cls`` without ``allow=``: a class of
    LangChain's prompts, messages, runnables or output parsers that LangChain marks
    serializable, or a chat model of ``langchain_openai``/``langchain_anthropic``."""
    module = cls.__module__.split(".")
    if module[0] == "langchain_core":
        return (
            len(module) > 1
            and module[1] in CORE_MODULES
            and issubclass(cls, Serializable)
            and bool(cls.is_lc_serializable())
        )
    return module[0] in PARTNER_NAMESPACES and issubclass(cls, BaseChatModel)


def _secret_fields(obj: Serializable) -> dict[str, str]:
    """The constructor arguments ``obj``'s class declares as secrets, each with the
    environment variable it is saved as (``lc_secrets`` over the class's bases, with
    field aliases, as ``Serializable.to_json`` merges them)."""
    secrets: dict[str, str] = {}
    for klass in [None, *type(obj).mro()]:
        if klass is Serializable:
            break
        this = obj if klass is None else super(klass, obj)  # type: ignore[arg-type]
        try:
            secrets.update(this.lc_secrets)
        except Exception:  # a class whose declaration cannot be read
            continue
    fields = getattr(type(obj), "model_fields", {})
    for key, env in list(secrets.items()):
        alias = fields[key].alias if key in fields else None
        if alias:
            secrets[alias] = env
    return secrets


def _declared_secrets(cls: type) -> dict[str, str]:
    """:func:`_secret_fields` of a class (read from an instance built without
    validation, so no constructor code runs)."""
    try:
        instance = cls.model_construct()  # type: ignore[attr-defined]
    except Exception:  # not a pydantic class: no secrets declared
        return {}
    return _secret_fields(instance)


# -- saving --------------------------------------------------------------------------


def _file_path(path: Any) -> Path:
    """``path`` (the ``path`` argument of save_chain/load_chain) as a ``Path``.

    Raises:
        TypeError: ``path`` is neither a ``str`` nor an ``os.PathLike``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "`path` must be a file path (str or os.PathLike), got "
            f"{type(path).__name__}."
        )
    return Path(path)


def _check_save_path(path: Any) -> Path:
    target = _file_path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"`path` {str(target)!r} is a folder: give a file name, e.g. "
            f"{str(target / 'chain.json')!r}."
        )
    parent = target.parent
    if not parent.exists():
        raise FileNotFoundError(
            f"The folder of `path` ({str(parent)!r}) does not exist: create it first "
            "(save_chain creates no folders)."
        )
    if not parent.is_dir():
        raise NotADirectoryError(
            f"The folder of `path` ({str(parent)!r}) is a file, not a folder."
        )
    return target


def _runnable_of(chain: Any) -> Any:
    """The chain to save: a TracedChain's chain with its current texts written in,
    or the chain itself."""
    from afnio_integrations.langchain._traced import TracedChain

    if isinstance(chain, TracedChain):
        chain.write_back()
        return chain.chain
    if not isinstance(chain, Serializable):
        raise TypeError(
            "`chain` must be a LangChain chain (a Runnable such as `prompt | model | "
            "parser`, or the chain optimize() returned) or a TracedChain, got "
            f"{type(chain).__name__}."
        )
    return chain


def _baked(prompt: Any) -> Any:
    """The serializable prompt a few-shot prompt with fixed examples formats to
    (``None`` when its examples are chosen at run time by an ``example_selector``).

    ``FewShotChatMessagePromptTemplate`` formats its examples into messages that do
    not depend on the inputs: a ``ChatPromptTemplate`` of those very messages (put
    in its place inside the outer chat prompt, it formats to the same list).
    ``FewShotPromptTemplate`` joins prefix, formatted examples and suffix into one
    template that it then formats with the inputs: a ``PromptTemplate`` of that
    template, with the same variables, partials and format."""
    if getattr(prompt, "example_selector", None) is not None:
        return None
    metadata = {
        k: v for k, v in (prompt.metadata or {}).items() if k != METADATA_KEY
    } or None
    if isinstance(prompt, FewShotChatMessagePromptTemplate):
        return ChatPromptTemplate(
            messages=prompt.format_messages(), metadata=metadata, tags=prompt.tags
        )
    examples = [
        {k: e[k] for k in prompt.example_prompt.input_variables}
        for e in prompt.examples or []
    ]
    pieces = [
        prompt.prefix,
        *(prompt.example_prompt.format(**example) for example in examples),
        prompt.suffix,
    ]
    return PromptTemplate(
        template=prompt.example_separator.join(piece for piece in pieces if piece),
        input_variables=list(prompt.input_variables),
        partial_variables=dict(prompt.partial_variables),
        template_format=prompt.template_format,
        metadata=metadata,
        tags=prompt.tags,
    )


def _model_copy(model: BaseLanguageModel) -> BaseLanguageModel:
    """A copy of a language model with its own settings: its dict, list and set
    fields (``model_kwargs``, ``default_headers``, ``stop``...) deep-copied, its
    other fields shared (the HTTP clients, which hold locks and connections and
    cannot be copied; strings, numbers and secrets, which cannot change)."""
    values = dict(vars(model))
    values.update(model.__pydantic_extra__ or {})
    own: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, (dict, list, set)):
            try:
                own[key] = copy.deepcopy(value)
            except Exception:  # a container holding a client: shared
                continue
    return model.model_copy(update=own)


def copy_chain(chain: Any, replace: Mapping[int, Any] | None = None) -> Any:
    """A deep copy of ``chain`` in which every language model is a copy with its own
    settings (its dict and list fields, such as ``model_kwargs`` and
    ``default_headers``, deep-copied) sharing the original's HTTP clients (which hold
    locks and connections and cannot be copied), and each object whose ``id`` is a
    key of ``replace`` becomes that value.

    This is how ``TracedChain.export()`` copies a chain holding a ``ChatOpenAI``,
    which ``copy.deepcopy`` refuses ("cannot pickle '_thread.RLock' object").
    """
    memo: dict[int, Any] = {}
    for obj in _objects(chain):
        if isinstance(obj, BaseLanguageModel):
            memo[id(obj)] = _model_copy(obj)
    memo.update(replace or {})
    try:
        return copy.deepcopy(chain, memo)
    except TypeError as exc:
        raise TypeError(
            f"The chain could not be copied ({exc}): one of its parts holds an "
            "object that cannot be copied. Save it with save_chain(chain, path) and "
            "load it with load_chain(path) instead."
        ) from exc


def _default_exceptions(cls: type | None, key: str, value: Any) -> bool:
    """Whether ``value`` (a dumped kwarg of ``cls``) is ``(Exception,)``, the
    field's default, which LangChain writes as unserializable."""
    fields = getattr(cls, "model_fields", {})
    field = fields.get(key)
    return (
        field is not None
        and field.default == (Exception,)
        and isinstance(value, list)
        and len(value) == 1
        and _is_node(value[0], "not_implemented")
        and value[0]["id"] == ["builtins", "Exception"]
    )


def _tidy(tree: Any) -> None:
    """In place: drop afnio's prompt ids from metadata, and the default
    ``(Exception,)`` of ``with_fallbacks``/``with_retry`` (unserializable as written;
    the class default restores it on load)."""
    for _, node in list(_nodes(tree)):
        if node["type"] != "constructor" or not isinstance(node.get("kwargs"), dict):
            continue
        kwargs = node["kwargs"]
        metadata = kwargs.get("metadata")
        if isinstance(metadata, dict) and METADATA_KEY in metadata:
            rest = {k: v for k, v in metadata.items() if k != METADATA_KEY}
            if rest:
                kwargs["metadata"] = rest
            else:
                del kwargs["metadata"]
        cls = _resolve(_class_path(node), ("langchain_core",))
        for key in [k for k, v in kwargs.items() if _default_exceptions(cls, k, v)]:
            del kwargs[key]


_HINTS = {
    "RunnableLambda": ("it runs your Python code, which LangChain's JSON cannot hold"),
    "RunnableGenerator": "it runs Python code (with_structured_output adds one)",
    "FewShotChatMessagePromptTemplate": (
        "its examples come from an example_selector at run time (a few-shot prompt "
        "with a fixed examples=[...] list is saved)"
    ),
    "FewShotPromptTemplate": (
        "its examples come from an example_selector at run time (a few-shot prompt "
        "with a fixed examples=[...] list is saved)"
    ),
    "PydanticOutputParser": (
        "it holds your pydantic class, which LangChain cannot serialize; build the "
        "parser in code"
    ),
}


_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*')\]")


def _live_at(root: Any, where: str) -> Any:
    """The live object at a location of :func:`_nodes` (``chain.middle[0].bound``),
    or ``None`` when the path does not lead to one."""
    obj = root
    for attr, index, key in _STEP.findall(where[len("chain") :]):
        try:
            if attr:
                obj = getattr(obj, attr)
            elif index:
                obj = obj[int(index)]
            else:
                obj = obj[ast.literal_eval(key)]
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            return None
    return obj


def _describe(obj: Any) -> str | None:
    """A runnable of user code named by its function and where it is defined
    (``RunnableLambda(<lambda> at app.py:12)``), a function likewise (``function
    today at app.py:3``), else ``None``."""
    if isinstance(obj, (RunnableLambda, RunnableGenerator)):
        func = None
        for attr in ("func", "afunc", "_transform", "_atransform"):
            func = getattr(obj, attr, None)
            if callable(func):
                break
        named = _function_at(func)
        return f"{type(obj).__name__}({named})" if named else None
    named = _function_at(obj)
    return f"function {named}" if named else None


def _function_at(func: Any) -> str | None:
    """``name at file.py:line`` for a Python function, else ``None``."""
    code = getattr(func, "__code__", None)
    if code is None:
        return None
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", "?")
    return f"{name} at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"


def _unserializable(tree: Any, root: Any) -> list[str]:
    """One line per part LangChain could not serialize: where, what, why."""
    lines = []
    for where, node in _nodes(tree):
        if node["type"] != "not_implemented":
            continue
        name = str(node["id"][-1])
        what = _describe(_live_at(root, where)) or str(node.get("repr") or name)
        if len(what) > 120:
            what = what[:117] + "..."
        why = _HINTS.get(name, "LangChain does not serialize this class")
        if str(node.get("repr", "")).startswith("<class "):
            why = _class_hint(_live_at(root, where), where)
        elif ".partial_variables[" in where:
            why = (
                "a function given to .partial(): your code computes the value at "
                "run time; give a fixed value (.partial(x='...')) or build the "
                "prompt in code"
            )
        lines.append(f"  {where}: {what} ({why})")
    return lines


_EXCEPTION_ARGS = ("exceptions_to_handle", "retry_exception_types")
"""The arguments of ``RunnableWithFallbacks``/``RunnableRetry`` holding exception
types (``with_fallbacks(exceptions_to_handle=)``, ``with_retry(
retry_if_exception_type=)``)."""


def _class_hint(value: Any, where: str) -> str:
    """Why a Python class in the chain cannot be saved, and what to do instead."""
    in_exception_arg = any(f".{arg}[" in where for arg in _EXCEPTION_ARGS)
    if in_exception_arg or (
        isinstance(value, type) and issubclass(value, BaseException)
    ):
        return (
            "an exception type: with_fallbacks/with_retry are saved only when they "
            "handle Exception, their default; drop exceptions_to_handle= / "
            "retry_if_exception_type=, or build this step in code"
        )
    if isinstance(value, type) and issubclass(value, BaseModel):
        name = value.__name__
        if "['response_format']" in where:
            return (
                f"the pydantic class {name} as response_format: LangChain cannot "
                "serialize a class; bind its JSON schema instead: response_format="
                "{'type': 'json_schema', 'json_schema': {'name': "
                f"'{name}', 'schema': {name}.model_json_schema()}}}}"
            )
        return (
            f"the pydantic class {name}: LangChain cannot serialize a class, so "
            "a step built from one (with_structured_output, PydanticOutputParser) "
            "cannot be saved; build that step in code"
        )
    return (
        "a Python class, which LangChain cannot serialize: pass plain data (a "
        "dict, a JSON schema) instead, or build this step in code"
    )


_HEADERS = ("default_headers", "extra_headers", "headers")
_QUERIES = ("default_query", "extra_query")
_IDENTIFIER = re.compile(r"(?:^|[-_.\s])[iI][dD][sS]?$|[a-z](?:Id|ID)s?$")

_LIVE_KEY = "the API key of a model of the chain"
_VALUE = "a value that looks like a credential (a provider key, a Bearer/Basic value)"
_URL = "a URL holding a credential (a password or a key parameter)"


def _credential_name(name: str, header: bool, query: bool) -> bool:
    """Whether a setting, header or query parameter named ``name`` holds a credential
    (:func:`afnio._secrets.is_credential_name`: ``Authorization``, ``api-key``,
    ``*_token``...; in a header or query, also a name containing ``auth``, ``key``,
    ``token``, ``secret``, ``session``...). A header or query name that names an
    identifier (``X-Session-Id``, ``X-Request-Id``, ``keyId``) holds no secret by its
    name: its value is still checked."""
    if is_credential_name(name):
        return True
    if not (header or query) or _IDENTIFIER.search(name.strip()):
        return False
    return is_credential_name(name, header=header, query=query)


def _credential_at(
    value: Any, where: str, live: set[str], settings: bool, header: bool, query: bool
) -> tuple[str, str] | None:
    """The first credential in a dumped kwarg value, as (location, why): a string
    holding a live API key of the chain; with ``settings`` (the arguments of anything
    but a prompt or message, whose texts are the user's), also a string under a
    credential name (:func:`_credential_name`; header and query names inside
    ``default_headers``/``default_query``...), a credential-like value (``sk-...``,
    ``Bearer ...``) or a URL with a password or key parameter. Nested nodes and
    secret references are not entered: they are checked on their own."""
    if _is_node(value):
        return None
    if isinstance(value, dict):
        if set(value) == {_ESCAPED}:
            value = value[_ESCAPED]
        for key, item in value.items():
            name = str(key).lower().replace("-", "_")
            here = f"{where}[{key!r}]"
            if (
                settings
                and isinstance(item, str)
                and item
                and _credential_name(str(key), header=header, query=query)
            ):
                kind = "header" if header else "query parameter" if query else "key"
                return here, f"a {kind} named as a credential"
            found = _credential_at(
                item,
                here,
                live,
                settings,
                header or name in _HEADERS,
                query or name in _QUERIES,
            )
            if found:
                return found
        return None
    if isinstance(value, list):
        for k, item in enumerate(value):
            found = _credential_at(item, f"{where}[{k}]", live, settings, header, query)
            if found:
                return found
        return None
    if not isinstance(value, str):
        return None
    if any(secret in value for secret in live):
        return where, _LIVE_KEY
    if settings and looks_like_credential(value):
        return where, _VALUE
    if settings and "://" in value and mask_url(value) != value:
        return where, _URL
    return None


def _credentials(tree: Any, live: set[str]) -> list[str]:
    """Every place where the dumped chain would hold a credential, as
    ``location: why`` (see :func:`_credential_at`)."""
    found = []
    for where, node in _nodes(tree):
        if node["type"] != "constructor":
            continue
        path = _class_path(node)
        settings = "prompts" not in path and "messages" not in path
        for key, value in _kwargs(node).items():
            here = f"{where}.{key}"
            named = isinstance(value, str) and value and is_credential_name(key)
            if settings and named:
                found.append(f"{here}: an argument named as a credential")
                continue
            name = key.lower()
            spot = _credential_at(
                value, here, live, settings, name in _HEADERS, name in _QUERIES
            )
            if spot:
                found.append(f"{spot[0]}: {spot[1]}")
    return found


def _live_secrets(chain: Any) -> set[str]:
    """The values of the secrets the chain's objects hold (their API keys), at least
    8 characters long (a shorter placeholder such as ``"k"`` is no key)."""
    values: set[str] = set()
    for obj in _objects(chain):
        if not isinstance(obj, Serializable):
            continue
        for key in _secret_fields(obj):
            value = getattr(obj, key, None)
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            if isinstance(value, str) and len(value) >= 8:
                values.add(value)
    return values


def _sorted_classes(classes: Iterable[type]) -> tuple[type[Serializable], ...]:
    unique = {id(c): c for c in classes}.values()
    return tuple(sorted(unique, key=lambda c: (c.__module__, c.__qualname__)))


def save_chain(chain: Any, path: str | os.PathLike[str]) -> tuple[type, ...]:
    """Save a LangChain chain as LangChain JSON, to load with :func:`load_chain`
    (or with plain ``langchain_core.load.loads``).

    ``chain`` is your chain (``prompt | model | parser``, the chain ``optimize``
    returns: its prompts already hold the optimized texts) or a ``TracedChain``
    (its current texts are written back first). The file is
    ``langchain_core.load.dumpd(chain)`` as UTF-8 JSON, written atomically, without
    afnio's prompt ids. API keys are written as references to their environment
    variables (``OPENAI_API_KEY``), never as values, also when passed as
    ``api_key=``.

    Example::

        chain, report = optimize(chain, trainset, metric, model="gpt-4o-mini")
        save_chain(chain, "chain.json")
        ...
        chain = load_chain("chain.json")  # the key from OPENAI_API_KEY

    Returns:
        The classes the file names, sorted: exactly what to pass as
        ``allowed_objects`` to ``langchain_core.load.loads``.

    Raises:
        ChainSaveError: naming each part LangChain cannot serialize (a
            ``RunnableLambda`` of your code, a branch condition, an
            ``example_selector``, ``JsonOutputParser``...), a ``jinja2`` template
            (LangChain's loader refuses them), or a credential the file would hold
            outside the model's API-key argument (e.g. in ``default_headers``).
        TypeError: if ``chain`` is not a chain or ``path`` not a path.
        FileNotFoundError, IsADirectoryError, NotADirectoryError: for a ``path``
            whose folder does not exist or that is a folder.
    """
    target = _check_save_path(path)
    runnable = _runnable_of(chain)
    few_shot = {
        id(obj): baked
        for obj in _objects(runnable)
        if isinstance(obj, (FewShotChatMessagePromptTemplate, FewShotPromptTemplate))
        and (baked := _baked(obj)) is not None
    }
    to_dump = copy_chain(runnable, few_shot) if few_shot else runnable
    tree = dumpd(to_dump)
    _tidy(tree)
    problems = _unserializable(tree, to_dump)
    if problems:
        raise ChainSaveError(
            "save_chain cannot save this chain: LangChain cannot serialize these "
            "parts of it:\n"
            + "\n".join(problems)
            + "\nReplace them with serializable LangChain runnables, or keep "
            "building the chain in code and save only its optimized prompts: "
            "trace(chain).save_prompts('prompts.json'), then "
            "trace(new_chain).load_prompts('prompts.json')."
        )
    jinja = [
        where
        for where, node in _nodes(tree)
        if _kwargs(node).get("template_format") == "jinja2"
    ]
    if jinja:
        raise ChainSaveError(
            f"save_chain cannot save {', '.join(jinja)}: a jinja2 template, which "
            "LangChain's loader refuses (jinja2 can run code). Use "
            "template_format='f-string' or 'mustache'."
        )
    leaks = _credentials(tree, _live_secrets(runnable))
    if leaks:
        raise ChainSaveError(
            "save_chain will not write a credential into the file; found:\n  "
            + "\n  ".join(leaks)
            + "\nA model's own API key goes in its API-key argument (api_key=), "
            "which is saved as a reference to its environment variable (such as "
            "OPENAI_API_KEY), never as a value. Any other credential (a header, a "
            "query parameter, a password in a URL or proxy, a key in model_kwargs "
            "or in a bound or configured argument) must stay out of the saved "
            "chain: save the chain without it and add it to the loaded chain in "
            "code, or build the chain in code and save only its prompts "
            "(trace(chain).save_prompts(path))."
        )
    live = {
        tuple(type(o).lc_id()): type(o)
        for o in _objects(to_dump)
        if isinstance(o, Serializable)
    }
    classes = _classes_of(tree, str(target), allow={}, strict=False, fallback=live)
    text = json.dumps(tree, indent=2, ensure_ascii=False) + "\n"
    write_atomic(target, text.encode("utf-8"))
    return _sorted_classes(classes.values())


# -- loading -------------------------------------------------------------------------


def _load_target(path: Any) -> Path:
    target = _file_path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"`path` {str(target)!r} is a folder: give the file save_chain wrote."
        )
    if not target.exists():
        raise FileNotFoundError(
            f"No chain file at {str(target)!r}: write one with save_chain(chain, path)."
        )
    return target


def _read(target: Path) -> tuple[Any, str]:
    """The parsed file and its text."""
    try:
        text = target.read_text("utf-8")
        tree = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ChainLoadError(
            f"{str(target)!r} is not a chain saved by save_chain: it is not JSON "
            f"LangChain can load ({type(exc).__name__}: {exc})."
        ) from exc
    if _depth(tree) > _MAX_DEPTH:
        raise ChainLoadError(
            f"{str(target)!r} nests deeper than {_MAX_DEPTH} levels, which "
            "LangChain's loader refuses: it is not a chain saved by save_chain."
        )
    try:
        for _ in _nodes(tree):
            pass
    except ChainLoadError as exc:
        raise ChainLoadError(f"{str(target)!r} has {exc}") from None
    if not _is_node(tree, "constructor"):
        hint = (
            " It looks like prompt texts saved by save_prompts: load them into a "
            "chain you built with trace(chain).load_prompts(path)."
            if isinstance(tree, dict)
            and tree
            and all(isinstance(v, str) for v in tree.values())
            else ""
        )
        raise ChainLoadError(
            f"{str(target)!r} is not a chain saved by save_chain (its top level is "
            f"not a LangChain object).{hint}"
        )
    return tree, text


def _allowed_paths(allow: Any) -> dict[tuple[str, ...], type]:
    """The class paths (written and legacy) of the classes given with ``allow=``.

    Raises:
        TypeError: unless ``allow`` is a list (any iterable but a str) of LangChain
            classes.
    """
    if isinstance(allow, type):
        raise TypeError(
            "`allow` must be a list of LangChain classes, got the class "
            f"{allow.__name__} itself: write allow=[{allow.__name__}]."
        )
    if isinstance(allow, (str, bytes)):
        raise TypeError(
            "`allow` must be a list of LangChain classes (the classes themselves, "
            f"imported), got the str {allow!r}: e.g. `from langchain_groq import "
            "ChatGroq`, then allow=[ChatGroq]."
        )
    if not isinstance(allow, Iterable):
        raise TypeError(
            "`allow` must be a list of LangChain classes, e.g. allow=[ChatGroq], "
            f"got {type(allow).__name__}."
        )
    paths: dict[tuple[str, ...], type] = {}
    for cls in allow:
        if not (isinstance(cls, type) and issubclass(cls, Serializable)):
            raise TypeError(
                "`allow` must list LangChain classes (Serializable subclasses, e.g. "
                f"allow=[ChatGroq]), got {cls!r}."
            )
        own = tuple(cls.lc_id())
        paths[own] = cls
        for written, target in _MAPPINGS.items():
            if target == own:
                paths[written] = cls
    return paths


def _secrets_argument(secrets_map: Any) -> dict[str, str]:
    """``secrets_map`` as a dict, checked (its values are never shown in errors).

    Raises:
        TypeError: unless ``secrets_map`` is ``None`` or a mapping of variable names
            (str) to secret values (str).
    """
    if secrets_map is None:
        return {}
    if not isinstance(secrets_map, Mapping):
        raise TypeError(
            "`secrets_map` must be a dict of environment variable names to secret "
            "values, e.g. secrets_map={'OPENAI_API_KEY': key}, got "
            f"{type(secrets_map).__name__}."
        )
    for key, value in secrets_map.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                "`secrets_map` must map variable names (str) to secret values "
                "(str), e.g. secrets_map={'OPENAI_API_KEY': key}; got a "
                f"{type(key).__name__} key"
                + (f" ({key!r})" if isinstance(key, str) else "")
                + f" with a {type(value).__name__} value."
            )
    return dict(secrets_map)


def _classes_of(
    tree: Any,
    name: str,
    allow: Mapping[tuple[str, ...], type],
    strict: bool = True,
    fallback: Mapping[tuple[str, ...], type] | None = None,
) -> dict[tuple[str, ...], type]:
    """Each class path of the file's constructor nodes with the class LangChain's
    loader builds for it. A class the default policy does not admit (and ``allow``
    does not list) is refused when ``strict``; a node naming no class in LangChain's
    namespaces is refused, unless ``fallback`` gives its class (when saving: the
    class of the live object that wrote it)."""
    from langchain_core.load.load import DEFAULT_NAMESPACES

    classes: dict[tuple[str, ...], type] = {}
    refused: list[str] = []
    for where, node in _nodes(tree):
        if node["type"] == "not_implemented":
            raise ChainLoadError(
                f"{name!r} holds a part LangChain did not serialize, at {where} "
                f"({node.get('repr') or node['id'][-1]}): it cannot be loaded. "
                "save_chain never writes such a file."
            )
        if node["type"] != "constructor":
            continue
        path = _class_path(node)
        if path in classes:
            continue
        if path in allow:
            classes[path] = allow[path]
            continue
        cls = _resolve(
            path, ["langchain_core", *PARTNER_NAMESPACES], missing_ok=strict is False
        )
        if cls is None and fallback is not None:
            cls = fallback.get(path)
        if cls is None and _import_path(path)[0] in DEFAULT_NAMESPACES:
            # a class of another LangChain package: not imported to be checked
            refused.append(f"{'.'.join(_import_path(path))} (at {where})")
            continue
        if cls is None:
            raise ChainLoadError(
                f"{name!r} names {'.'.join(path)} at {where}, which is no LangChain "
                "class: load_chain loads only files written by save_chain."
            )
        if strict and not _admitted_by_default(cls):
            refused.append(f"{cls.__module__}.{cls.__qualname__} (at {where})")
            continue
        classes[path] = cls
    if refused:
        raise ChainLoadError(
            f"{name!r} names classes load_chain does not load by default: "
            + ", ".join(refused)
            + ". It loads LangChain's prompts, messages, runnables and output "
            "parsers and the chat models of langchain_openai and "
            "langchain_anthropic. If you trust this file, name the others: "
            "load_chain(path, allow=[TheClass, ...])."
        )
    return classes


def _secrets(
    tree: Any,
    classes: Mapping[tuple[str, ...], type],
    name: str,
    secrets_map: Mapping[str, str],
    from_env: bool,
) -> dict[str, str]:
    """The values of the file's secret references, each filled only into the very
    argument its class declares as a secret, under the variable it declares
    (``ChatOpenAI``'s ``openai_api_key`` <- ``OPENAI_API_KEY``): from
    ``secrets_map``, else (with ``from_env``) from the environment. A reference
    anywhere else (a header, a prompt text, another variable) is refused, whichever
    source would fill it: LangChain's loader fills every reference to a variable,
    so a crafted file could otherwise copy the key into a header sent to its host."""
    values: dict[str, str] = {}
    declared_at: set[tuple[str, str]] = set()  # (location of the reference, variable)
    for where, node in _nodes(tree):
        if node["type"] != "constructor":
            continue
        cls = classes.get(_class_path(node))
        declared = _declared_secrets(cls) if cls is not None else {}
        for key, variable in declared.items():
            # a declared key may be a dotted path into a dict argument ("a.b")
            first, *rest = key.split(".")
            value: Any = _kwargs(node).get(first)
            for part in rest:
                value = value.get(part) if isinstance(value, dict) else None
            if _is_node(value, "secret") and value["id"] == [variable]:
                location = f"{where}.{first}" + "".join(f"[{p!r}]" for p in rest)
                declared_at.add((location, variable))
    for where, node in _nodes(tree):
        if node["type"] != "secret":
            continue
        variable = node["id"][0]
        if (where, variable) not in declared_at:
            raise ChainLoadError(
                f"{name!r} refers to the secret {variable!r} at {where}, where no "
                "class of the chain declares one: load_chain fills a secret only "
                "into the argument its class declares for it (ChatOpenAI's "
                "openai_api_key <- OPENAI_API_KEY), from secrets_map or the "
                "environment; a file that places one elsewhere (a header, a prompt, "
                "another variable) could send the key to anyone. It is not a chain "
                "saved by save_chain: do not load it."
            )
        if variable in secrets_map:
            values[variable] = secrets_map[variable]
            continue
        env = os.environ.get(variable) if from_env else None
        if not env:
            raise ChainLoadError(
                f"The chain in {name!r} needs the secret {variable} (at {where}): "
                + (
                    f"set the environment variable {variable}, or pass "
                    if from_env
                    else "pass "
                )
                + f"secrets_map={{{variable!r}: ...}}."
            )
        values[variable] = env
    return values


def load_chain(
    path: str | os.PathLike[str],
    *,
    secrets_map: Mapping[str, str] | None = None,
    secrets_from_env: bool = True,
    allow: Iterable[type] = (),
) -> Any:
    """Load a chain written by :func:`save_chain`: a plain LangChain chain, which
    needs no afnio at run time.

    Loading builds objects with the file's constructor arguments (a model's
    ``base_url`` included), so load only files you trust (see the Security model):
    a file you did not write could point the model at another host, which would
    then receive the key. For such a file, build the chain yourself and apply its
    texts with ``TracedChain.load_prompts`` (texts only, placeholders checked).

    What is admitted:

    * **Classes**: exactly those the file names, each of which must be one of
      LangChain's own prompts, messages, runnables and output parsers
      (``langchain_core``, classes LangChain marks serializable) or a chat model of
      ``langchain_openai``/``langchain_anthropic``; these are what is passed to
      ``langchain_core.load.loads`` as ``allowed_objects``. Other classes (another
      provider's chat model, say) only when listed in ``allow``. LangChain's own
      check also applies: ``jinja2`` templates are refused.
    * **Secrets**: a secret reference is filled only into the argument its class
      declares as a secret, under the variable it declares (``OPENAI_API_KEY`` for
      ``ChatOpenAI``'s ``openai_api_key``): from ``secrets_map``, else
      (``secrets_from_env=True``, the default) from the environment. A reference
      anywhere else, or naming another variable, is refused even when
      ``secrets_map`` holds that variable.

    Args:
        path: the file save_chain wrote.
        secrets_map: secret values by variable name, e.g.
            ``{"OPENAI_API_KEY": key}``; they take precedence over the environment.
        secrets_from_env: read declared secrets missing from ``secrets_map`` from
            the environment.
        allow: further LangChain classes to load (e.g. ``[ChatGroq]``).

    Raises:
        ChainLoadError: a file that is not a saved chain (invalid JSON, nested
            deeper than 200 levels, a malformed node), a class not admitted, a
            ``jinja2`` template, a secret that is missing or not in the argument
            its class declares, or LangChain failing to build the chain.
        FileNotFoundError, IsADirectoryError: for a missing file or a folder.
        TypeError: for a ``path``, ``allow`` (a list of classes: not a str,
            nor one class alone) or ``secrets_map`` (a dict of str to str) of the
            wrong type.
    """
    target = _load_target(path)
    allowed = _allowed_paths(allow)
    mapped = _secrets_argument(secrets_map)
    if not isinstance(secrets_from_env, bool):
        raise TypeError(
            "`secrets_from_env` must be True or False, got "
            f"{type(secrets_from_env).__name__}."
        )
    tree, text = _read(target)
    name = str(target)
    classes = _classes_of(tree, name, allowed)
    jinja = [
        where
        for where, node in _nodes(tree)
        if node["type"] == "constructor"
        and _kwargs(node).get("template_format") == "jinja2"
    ]
    if jinja:
        raise ChainLoadError(
            f"{name!r} holds a jinja2 template at {', '.join(jinja)}, which "
            "load_chain refuses (jinja2 can run code; LangChain's loader refuses it "
            "too). save_chain never writes one."
        )
    secrets = _secrets(tree, classes, name, mapped, secrets_from_env)
    namespaces = sorted({str(c.lc_id()[0]) for c in allowed.values()})
    from langchain_core._api import LangChainBetaWarning

    try:
        with warnings.catch_warnings():
            # loads is marked beta; its arguments here are all explicit
            warnings.simplefilter("ignore", LangChainBetaWarning)
            return loads(
                text,
                allowed_objects=_sorted_classes(classes.values()),
                secrets_map=secrets,
                secrets_from_env=False,
                valid_namespaces=namespaces or None,
            )
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ChainLoadError(
            f"LangChain could not build the chain in {name!r}: {exc}"
        ) from exc
