"""The rows of a ``trainset``/``valset`` of LangChain ``optimize`` and ``estimate``,
checked and made into ``(inputs, target)`` pairs before any LM call.

Accepted rows (every row of one set is read the same way):

* ``(inputs, target)``, a tuple or list of 2: ``inputs`` is what ``chain.invoke``
  takes (a dict, or a str for a chain whose prompt has one input variable);
* ``{"inputs": {...}, "outputs": {...}}``, a LangSmith example (or any object with
  ``.inputs``/``.outputs`` dicts, such as ``langsmith.schemas.Example``): the inputs
  dict (only the ``input_keys`` when given) and, as the target, the single value of
  ``outputs`` or ``outputs[label_key]``;
* ``{"message": ..., "label": ...}``, a dict row, only with ``label_key="label"``:
  the target is ``row[label_key]``, the inputs ``{k: row[k] for k in input_keys}``
  (``input_keys`` default: every key but ``label_key``).

Anything else (a dict row without ``label_key``, a dict ``{text: label}`` as the
whole set, a ``set`` of rows (no order), a string, a 3-tuple, ``None``, a pair whose
inputs are neither a dict nor a str, a pair whose target is ``None``, a dict (a
reversed pair, a dict of outputs) or another collection (rows nested in a row), a
pandas ``DataFrame`` or its ``iterrows()`` rows...) raises ``TypeError``
or ``ValueError`` naming the argument and the row (``trainset[3]``), what was found,
and an example of what is expected. When the chain's entry prompt is known
(:func:`entry_variables`), each row's inputs are checked against its input
variables too (:func:`check_inputs`).
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

__all__ = [
    "Row",
    "chain_rows",
    "check_inputs",
    "entry_variables",
    "normalize_rows",
    "row_checker",
    "short_repr",
]

Row = tuple[Any, Any]
"""A normalised row: ``(inputs, target)``."""


class _Repr(reprlib.Repr):
    """``reprlib`` keeping a dict's own key order (rows are read in that order)."""

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [
            f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
            for k, v in list(x.items())[: self.maxdict]
        ]
        more = ", ..." if len(x) > self.maxdict else ""
        return "{" + ", ".join(items) + more + "}"


_REPR = _Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxdict = 4
_REPR.maxlist = 4
_REPR.maxtuple = 4
_REPR.maxlevel = 3


def short_repr(value: Any) -> str:
    """``value``'s type and a repr cut to about 60 characters per string."""
    return f"{type(value).__name__} {_REPR.repr(value)}"


def _example_pair(variables: Sequence[str] | None) -> str:
    """An example ``(inputs, target)`` row, with the chain's variable names."""
    names = list(variables or ()) or ["message"]
    if len(names) == 1:
        return f"({{{names[0]!r}: 'The heater broke again.'}}, 'negative')"
    fields = ", ".join(f"{n!r}: ..." for n in names)
    return f"({{{fields}}}, 'the expected output')"


def _expected(variables: Sequence[str] | None) -> str:
    return (
        f"Expected (inputs, target) pairs such as {_example_pair(variables)}, "
        "LangSmith-style examples {'inputs': {...}, 'outputs': {...}}, or dict rows "
        "with label_key= (and input_keys=) naming their columns."
    )


def _is_example_object(row: Any) -> bool:
    """A LangSmith ``Example``-like object: ``.inputs`` and ``.outputs`` attributes
    that are data, not methods (a ``dspy.Example``'s ``inputs`` is a method)."""
    if isinstance(row, (Mapping, str, bytes, tuple, list)):
        return False
    inputs = getattr(row, "inputs", None)
    return isinstance(inputs, Mapping) and hasattr(row, "outputs")


def _is_example_dict(row: Any) -> bool:
    return (
        isinstance(row, Mapping)
        and "inputs" in row
        and "outputs" in row
        and isinstance(row["inputs"], Mapping)
    )


