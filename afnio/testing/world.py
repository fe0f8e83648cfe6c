"""The simulator's *rule world*: pure functions that compute an answer from a request.

This is a **deterministic stand-in, not a model**. Nothing here understands language:
an answer is computed from explicit rules written in the prompt, so a test (or a
benchmark) knows in advance exactly what "the model" will say. No HTTP happens in this
module; :mod:`afnio.testing.simulator` parses the wire format and calls :func:`respond`.

Rule grammar
------------
A task prompt may hold, anywhere in its messages (system or user), rules of the exact
form::

    If the message mentions "<word>", the <field> is <label>.

one sentence each, e.g. ``If the message mentions "refund", the sentiment is
negative.`` The label may be several words; it runs up to the first period. The answer
is the label of the **first** rule (in message order) whose quoted word occurs in the
*user content* as a whole word, case-insensitively. The user content is the text of
all ``user`` messages with every rule sentence removed, so a rule never matches itself.

If no rule matches, the answer is a default label: ``neutral`` (the majority class)
when the field is ``sentiment`` or when there is no rule at all; for another field, the
first ``enum`` value of that field's property when the request carries a JSON schema
that has one (else ``neutral`` again).

Responders
----------
An answer is computed by an ordered list of *responders* (:data:`RESPONDERS`): each
takes the parsed :class:`SimRequest` and returns an :class:`Answer` or ``None``; the
first answer wins. Today there are two: :func:`task_responder` (the rules above) and
:func:`fallback_responder` (always answers the default label). Later work inserts
responders for afnio's own judge/feedback/optimizer prompts, recognised by markers in
those prompts, before the task responder.

Rendering
---------
:func:`render_content` turns an answer into message content the way a real model
honours ``response_format``: no format gives the plain label; ``json_object`` gives a
JSON object ``{"<field>": "<label>"}`` (``{"answer": "<label>"}`` without a field);
``json_schema`` gives an instance valid for the schema (see :func:`schema_instance`).

Example::

    >>> from afnio.testing.world import SimRequest, respond
    >>> rules = 'If the message mentions "refund", the sentiment is negative.'
    >>> req = SimRequest.from_messages(
    ...     [{"role": "system", "content": rules},
    ...      {"role": "user", "content": "I want a REFUND now"}]
    ... )
    >>> respond(req)
    'negative'
    >>> respond(SimRequest.from_messages([{"role": "user", "content": "Hello"}]))
    'neutral'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_LABEL",
    "RESPONDERS",
    "RULE_PATTERN",
    "SALIENCE_LEXICON",
    "Answer",
    "Message",
    "Responder",
    "Rule",
    "SimRequest",
    "answer",
    "embed",
    "fallback_responder",
    "find_rules",
    "message_text",
    "render_content",
    "respond",
    "schema_instance",
    "task_responder",
    "user_content",
]

DEFAULT_LABEL = "neutral"
"""The label answered when no rule matches (the majority class of sentiment tasks)."""

SALIENCE_LEXICON: tuple[str, ...] = (
    "angry",
    "annoyed",
    "awful",
    "complaint",
    "delighted",
    "disappointed",
    "disappointing",
    "dissatisfied",
    "excellent",
    "exceptional",
    "fantastic",
    "frustrated",
    "frustrating",
    "frustration",
    "grateful",
    "great",
    "impressed",
    "love",
    "outstanding",
    "poor",
    "terrible",
    "thrilled",
    "top-notch",
    "unacceptable",
    "unsatisfactory",
    "upset",
    "wonderful",
    "worst",
)
"""Sorted words that carry strong sentiment; later responders use it to write feedback.

    >>> list(SALIENCE_LEXICON) == sorted(SALIENCE_LEXICON)
    True