def _check_keys(
    input_keys: Sequence[str] | None, label_key: str | None
) -> tuple[str, ...] | None:
    if label_key is not None and not isinstance(label_key, str):
        raise TypeError(
            f"`label_key` must be a str naming the column of the target, got "
            f"{short_repr(label_key)}."
        )
    if input_keys is None:
        return None
    if isinstance(input_keys, str):
        raise TypeError(
            f"`input_keys` must be a list of column names, got the str "
            f"{input_keys!r}: pass input_keys=[{input_keys!r}]."
        )
    keys = tuple(input_keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(
            f"`input_keys` must be a non-empty list of str, got {short_repr(keys)}."
        )
    if label_key is not None and label_key in keys:
        raise ValueError(
            f"`input_keys` holds the label_key {label_key!r}: the target would be "
            "given to the chain as an input. Leave it out of input_keys."
        )
    return keys


def _from_example(
    inputs: Mapping[str, Any],
    outputs: Any,
    where: str,
    input_keys: tuple[str, ...] | None,
    label_key: str | None,
) -> Row:
    if input_keys is not None:
        missing = [k for k in input_keys if k not in inputs]
        if missing:
            raise ValueError(
                f"`{where}` (an example) has no input {missing[0]!r} of input_keys="
                f"{list(input_keys)}; its inputs are {sorted(map(str, inputs))}."
            )
        inputs = {k: inputs[k] for k in input_keys}
    else:
        inputs = dict(inputs)
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError(
            f"`{where}` is an example without reference outputs ({short_repr(outputs)}"
            "): the metric needs a target. Expected e.g. {'inputs': {'message': "
            "'The heater broke again.'}, 'outputs': {'label': 'negative'}}."
        )
    if label_key is not None:
        if label_key not in outputs:
            raise ValueError(
                f"`{where}` has no output {label_key!r} (label_key); its outputs are "
                f"{sorted(map(str, outputs))}."
            )
        target = outputs[label_key]
    elif len(outputs) == 1:
        target = next(iter(outputs.values()))
    else:
        raise ValueError(
            f"`{where}` has several outputs {sorted(map(str, outputs))}: pass "
            f"label_key= naming the one the metric compares with, e.g. "
            f"label_key={sorted(map(str, outputs))[0]!r}."
        )
    if target is None:
        raise ValueError(f"`{where}` has a None target: every row needs one.")
    return inputs, target


def _is_pandas(value: Any) -> bool:
    """A pandas object (``Series``, ``DataFrame``...), recognised without importing
    pandas."""
    return type(value).__module__.split(".")[0] == "pandas"


_COLLECTIONS = (Mapping, list, tuple, set, frozenset)


def _check_pair(
    row: Any, inputs: Any, target: Any, where: str, variables: Sequence[str] | None
) -> None:
    """Refuse an ``(inputs, target)`` pair that cannot be one: a pandas
    ``(index, Series)`` row, a collection or ``None`` as the target (a reversed pair,
    a dict of outputs, rows nested in a row), inputs that are neither a dict nor a
    str."""
    if _is_pandas(target) or _is_pandas(inputs):
        raise TypeError(
            f"`{where}` is a pandas row ({short_repr(row)}), as DataFrame.iterrows() "
            "yields: pass df.to_dict('records') with label_key= naming the target "
            "column (and input_keys=[...] for the inputs)."
        )
    if inputs is None:
        raise ValueError(f"`{where}` has None inputs. {_expected(variables)}")
    if target is None:
        raise ValueError(
            f"`{where}` has a None target ({short_repr(row)}): every row needs "
            f"the output the metric compares with, e.g. {_example_pair(variables)}."
        )
    if isinstance(target, Mapping) and not isinstance(inputs, Mapping):
        raise TypeError(
            f"`{where}` looks reversed: its target is a dict and its inputs a "
            f"{type(inputs).__name__} ({short_repr(row)}). A row is (inputs, "
            f"target), the inputs first, e.g. {_example_pair(variables)}."
        )
    if isinstance(target, Mapping):
        keys = [str(k) for k in target]
        label = keys[0] if len(keys) == 1 else "label"
        raise TypeError(
            f"`{where}` has a dict target ({short_repr(row)}): the metric compares "
            "the chain's output with one value. Pass the target itself, e.g. "
            f"{_example_pair(variables)}, or LangSmith-style examples {{'inputs': "
            f"inputs, 'outputs': target}} with label_key={label!r} naming the output "
            "to compare."
        )
    if isinstance(target, _COLLECTIONS):
        if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
            raise TypeError(
                f"`{where}` holds rows instead of being one ({short_repr(row)}): "
                "pass a flat list of (inputs, target) rows, e.g. "
                f"[{_example_pair(variables)}, ...] (not [[row, row], ...])."
            )
        raise TypeError(
            f"`{where}` has a {type(target).__name__} target ({short_repr(row)}): "
            "the target is the one value (a str or a number) the metric compares "
            f"the chain's output with, e.g. {_example_pair(variables)}."
        )
    if not isinstance(inputs, (Mapping, str)):
        raise TypeError(
            f"`{where}` has inputs of type {type(inputs).__name__} "
            f"({short_repr(row)}): the inputs are what chain.invoke takes, a dict "
            "of the prompt's variables (or a str for a prompt of one variable). "
            f"{_expected(variables)}"
        )


def _row(
    row: Any,
    where: str,
    input_keys: tuple[str, ...] | None,
    label_key: str | None,
    variables: Sequence[str] | None,
) -> Row:
    if _is_example_dict(row):
        return _from_example(
            row["inputs"], row["outputs"], where, input_keys, label_key
        )
    if _is_example_object(row):
        return _from_example(row.inputs, row.outputs, where, input_keys, label_key)
    if isinstance(row, Mapping):
        if label_key is None and len(row) < 2:
            raise TypeError(
                f"`{where}` is a dict {_REPR.repr(row)} with one key: a row needs "
                f"inputs and a target. {_expected(variables)}"
            )
        if label_key is None:
            keys = ", ".join(repr(k) for k in list(row)[:6])
            raise TypeError(
                f"`{where}` is a dict row {_REPR.repr(row)}, but no label_key= "
                f"says which of its keys ({keys}) is the target. Pass e.g. "
                f"label_key={str(list(row)[-1])!r} (and input_keys=[...] for the "
                "inputs; default: every other key)."
            )
        keys = input_keys or tuple(str(k) for k in row if k != label_key)
        missing = [k for k in (*keys, label_key) if k not in row]
        if missing:
            raise ValueError(
                f"`{where}` has no key {missing[0]!r} (from "
                f"{'label_key' if missing[0] == label_key else 'input_keys'}); its "
                f"keys are {sorted(map(str, row))}."
            )
        if not keys:
            raise ValueError(
                f"`{where}` has no key besides the label_key {label_key!r}: there "
                "is no input to give the chain."
            )
        target = row[label_key]
        if target is None:
            raise ValueError(
                f"`{where}` has a None target ({label_key!r}): every row needs one."
            )
        return {k: row[k] for k in keys}, target
    if isinstance(row, (tuple, list)) and len(row) == 2:
        if input_keys is not None or label_key is not None:
            raise TypeError(
                f"`{where}` is an (inputs, target) pair, but label_key=/input_keys= "
                "apply to dict rows and LangSmith examples only: leave them out for "
                "pairs."
            )
        inputs, target = row
        _check_pair(row, inputs, target, where, variables)
        return inputs, target
    kind = type(row).__module__.split(".")[0]
    if kind == "dspy":
        raise TypeError(
            f"`{where}` is a dspy.Example: use AfnioTGD (afnio_integrations.dspy) for "
            "a DSPy program; for a LangChain chain pass (example.inputs().toDict(), "
            f"example.<label field>) pairs. {_expected(variables)}"
        )
    if isinstance(row, (tuple, list)):
        found = f"a {type(row).__name__} of {len(row)} items ({short_repr(row)})"
    else:
        found = short_repr(row)
    raise TypeError(f"`{where}` is {found}. {_expected(variables)}")


def normalize_rows(
    data: Iterable[Any] | None,
    name: str,
    *,
    input_keys: Sequence[str] | None = None,
    label_key: str | None = None,
    variables: Sequence[str] | None = None,
) -> list[Row]:
    """Check every row of ``data`` (the argument called ``name``) and return them as
    ``(inputs, target)`` pairs (see the module's table).

    ``variables``: the chain's entry prompt's input variables, when known (used in
    the examples of the error messages; :func:`check_inputs` checks them).

    Raises:
        TypeError: ``data`` is not a list of rows, or a row has no accepted shape.
        ValueError: ``data`` is empty, or a row lacks a key, its target, or its
            inputs.
    """
    keys = _check_keys(input_keys, label_key)
    if data is None or isinstance(data, (str, bytes)):
        raise TypeError(
            f"`{name}` must be a list of rows, got {short_repr(data)}. "
            f"{_expected(variables)}"
        )
    if isinstance(data, Mapping):
        raise TypeError(
            f"`{name}` is a dict {_REPR.repr(data)}, not a list of rows. For "
            f"{{inputs: target}} pass list({name}.items()); for columns, a list of "
            f"dict rows with label_key=. {_expected(variables)}"
        )
    if hasattr(data, "columns") and hasattr(data, "to_dict"):
        raise TypeError(
            f"`{name}` is a {type(data).__name__}: pass {name}.to_dict('records') "
            "with label_key= naming the target column (and input_keys=[...])."
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"`{name}` must be a list of rows, got {short_repr(data)}. "
            f"{_expected(variables)}"
        )
    if isinstance(data, AbstractSet):
        raise TypeError(
            f"`{name}` is a {type(data).__name__} of rows, which has no order: the "
            f"run (its shuffling by seed=, the row numbers of errors) would change "
            f"from one process to the next. Pass a list, e.g. sorted({name}, "
            "key=str)."
        )
    rows = list(data)
    if not rows:
        raise ValueError(
            f"`{name}` is empty: pass rows such as {_example_pair(variables)}."
        )
    return [
        _row(row, f"{name}[{i}]", keys, label_key, variables)
        for i, row in enumerate(rows)
    ]


def entry_variables(chain: Any) -> tuple[str, ...] | None:
    """The required input variables of the prompt that receives the chain's input
    (the chain itself, or the first step of a sequence, through bindings), or
    ``None`` when the chain starts with anything else (a lambda, a parallel map,
    ``assign``...), whose input cannot be known without running it."""
    seen: set[int] = set()
    current = chain
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        variables = getattr(current, "input_variables", None)
        if isinstance(variables, list) and hasattr(current, "format_prompt"):
            return tuple(str(v) for v in variables)
        first = getattr(current, "first", None)  # RunnableSequence
        bound = getattr(current, "bound", None)  # RunnableBinding (with_config...)
        current = first if first is not None else bound
    return None


def check_inputs(
    rows: Sequence[Row],
    name: str,
    variables: Sequence[str] | None,
    *,
    input_keys: Sequence[str] | None = None,
    first: int = 0,
) -> None:
    """Check that every row's inputs fit the chain's entry prompt (``variables``,
    from :func:`entry_variables`; nothing is checked when ``None``): a dict holds
    every variable, and a non-dict input (a str) goes to a prompt of exactly one
    variable, as LangChain then wraps it as ``{variable: input}``.

    Raises:
        ValueError: ``input_keys`` or a row lacks a variable the prompt needs.
        TypeError: a non-dict input for a prompt of several variables.
    """
    if variables is None:
        return
    needed = list(variables)
    if input_keys is not None:
        missing = [v for v in needed if v not in input_keys]
        if missing:
            raise ValueError(
                f"`input_keys`={list(input_keys)} lacks {missing[0]!r}, an input "
                f"variable of the chain's prompt (it takes {needed}): add it."
            )
    for i, (inputs, _) in enumerate(rows, first):  # `first`: the index of rows[0]
        where = f"{name}[{i}]"
        if isinstance(inputs, Mapping):
            missing = [v for v in needed if v not in inputs]
            if missing:
                raise ValueError(
                    f"The inputs of `{where}` ({short_repr(inputs)}) lack "
                    f"{missing[0]!r}: the chain's prompt takes {needed}. Expected "
                    f"e.g. {_example_pair(needed)}."
                )
        elif len(needed) != 1:
            raise TypeError(
                f"The inputs of `{where}` are a {short_repr(inputs)}, but the "
                f"chain's prompt takes {len(needed)} variables {needed}: pass a "
                f"dict, e.g. {_example_pair(needed)}."
            )


def _holds_variables(row: Any) -> bool:
    from afnio._variable import Variable

    if isinstance(row, Variable):
        return True
    return isinstance(row, tuple) and any(_holds_variables(x) for x in row)


def row_checker(
    name: str,
    *,
    input_keys: Sequence[str] | None = None,
    label_key: str | None = None,
    variables: Sequence[str] | None = None,
) -> Callable[[Any, int], Row]:
    """``check(row, index) -> (inputs, target)`` for the rows of a set read as a
    stream (a ``trainset`` that is an :class:`~afnio.utils.data.IterableDataset`,
    e.g. a ``JsonlDataset`` without ``input=``, whose rows are dicts): each row is
    read as :func:`normalize_rows` reads it and checked as :func:`check_inputs`
    checks it, when it is read, the errors naming ``name[index]``. ``input_keys``
    are checked against ``variables`` at once.

    Raises:
        TypeError, ValueError: as :func:`normalize_rows` and :func:`check_inputs`;
            ``check`` raises ``TypeError`` for a row of afnio Variables (a
            ``JsonlDataset`` built with ``input=``/``target=``).
    """
    keys = _check_keys(input_keys, label_key)
    check_inputs([], name, variables, input_keys=input_keys)

    def check(row: Any, index: int) -> Row:
        where = f"{name}[{index}]"
        if _holds_variables(row):
            raise TypeError(
                f"`{where}` is made of afnio Variables ({short_repr(row)}): a "
                "dataset built to feed an afnio Module (JsonlDataset(..., input=, "
                "target=)). Rows are read here as the chain takes them: build the "
                "JsonlDataset without input=/target= (its rows are dicts) and pass "
                "label_key= (and input_keys=)."
            )
        pair = _row(row, where, keys, label_key, variables)
        check_inputs([pair], name, variables, first=index)
        return pair

    return check


def chain_rows(
    chain: Any,
    trainset: Iterable[Any],
    valset: Iterable[Any] | None,
    *,
    input_keys: Sequence[str] | None = None,
    label_key: str | None = None,
) -> tuple[list[Row], list[Row]]:
    """The ``trainset`` and ``valset`` of ``chain`` (LangChain ``optimize`` and
    ``estimate``) as ``(inputs, target)`` pairs, each set checked by
    :func:`normalize_rows` and then against the chain's entry prompt
    (:func:`check_inputs`), the trainset first. Without a ``valset`` the trainset
    serves as both.

    Raises:
        TypeError, ValueError: as :func:`normalize_rows` and :func:`check_inputs`.
    """
    variables = entry_variables(chain)
    train = normalize_rows(
        trainset,
        "trainset",
        input_keys=input_keys,
        label_key=label_key,
        variables=variables,
    )
    check_inputs(train, "trainset", variables, input_keys=input_keys)
    if valset is None:
        return train, train
    val = normalize_rows(
        valset,
        "valset",
        input_keys=input_keys,
        label_key=label_key,
        variables=variables,
    )
    check_inputs(val, "valset", variables)
    return train, val