"""

RULE_PATTERN = re.compile(
    r'If\s+the\s+message\s+mentions\s+"(?P<word>[^"\n]+)",\s+'
    r"the\s+(?P<field>[^.\n]+?)\s+is\s+(?P<label>[^.\n]+?)\s*\."
)
"""The rule sentence: ``If the message mentions "<word>", the <field> is <label>.``"""


@dataclass(frozen=True)
class Message:
    """One chat message, reduced to its role and its text."""

    role: str
    text: str


@dataclass(frozen=True)
class SimRequest:
    """A parsed generation request (chat or legacy completion), independent of HTTP.

    Attributes:
        messages: the conversation; a legacy completion prompt is one ``user`` message.
        model: the requested model name (any name is accepted).
        response_format: the request's ``response_format`` dict, or ``None``.
        endpoint: ``"chat/completions"`` or ``"completions"``.
        body: the raw JSON body (empty when built by hand).
    """

    messages: tuple[Message, ...]
    model: str = ""
    response_format: Mapping[str, Any] | None = None
    endpoint: str = "chat/completions"
    body: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_messages(
        cls,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str = "",
        response_format: Mapping[str, Any] | None = None,
    ) -> SimRequest:
        """Build a request from OpenAI-style message dicts.

        >>> SimRequest.from_messages([{"role": "user", "content": "hi"}]).messages
        (Message(role='user', text='hi'),)
        """
        return cls(
            messages=tuple(
                Message(str(m.get("role", "")), message_text(m.get("content")))
                for m in messages
            ),
            model=model,
            response_format=response_format,
        )

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema of a ``json_schema`` response format, else ``None``."""
        fmt = self.response_format
        if not fmt or fmt.get("type") != "json_schema":
            return None
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return dict(schema) if isinstance(schema, Mapping) else {}


@dataclass(frozen=True)
class Rule:
    """One parsed rule sentence.

    >>> rule = find_rules('If the message mentions "late", the tone is very upset.')[0]
    >>> rule.word, rule.field, rule.label
    ('late', 'tone', 'very upset')
    """

    word: str
    field: str
    label: str
    sentence: str

    def matches(self, text: str) -> bool:
        """Whether the rule's word occurs in ``text`` as a whole word (any case).

        >>> rule = find_rules('If the message mentions "Bad", the x is y.')[0]
        >>> rule.matches("so bad!"), rule.matches("badly")
        (True, False)
        """
        pattern = rf"(?<!\w){re.escape(self.word.strip())}(?!\w)"
        return re.search(pattern, text, re.IGNORECASE) is not None


@dataclass(frozen=True)
class Answer:
    """What a responder decided to say.

    Attributes:
        label: the answer as plain text (the whole content without response_format).
        field: the name of the answered field (e.g. ``"sentiment"``), if any; a JSON
            answer puts ``label`` under this key.
        values: explicit values for named JSON properties (used by later responders);
            they take precedence over ``label`` for those properties.
        responder: the name of the responder that produced the answer.
    """

    label: str
    field: str | None = None
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    responder: str = ""


Responder = Callable[[SimRequest], Answer | None]
"""A responder: takes the parsed request, returns an :class:`Answer` or ``None``."""


def message_text(content: Any) -> str:
    """The text of a message ``content``: a string, or a list of parts whose ``text``
    entries are joined by newlines; ``None`` gives ``""``.

    >>> message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    'a\\nb'
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    return str(content)


def find_rules(text: str) -> list[Rule]:
    """The rule sentences in ``text``, in order.

    >>> [r.label for r in find_rules(
    ...     'If the message mentions "a", the k is x. '
    ...     'If the message mentions "b", the k is y z.')]
    ['x', 'y z']
    """
    return [
        Rule(
            word=m["word"].strip(),
            field=" ".join(m["field"].split()),
            label=" ".join(m["label"].split()),
            sentence=m.group(0),
        )
        for m in RULE_PATTERN.finditer(text)
    ]


def user_content(request: SimRequest) -> str:
    """The text of all ``user`` messages with every rule sentence removed.

    >>> text = 'If the message mentions "x", the k is v. Hi'
    >>> user_content(SimRequest.from_messages([{"role": "user", "content": text}]))
    ' Hi'
    """
    return "\n".join(
        RULE_PATTERN.sub("", m.text) for m in request.messages if m.role == "user"
    )


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _resolve(schema: Any, root: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """Follow ``$ref`` (local JSON pointers) and pick the first ``anyOf``/``oneOf``/
    ``allOf`` option until a concrete schema is reached."""
    if not isinstance(schema, Mapping) or depth > 32:
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        return _resolve(target, root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and "type" not in schema:
            return _resolve(options[0], root, depth + 1)
    return dict(schema)


def _find_property(
    schema: Mapping[str, Any], name: str, root: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The (resolved) schema of the first property named like ``name``, searching
    nested objects breadth-first."""
    root = schema if root is None else root
    queue = [_resolve(schema, root)]
    seen = 0
    while queue and seen < 256:
        node = queue.pop(0)
        seen += 1
        props = node.get("properties")
        if not isinstance(props, Mapping):
            continue
        for key, sub in props.items():
            if _norm(key) == _norm(name):
                return _resolve(sub, root)
        queue.extend(_resolve(sub, root) for sub in props.values())
    return None


def schema_instance(
    schema: Mapping[str, Any],
    label: str,
    values: Mapping[str, Any] | None = None,
    root: Mapping[str, Any] | None = None,
) -> Any:
    """A JSON instance valid for ``schema``, filled with ``label`` where text goes.

    Objects get all their properties, in schema order; a property whose name matches
    a key of ``values`` (case- and separator-insensitively) gets that value; ``enum``
    gives the label when it is one of the values, else the first value; ``const`` its
    value;
    ``string`` the label; ``integer``/``number`` 0; ``boolean`` false; ``array`` ``[]``
    (or ``minItems`` items); ``null`` null. ``$ref``/``$defs`` are resolved and
    ``anyOf``/``oneOf``/``allOf`` take their first option.

    >>> schema_instance({"type": "object", "properties": {
    ...     "why": {"type": "string"}, "ok": {"type": "boolean"},
    ...     "mood": {"enum": ["happy", "sad"]}}}, "sad")
    {'why': 'sad', 'ok': False, 'mood': 'sad'}
    """
    root = schema if root is None else root
    values = {_norm(k): v for k, v in (values or {}).items()}
    return _instance(schema, label, values, root, None, 0)


def _instance(
    schema: Any,
    label: str,
    values: Mapping[str, Any],
    root: Mapping[str, Any],
    name: str | None,
    depth: int,
) -> Any:
    node = _resolve(schema, root)
    text: Any = label
    if name is not None and _norm(name) in values:
        text = values[_norm(name)]
        if not isinstance(text, str):
            return text
    if "const" in node:
        return node["const"]
    enum = node.get("enum")
    if isinstance(enum, list) and enum:
        return text if text in enum else enum[0]
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None and isinstance(node.get("properties"), Mapping):
        kind = "object"
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping) or depth > 16:
            return {}
        return {
            key: _instance(sub, label, values, root, key, depth + 1)
            for key, sub in props.items()
        }
    if kind == "array":
        count = node.get("minItems", 0)
        count = count if isinstance(count, int) and 0 < count <= 16 else 0
        item = node.get("items", {})
        return [_instance(item, label, values, root, None, depth + 1)] * count
    if kind == "integer" or kind == "number":
        return 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text


def render_content(answer: Answer, response_format: Mapping[str, Any] | None) -> str:
    """The message content for ``answer`` under ``response_format``.

    >>> a = Answer("negative", field="sentiment")
    >>> render_content(a, None)
    'negative'
    >>> render_content(a, {"type": "json_object"})
    '{"sentiment": "negative"}'
    >>> render_content(a, {"type": "json_schema", "json_schema": {"name": "x",
    ...     "schema": {"type": "object", "properties": {
    ...         "sentiment": {"enum": ["positive", "negative"]},
    ...         "score": {"type": "number"}}}}})
    '{"sentiment": "negative", "score": 0}'
    """
    kind = response_format.get("type") if response_format else None
    values = dict(answer.values)
    if answer.field is not None:
        values.setdefault(answer.field, answer.label)
    if kind == "json_object":
        obj = values or {"answer": answer.label}
        return json.dumps(obj, ensure_ascii=False)
    if kind == "json_schema":
        spec = (response_format or {}).get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        instance = schema_instance(
            schema if isinstance(schema, Mapping) else {}, answer.label, values
        )
        return json.dumps(instance, ensure_ascii=False)
    return answer.label


def _default_label(field_name: str | None, request: SimRequest) -> str:
    if field_name is None or _norm(field_name) == "sentiment":
        return DEFAULT_LABEL
    schema = request.json_schema
    if schema:
        prop = _find_property(schema, field_name)
        enum = prop.get("enum") if prop else None
        if isinstance(enum, list) and enum:
            return str(enum[0])
    return DEFAULT_LABEL


def task_responder(request: SimRequest) -> Answer | None:
    """Answer a task prompt that holds rules (see the module docstring); ``None``
    when the request has no rule.

    >>> req = SimRequest.from_messages([
    ...     {"role": "system", "content":
    ...      'If the message mentions "late", the topic is shipping. '
    ...      'If the message mentions "charged", the topic is billing.'},
    ...     {"role": "user", "content": "Charged twice and it came late."}])
    >>> task_responder(req)
    Answer(label='shipping', field='topic', values={}, responder='task')
    """
    rules = [rule for m in request.messages for rule in find_rules(m.text)]
    if not rules:
        return None
    text = user_content(request)
    for rule in rules:
        if rule.matches(text):
            return Answer(rule.label, field=rule.field, responder="task")
    field_name = rules[0].field
    return Answer(
        _default_label(field_name, request), field=field_name, responder="task"
    )


def fallback_responder(request: SimRequest) -> Answer:
    """Always answers :data:`DEFAULT_LABEL` (``neutral``), with no field.

    >>> fallback_responder(SimRequest(messages=()))
    Answer(label='neutral', field=None, values={}, responder='fallback')
    """
    return Answer(DEFAULT_LABEL, responder="fallback")


RESPONDERS: list[Responder] = [task_responder, fallback_responder]
"""The responders consulted in order; the first non-``None`` answer wins."""


def answer(
    request: SimRequest, responders: Sequence[Responder] | None = None
) -> Answer:
    """The first answer of ``responders`` (default :data:`RESPONDERS`).

    >>> answer(SimRequest.from_messages([{"role": "user", "content": "hi"}])).label
    'neutral'
    """
    for responder in RESPONDERS if responders is None else responders:
        result = responder(request)
        if result is not None:
            return result
    return fallback_responder(request)


def respond(request: SimRequest) -> str:
    """The message content the simulator sends back for ``request``."""
    return render_content(answer(request), request.response_format)


def embed(text: str, dimensions: int = 64) -> list[float]:
    """A deterministic embedding: the hashed bag of the lowercase words of ``text``.

    Each word adds ``+1`` or ``-1`` (a second hash decides the sign) to one of
    ``dimensions`` buckets (chosen by a stable hash, not Python's salted ``hash``); the
    vector is then L2-normalised. Identical texts give identical vectors and texts that
    share words usually have a positive cosine. A text without word characters is
    hashed whole, so every non-empty text gets a unit vector.

    >>> v = embed("The cat sat", 8)
    >>> len(v), round(sum(x * x for x in v), 6), v == embed("the CAT sat!", 8)
    (8, 1.0, True)
    """
    if dimensions < 1:
        raise ValueError("dimensions must be at least 1")
    words = re.findall(r"\w+(?:[-']\w+)*", text.lower()) or ([text] if text else [])
    vector = [0.0] * dimensions
    for word in words:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "big")
        sign = 1.0 if value >> 63 == 0 else -1.0
        vector[value % dimensions] += sign
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector
