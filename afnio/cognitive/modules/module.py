"""``afnio.cognitive.Module``: the base class of LM programs, like ``torch.nn.Module``.

A Module owns named state of seven kinds, registered by assignment in ``__init__``
(call ``super().__init__()`` first) or explicitly with ``register_*``:

================  ===========================================  =====================
kind              what                                         ``__setattr__`` rule
================  ===========================================  =====================
parameters        ``Parameter``: what an optimizer rewrites     1. any ``Parameter``
modules           child ``Module``\\ s                            2. any ``Module``
chats             ``[{"role": str, "content": [Variable]}]``   3. a non-empty chat
models            model clients (``BaseModel``)                4. any ``BaseModel``
completion cfgs   ``dict`` of LM call arguments                5. a ``str``-keyed dict
functions         importable top-level functions (``sum``)     6. such a function
buffers           non-trainable Variables (``register_buffer``)  7. an existing name
================  ===========================================  =====================

Anything else is a plain attribute (not saved). ``state_dict()`` holds every kind
(keys are dotted paths); ``load_state_dict()`` restores them.

Example::

    >>> import afnio
    >>> from afnio import cognitive as cog
    >>> class Greeter(cog.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.instruction = cog.Parameter("Greet warmly.", role="instruction")
    ...         self.register_buffer("suffix", afnio.Variable("!", role="suffix"))
    ...     def forward(self, name):
    ...         return self.instruction + name + self.suffix
    >>> g = Greeter()
    >>> [n for n, _ in g.named_parameters()]
    ['instruction']
    >>> list(g.state_dict())
    ['instruction', 'suffix']
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from afnio._secrets import mask_secrets, restore_secrets
from afnio._utils import _validate_multi_turn_messages
from afnio._variable import Variable
from afnio.cognitive.parameter import Parameter
from afnio.models.model import BaseModel
from afnio.models.model_registry import MODEL_REGISTRY

__all__ = ["FunctionReference", "Module", "function_import_path"]

_STORES = (
    "_parameters",
    "_buffers",
    "_chats",
    "_modules",
    "_models",
    "_completion_configs",
    "_functions",
)


_RESERVED = frozenset(
    {*_STORES, "training", "automatic_optimization", "_optimizers"}
    | {"_non_persistent_buffers_set"}
)


class _IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return (
            f"_IncompatibleKeys(missing_keys={self.missing_keys}, "
            f"unexpected_keys={self.unexpected_keys})"
        )

    __str__ = __repr__


# -- functions ------------------------------------------------------------------------


def function_import_path(func: Any) -> str | None:
    """``"module:qualname"`` if ``func`` is a top-level function that can be imported
    back (builtins included), else ``None`` (lambdas, closures, methods, nested
    functions, callables that are not functions)."""
    if inspect.ismethod(func) or not (
        inspect.isfunction(func) or inspect.isbuiltin(func)
    ):
        return None
    if inspect.isbuiltin(func) and getattr(func, "__self__", None) not in (
        None,
        sys.modules.get(getattr(func, "__module__", "") or ""),
    ):
        return None  # a bound builtin method such as [].append
    name = getattr(func, "__qualname__", "")
    module = getattr(func, "__module__", None)
    if not module or not name or "<" in name or "." in name:
        return None
    if getattr(func, "__closure__", None):
        return None
    owner = sys.modules.get(module)
    if owner is None or getattr(owner, name, None) is not func:
        return None
    return f"{module}:{name}"


def _module_filter(
    allow_functions: bool | Iterable[str] | None,
) -> Callable[[str], bool]:
    """The test ``allow_functions`` stands for: which modules a function stored by
    import path may be imported from.

    ``False`` or ``None``: none; ``True``: any; an iterable of module names: those
    modules and their submodules (``["pkg"]`` admits ``pkg`` and ``pkg.sub``, not
    ``pkgx``).

    Raises:
        TypeError: ``allow_functions`` is a ``str`` (write ``["name"]``) or not a
            bool or an iterable of ``str``.

    Example::

        >>> allowed = _module_filter(["my_pkg"])
        >>> allowed("my_pkg.metrics"), allowed("my_pkg"), allowed("os")
        (True, True, False)
    """
    if allow_functions is None or allow_functions is False:
        return lambda module: False
    if allow_functions is True:
        return lambda module: True
    if isinstance(allow_functions, str) or not isinstance(allow_functions, Iterable):
        hint = (
            f"; use [{allow_functions!r}]" if isinstance(allow_functions, str) else ""
        )
        raise TypeError(
            "`allow_functions` must be a bool or a list of module names, got "
            f"{type(allow_functions).__name__}{hint}."
        )
    names = tuple(allow_functions)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(
            f"`allow_functions` must list module names (non-empty str), got {bad[0]!r}."
        )
    allowed = frozenset(names)
    return lambda module: any(
        module == m or module.startswith(m + ".") for m in allowed
    )


# What a FunctionReference may put into an *empty* function slot without
# ``allow_functions``: builtins that only compute on their arguments. Evaluator
# modules fill their ``reduction_fn`` slot in ``forward`` (``sum`` by default), so a
# fresh one resuming from a checkpoint holds ``None`` there. Like the safe globals
# PyTorch's ``weights_only`` loading admits, these run no code of the file's choice.
_SAFE_FUNCTIONS = frozenset(
    f"builtins:{name}" for name in ("all", "any", "len", "max", "min", "sorted", "sum")
)


class FunctionReference:
    """A function stored by import path that was **not** imported (``afnio.load``
    without ``allow_functions``): nothing named in a file is imported unless you opt
    in.

    ``Module.load_state_dict`` accepts one only into a slot that already holds that
    very function (a no-op), into an empty slot if it names one of a few pure
    builtins (``sum``, ``max``, ``min``, ``len``, ``any``, ``all``, ``sorted``), or,
    with ``load_state_dict(..., allow_functions=...)``, imports it; :meth:`resolve`
    imports it explicitly."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        if not isinstance(path, str):
            raise TypeError(
                f'`path` must be a str "module:qualname", got {type(path).__name__}.'
            )
        self.path = path

    def resolve(self) -> Callable[..., Any]:
        """Import the module and return the function (runs the module's import-time
        code: only do this for trusted files).

        Raises:
            ImportError: the path does not name an importable top-level function.
        """
        module_name, _, name = self.path.partition(":")
        if not (
            name.isidentifier()
            and all(part.isidentifier() for part in module_name.split("."))
        ):
            raise ImportError(f"{self.path!r} is not a 'module:function' path.")
        module = importlib.import_module(module_name)
        func = getattr(module, name, None)
        if func is None or function_import_path(func) != self.path:
            raise ImportError(f"{self.path!r} does not name an importable function.")
        return func

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FunctionReference) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"FunctionReference({self.path!r})"


# -- the Module -----------------------------------------------------------------------


def _addindent(text: str, spaces: int) -> str:
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    return lines[0] + "\n" + "\n".join(" " * spaces + line for line in lines[1:])


def _same_shape(slot: Variable, value: Variable) -> str | None:
    slot_list, value_list = isinstance(slot.data, list), isinstance(value.data, list)
    if slot_list != value_list:
        kinds = (
            "a list" if value_list else "a scalar",
            "a list" if slot_list else "a scalar",
        )
        return f"the checkpoint holds {kinds[0]}, the module {kinds[1]}"
    if slot_list and len(slot.data) != len(value.data):
        return (
            f"the checkpoint holds {len(value.data)} elements, the module "
            f"{len(slot.data)}"
        )
    return None


class Module:
    """Base class of every afnio program (see the module docstring).

    Subclasses call ``super().__init__()`` before assigning state and implement
    :meth:`forward`; ``module(*args)`` calls ``forward`` (there are no hooks).
    """

    _version: int = 1
    training: bool
    automatic_optimization: bool

    def __init__(self) -> None:
        # set through object.__setattr__: our __setattr__ needs these to exist
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "automatic_optimization", True)
        object.__setattr__(self, "_optimizers", None)
        for store in _STORES:
            object.__setattr__(self, store, OrderedDict())
        object.__setattr__(self, "_non_persistent_buffers_set", set())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the module's output; every subclass implements it."""
        raise NotImplementedError(  # abstract: subclasses implement forward
            f"Module [{type(self).__name__}] is missing the required "
            '"forward" function.'
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- registration ----------------------------------------------------------------

    def _check_name(self, name: Any, store: str, what: str) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"cannot assign {what} before Module.__init__() call; call "
                "super().__init__() first in your __init__."
            )
        if not isinstance(name, str):
            raise TypeError(
                f"{what} name should be a string, got {type(name).__name__}."
            )
        if name == "":
            raise KeyError(f"{what} name cannot be an empty string")
        if "." in name:
            raise KeyError(f'{what} name cannot contain ".", got: {name}')
        if hasattr(self, name) and name not in self.__dict__[store]:
            raise KeyError(f"Attribute '{name}' already exists.")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register a :class:`Parameter` (or ``None``) as ``name``.

        Raises:
            TypeError: if ``param`` is not a Parameter or None.
            ValueError: if ``param`` is not a leaf (computed by a Function).
        """
        self._check_name(name, "_parameters", "parameter")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"cannot assign '{type(param).__name__}' object to parameter '{name}' "
                "(afnio.cognitive.Parameter or None required)"
            )
        if param is not None and not param.is_leaf:
            raise ValueError(
                f"Cannot assign non-leaf Variable to parameter '{name}'. Module "
                "parameters must be created explicitly. To use a computed value, "
                "compute it in the forward() method."
            )
        self._parameters[name] = param

    def register_buffer(
        self, name: str, variable: Variable | None, persistent: bool = True
    ) -> None:
        """Register a non-trainable Variable as ``name``; a non-persistent buffer
        stays out of ``state_dict``."""
        self._check_name(name, "_buffers", "buffer")
        if variable is not None and not isinstance(variable, Variable):
            raise TypeError(
                f"cannot assign '{type(variable).__name__}' object to buffer '{name}' "
                "(afnio.Variable or None required)"
            )
        self._buffers[name] = variable
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def register_chat(self, name: str, messages: list[dict[str, Any]] | None) -> None:
        """Register a multi-turn chat ``[{"role": str, "content": [Variable]}]``."""
        self._check_name(name, "_chats", "chat")
        if messages is not None:
            _validate_multi_turn_messages(messages, name=name)
        self._chats[name] = messages

    def register_model(self, name: str, model: BaseModel | None) -> None:
        """Register a model client (a :class:`~afnio.models.BaseModel`)."""
        self._check_name(name, "_models", "model")
        if model is not None and not isinstance(model, BaseModel):
            raise TypeError(
                f"cannot assign '{type(model).__name__}' object to model '{name}' "
                "(afnio.models.BaseModel or None required)"
            )
        self._models[name] = model

    def register_completion_config(
        self, name: str, config: dict[str, Any] | None
    ) -> None:
        """Register a dict of LM call arguments (``{"temperature": 0}``)."""
        self._check_name(name, "_completion_configs", "completion config")
        if config is not None and not isinstance(config, dict):
            raise TypeError(
                f"cannot assign '{type(config).__name__}' object to completion config "
                f"'{name}' (dict or None required)"
            )
        if config is not None:
            bad = [k for k in config if not isinstance(k, str)]
            if bad:
                raise TypeError(
                    f"completion config '{name}' keys must be strings, got {bad!r}."
                )
        self._completion_configs[name] = config

    def register_function(self, name: str, func: Callable[..., Any] | None) -> None:
        """Register an importable top-level function (``sum``, ``my_pkg.metric``).

        Raises:
            TypeError: for lambdas, closures, methods, nested functions and other
                callables: they could not be saved and re-imported.
        """
        self._check_name(name, "_functions", "function")
        if func is not None and function_import_path(func) is None:
            raise TypeError(
                f"cannot register {func!r} as function '{name}': only importable "
                "top-level functions can be saved (define it with `def` at module "
                "level; lambdas, closures and methods are not allowed)."
            )
        self._functions[name] = func

    def register_module(self, name: str, module: Module | None) -> None:
        """Register a child module."""
        self._check_name(name, "_modules", "module")
        if module is not None and not isinstance(module, Module):
            raise TypeError(
                f"{type(module).__name__} is not a Module subclass (child '{name}')"
            )
        self._modules[name] = module

    add_module = register_module

    def _remove_from(self, name: str, *stores: str) -> None:
        """Forget ``name`` in the given stores and as a plain attribute, so that it
        can be registered in another store."""
        for store in stores:
            self.__dict__[store].pop(name, None)
        if name not in _RESERVED:
            self.__dict__.pop(name, None)
        if "_buffers" in stores:
            self._non_persistent_buffers_set.discard(name)

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if "_parameters" not in d:
            if isinstance(value, (Parameter, Module, BaseModel)):
                raise AttributeError(
                    "cannot assign before Module.__init__() call; call "
                    "super().__init__() first in your __init__."
                )
            object.__setattr__(self, name, value)
            return
        params = d["_parameters"]
        if isinstance(value, Parameter):
            self._remove_from(name, *(s for s in _STORES if s != "_parameters"))
            self.register_parameter(name, value)
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as parameter '{name}' "
                    "(afnio.cognitive.Parameter or None expected)"
                )
            params[name] = None
        elif isinstance(value, Module):
            self._remove_from(name, *(s for s in _STORES if s != "_modules"))
            self.register_module(name, value)
        elif name in d["_modules"] and value is None:
            d["_modules"][name] = None
        elif value and _validate_multi_turn_messages(value, raise_error=False):
            self._remove_from(name, *(s for s in _STORES if s != "_chats"))
            self.register_chat(name, value)
        elif isinstance(value, BaseModel):
            self._remove_from(name, *(s for s in _STORES if s != "_models"))
            self.register_model(name, value)
        elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
            self._remove_from(name, *(s for s in _STORES if s != "_completion_configs"))
            self.register_completion_config(name, value)
        elif function_import_path(value) is not None:
            self._remove_from(name, *(s for s in _STORES if s != "_functions"))
            self.register_function(name, value)
        elif name in d["_buffers"]:
            if value is not None and not isinstance(value, Variable):
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as buffer '{name}' "
                    "(afnio.Variable or None expected)"
                )
            d["_buffers"][name] = value
        elif value is None and any(
            name in d[s]
            for s in ("_chats", "_models", "_completion_configs", "_functions")
        ):
            for s in ("_chats", "_models", "_completion_configs", "_functions"):
                if name in d[s]:
                    d[s][name] = None
        else:
            for store in _STORES:
                d[store].pop(name, None)
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for store in (
            "_parameters",
            "_buffers",
            "_chats",
            "_modules",
            "_models",
            "_completion_configs",
            "_functions",
        ):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(
            f"'{type(self).__name__}' object has no attribute '{name}'"
        )

    def __delattr__(self, name: str) -> None:
        for store in _STORES:
            if name in self.__dict__[store]:
                del self.__dict__[store][name]
                self._non_persistent_buffers_set.discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self) -> list[str]:
        keys = set(super().__dir__())
        for store in _STORES:
            keys.update(self.__dict__[store])
        return sorted(k for k in keys if not k[0].isdigit())

    # -- iteration -------------------------------------------------------------------

    def _named_members(
        self,
        get_members: Callable[[Module], Iterator[tuple[str, Any]]],
        prefix: str = "",
        recurse: bool = True,
        remove_duplicate: bool = True,
    ) -> Iterator[tuple[str, Any]]:
        seen: set[int] = set()
        modules = (
            self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
            if recurse
            else [(prefix, self)]
        )
        for module_prefix, module in modules:
            for name, value in get_members(module):
                if value is None:
                    continue
                if remove_duplicate:
                    if id(value) in seen:
                        continue
                    seen.add(id(value))
                yield (f"{module_prefix}.{name}" if module_prefix else name), value

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, Parameter)`` pairs, each Parameter once."""
        return self._named_members(
            lambda m: iter(m._parameters.items()), prefix, recurse, remove_duplicate
        )

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Every Parameter of this module (and its children)."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Variable]]:
        """``(dotted name, Variable)`` pairs of the buffers."""
        return self._named_members(
            lambda m: iter(m._buffers.items()), prefix, recurse, remove_duplicate
        )

    def buffers(self, recurse: bool = True) -> Iterator[Variable]:
        """Every buffer."""
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def named_chats(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """``(dotted name, messages)`` pairs of the chats."""
        return self._named_members(
            lambda m: iter(m._chats.items()), prefix, recurse, remove_duplicate
        )

    def chats(self, recurse: bool = True) -> Iterator[list[dict[str, Any]]]:
        """Every chat (a list of messages)."""
        for _, c in self.named_chats(recurse=recurse):
            yield c

    def named_models(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, BaseModel]]:
        """``(dotted name, client)`` pairs of the model clients."""
        return self._named_members(
            lambda m: iter(m._models.items()), prefix, recurse, remove_duplicate
        )

    def models(self, recurse: bool = True) -> Iterator[BaseModel]:
        """Every model client."""
        for _, m in self.named_models(recurse=recurse):
            yield m

    def named_completion_configs(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(dotted name, dict)`` pairs of the completion configs."""
        return self._named_members(
            lambda m: iter(m._completion_configs.items()),
            prefix,
            recurse,
            remove_duplicate,
        )

    def completion_configs(self, recurse: bool = True) -> Iterator[dict[str, Any]]:
        """Every completion config."""
        for _, c in self.named_completion_configs(recurse=recurse):
            yield c

    def named_functions(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Callable[..., Any]]]:
        """``(dotted name, function)`` pairs of the registered functions."""
        return self._named_members(
            lambda m: iter(m._functions.items()), prefix, recurse, remove_duplicate
        )

    def functions(self, recurse: bool = True) -> Iterator[Callable[..., Any]]:
        """Every registered function."""
        for _, f in self.named_functions(recurse=recurse):
            yield f

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """``(name, module)`` pairs of the direct children, each once."""
        seen: set[int] = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self) -> Iterator[Module]:
        """The direct children."""
        for _, m in self.named_children():
            yield m

    def named_modules(
        self,
        memo: set[int] | None = None,
        prefix: str = "",
        remove_duplicate: bool = True,
    ) -> Iterator[tuple[str, Module]]:
        """``(dotted name, module)`` for this module and all below it (itself first,
        with name ``prefix``)."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is None:
                continue
            sub = f"{prefix}.{name}" if prefix else name
            yield from module.named_modules(memo, sub, remove_duplicate)

    def modules(self) -> Iterator[Module]:
        """This module and every module below it, each once."""
        for _, m in self.named_modules():
            yield m

    # -- modes and gradients ---------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        """Set training mode on this module and its children; returns ``self``."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        object.__setattr__(self, "training", mode)
        for module in self.children():
            module.train(mode)
        return self

    def eval(self) -> Module:
        """``train(False)``."""
        return self.train(False)

    def _chat_variables(self) -> Iterator[Variable]:
        for chat in self.chats():
            for message in chat:
                yield from message["content"]

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Set ``requires_grad`` on every parameter and every chat Variable."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        for v in self._chat_variables():
            v.requires_grad_(requires_grad)
        return self

    def empty_grad(self) -> None:
        """Clear ``.grad`` of every parameter and chat Variable (in place)."""
        for v in (*self.parameters(), *self._chat_variables()):
            if v.is_leaf and v._grad:
                v._grad.clear()

    # -- printing --------------------------------------------------------------------

    def extra_repr(self) -> str:
        """Extra text for ``repr``; override to show settings."""
        return ""

    def _get_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        extra = self.extra_repr()
        lines = extra.split("\n") if extra else []
        for name, module in self._modules.items():
            mod_str = _addindent(repr(module), 2)
            lines.append(f"({name}): {mod_str}")
        main = self._get_name() + "("
        if lines:
            if len(lines) == 1 and not self._modules:
                main += lines[0]
            else:
                main += "\n  " + "\n  ".join(lines) + "\n"
        return main + ")"

    # -- state -----------------------------------------------------------------------

    def get_extra_state(self) -> Any:
        """Extra JSON-serialisable state for ``state_dict``; override together with
        :meth:`set_extra_state`."""
        raise RuntimeError(
            "Reached a code path in Module.get_extra_state() that should never be "
            "called: override get_extra_state() and set_extra_state() together."
        )

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned."""
        raise RuntimeError(
            "Reached a code path in Module.set_extra_state() that should never be "
            "called: override get_extra_state() and set_extra_state() together."
        )

    def _has_extra_state(self) -> bool:
        return type(self).get_extra_state is not Module.get_extra_state

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        import copy

        for name, p in self._parameters.items():
            if p is not None:
                destination[prefix + name] = p if keep_vars else p.detach()
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = b if keep_vars else b.detach()
        for name, chat in self._chats.items():
            if chat is not None:
                destination[prefix + name] = [
                    {
                        "role": m["role"],
                        "content": [
                            v if keep_vars else v.detach() for v in m["content"]
                        ],
                    }
                    for m in chat
                ]
        for name, model in self._models.items():
            if model is not None:
                destination[prefix + name] = copy.deepcopy(model)
        for name, config in self._completion_configs.items():
            if config is not None:
                # credentials (extra_headers' Authorization, ...) are never saved
                destination[prefix + name] = mask_secrets(config)
        for name, func in self._functions.items():
            if func is not None:
                destination[prefix + name] = func
        if self._has_extra_state():
            destination[prefix + "_extra_state"] = self.get_extra_state()

    def state_dict(
        self,
        *,
        destination: dict[str, Any] | None = None,
        prefix: str = "",
        keep_vars: bool = False,
    ) -> OrderedDict[str, Any]:
        """Every saved slot by dotted name: parameters and persistent buffers
        (detached copies unless ``keep_vars``), chats, model clients (as
        ``{"class_type", "provider", "usage"}``), completion configs, functions, and
        ``_extra_state``. ``None`` slots are omitted. Credentials in completion
        configs (an ``extra_headers`` ``Authorization``, an ``extra_query`` ``key``,
        any ``sk-...`` value: see ``afnio._secrets``) are saved as ``"<redacted>"``,
        never in clear.

        Example::

            >>> from afnio import cognitive as cog
            >>> m = cog.Module()
            >>> m.p = cog.Parameter("x", role="prompt")
            >>> sd = m.state_dict()
            >>> sd["p"].requires_grad, m.p.requires_grad
            (False, True)
        """
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # type: ignore[attr-defined]
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata[prefix[:-1]] = {"version": self._version}
        self._save_to_state_dict(destination, prefix, keep_vars)
        for name, module in self._modules.items():
            if module is not None:
                module.state_dict(
                    destination=destination,
                    prefix=f"{prefix}{name}.",
                    keep_vars=keep_vars,
                )
        return destination  # type: ignore[return-value]

    def _slot_names(self) -> dict[str, str]:
        """Every loadable slot name of this module -> its store."""
        slots: dict[str, str] = {}
        for store in _STORES:
            if store == "_modules":
                continue
            for name in self.__dict__[store]:
                if store == "_buffers" and name in self._non_persistent_buffers_set:
                    continue
                slots[name] = store
        if self._has_extra_state():
            slots["_extra_state"] = "_extra_state"
        return slots

    def load_state_dict(
        self,
        state_dict: Mapping[str, Any],
        strict: bool = True,
        assign: bool = False,
        model_clients: Mapping[str, BaseModel] | None = None,
        *,
        allow_functions: bool | Iterable[str] = False,
    ) -> _IncompatibleKeys:
        """Restore the slots from ``state_dict`` (as made by :meth:`state_dict`).

        Everything is checked first and nothing changes unless the whole dict can be
        loaded. Without ``assign``, data and role are copied into the existing
        Variables, which keep their own ``requires_grad`` (loading a checkpoint never
        freezes a parameter); with ``assign`` (or into a ``None`` slot) the saved
        objects are set, a plain Variable loaded into a parameter slot becoming a
        Parameter. Model clients are never stored: pass the live client for each model
        slot in ``model_clients`` (by dotted key); its usage is restored from the
        checkpoint. A credential saved masked (``"<redacted>"``) in a completion
        config keeps the value the slot holds at that place, or is left out when the
        slot has none: a masked placeholder is never loaded, so never sent.

        Function slots take real functions as they are (an in-memory state dict, or a
        file loaded with ``afnio.load(..., allow_functions=...)``). A
        :class:`FunctionReference` (what ``afnio.load`` returns by default) loads only
        into a slot that already holds that very function, or into an empty slot if
        it names a pure builtin (``sum``, ``max``, ``min``, ``len``, ``any``, ``all``,
        ``sorted``: what an evaluator's ``reduction_fn`` holds), so a tampered file
        cannot swap in another one (``builtins:exec``, ``posix:system``); to accept
        other functions from a file you trust, pass ``allow_functions``: ``True``
        imports any, a list of module names only functions of those modules (and
        their submodules). Importing runs the module's code.

        Args:
            state_dict: the slots by dotted key.
            strict: whether missing and unexpected keys are errors.
            assign: set the saved objects instead of copying into the existing ones.
            model_clients: the live client for each model slot, by dotted key.
            allow_functions: which :class:`FunctionReference`\\ s may be imported
                into slots that do not already hold them (default: none).

        Returns:
            ``(missing_keys, unexpected_keys)``.

        Raises:
            TypeError: if ``state_dict`` is not a mapping, or ``allow_functions`` is
                neither a bool nor a list of module names.
            RuntimeError: ``"Error(s) in loading state_dict for <Cls>: ..."`` listing
                every problem (with ``strict``, missing and unexpected keys too).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"Expected state_dict to be dict-like, got {type(state_dict).__name__}."
            )
        may_import = _module_filter(allow_functions)
        model_clients = dict(model_clients or {})
        missing: list[str] = []
        errors: list[str] = []
        actions: list[Callable[[], None]] = []
        expected: set[str] = set()

        for prefix, module in self.named_modules(remove_duplicate=True):
            key_prefix = f"{prefix}." if prefix else ""
            for name, store in module._slot_names().items():
                key = key_prefix + name
                expected.add(key)
                slot = (
                    None
                    if store == "_extra_state"
                    else module.__dict__[store].get(name)
                )
                if key not in state_dict:
                    if slot is not None or store == "_extra_state":
                        missing.append(key)
                    continue
                module._plan_load(
                    store,
                    name,
                    key,
                    slot,
                    state_dict[key],
                    assign,
                    model_clients,
                    may_import,
                    errors,
                    actions,
                )
        unexpected = [k for k in state_dict if k not in expected and k != "_metadata"]
        if strict:
            if unexpected:
                errors.insert(
                    0,
                    "Unexpected key(s) in state_dict: "
                    + ", ".join(f'"{k}"' for k in unexpected)
                    + ".",
                )
            if missing:
                errors.insert(
                    0,
                    "Missing key(s) in state_dict: "
                    + ", ".join(f'"{k}"' for k in missing)
                    + ".",
                )
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                + "\n\t".join(errors)
            )
        for action in actions:
            action()
        return _IncompatibleKeys(missing, unexpected)

    def _plan_load(
        self,
        store: str,
        name: str,
        key: str,
        slot: Any,
        value: Any,
        assign: bool,
        model_clients: dict[str, BaseModel],
        may_import: Callable[[str], bool],
        errors: list[str],
        actions: list[Callable[[], None]],
    ) -> None:
        if store == "_extra_state":
            actions.append(lambda: self.set_extra_state(value))
        elif store in ("_parameters", "_buffers"):
            self._plan_variable(store, name, key, slot, value, assign, errors, actions)
        elif store == "_chats":
            self._plan_chat(name, key, slot, value, assign, errors, actions)
        elif store == "_models":
            self._plan_model(name, key, value, model_clients, errors, actions)
        elif store == "_completion_configs":
            if value is not None and not isinstance(value, dict):
                errors.append(
                    f'completion config "{key}" must be a dict, got '
                    f"{type(value).__name__}."
                )
                return
            # a masked credential keeps the slot's live value, or is dropped
            restored = restore_secrets(value, slot) if value is not None else None
            actions.append(lambda: self._completion_configs.__setitem__(name, restored))
        elif store == "_functions":
            self._plan_function(name, key, slot, value, may_import, errors, actions)

    def _plan_variable(
        self,
        store: str,
        name: str,
        key: str,
        slot: Variable | None,
        value: Any,
        assign: bool,
        errors: list[str],
        actions: list[Callable[[], None]],
    ) -> None:
        if not isinstance(value, Variable):
            errors.append(
                f'While copying "{key}": expected a Variable, got '
                f"{type(value).__name__}."
            )
            return
        if slot is not None:
            mismatch = _same_shape(slot, value)
            if mismatch:
                errors.append(f'size mismatch for "{key}": {mismatch}.')
                return
        target = self.__dict__[store]
        if assign or slot is None:
            if store == "_parameters" and not isinstance(value, Parameter):
                requires_grad = slot.requires_grad if slot is not None else True
                new: Variable = Parameter(value._copy_data(), value.role, requires_grad)
            else:
                new = value
            actions.append(lambda: target.__setitem__(name, new))
        else:

            def copy_into(slot: Variable = slot, value: Variable = value) -> None:
                slot._data = value._copy_data()
                slot.role = value.role

            actions.append(copy_into)

    def _plan_chat(
        self,
        name: str,
        key: str,
        slot: list[dict[str, Any]] | None,
        value: Any,
        assign: bool,
        errors: list[str],
        actions: list[Callable[[], None]],
    ) -> None:
        try:
            _validate_multi_turn_messages(value, name=key)
        except (TypeError, ValueError) as e:
            errors.append(f'While copying chat "{key}": {e}')
            return
        if assign or slot is None:
            actions.append(lambda: self._chats.__setitem__(name, value))
            return
        if len(slot) != len(value):
            errors.append(
                f'chat "{key}": the checkpoint has {len(value)} messages, the module '
                f"{len(slot)}."
            )
            return
        pairs: list[tuple[Variable, Variable]] = []
        for i, (mine, saved) in enumerate(zip(slot, value, strict=True)):
            if mine["role"] != saved["role"]:
                errors.append(
                    f'chat "{key}" message {i}: role {saved["role"]!r} in the '
                    f"checkpoint, {mine['role']!r} in the module."
                )
                return
            if len(mine["content"]) != len(saved["content"]):
                errors.append(
                    f'chat "{key}" message {i}: {len(saved["content"])} content '
                    f"Variables in the checkpoint, {len(mine['content'])} in the "
                    "module."
                )
                return
            for j, (a, b) in enumerate(
                zip(mine["content"], saved["content"], strict=True)
            ):
                mismatch = _same_shape(a, b)
                if mismatch:
                    errors.append(f'chat "{key}" message {i} content {j}: {mismatch}.')
                    return
                pairs.append((a, b))

        def copy_all() -> None:
            for a, b in pairs:
                a._data = b._copy_data()
                a.role = b.role

        actions.append(copy_all)

    def _plan_model(
        self,
        name: str,
        key: str,
        value: Any,
        model_clients: dict[str, BaseModel],
        errors: list[str],
        actions: list[Callable[[], None]],
    ) -> None:
        if isinstance(value, BaseModel):
            actions.append(lambda: self._models.__setitem__(name, value))
            return
        if not isinstance(value, Mapping) or "class_type" not in value:
            errors.append(
                f'model "{key}": expected {{"class_type", "provider", "usage"}}, got '
                f"{type(value).__name__}."
            )
            return
        class_type = value["class_type"]
        cls = MODEL_REGISTRY.get(class_type)
        if cls is None:
            known = ", ".join(sorted(MODEL_REGISTRY)) or "none"
            errors.append(
                f'model "{key}": unknown class_type {class_type!r} (registered: '
                f"{known}). Import the package that defines it."
            )
            return
        client = model_clients.get(key)
        if not isinstance(client, cls):
            errors.append(
                f"Missing model client for '{key}' of expected type '{class_type}'. "
                f"Pass it as load_state_dict(..., model_clients={{'{key}': "
                f"{class_type}(...)}})."
            )
            return
        usage = value.get("usage")

        def restore(client: BaseModel = client) -> None:
            self._models[name] = client
            if usage:
                client.update_usage(usage)

        actions.append(restore)

    def _plan_function(
        self,
        name: str,
        key: str,
        slot: Any,
        value: Any,
        may_import: Callable[[str], bool],
        errors: list[str],
        actions: list[Callable[[], None]],
    ) -> None:
        if isinstance(value, FunctionReference):
            if slot is not None and function_import_path(slot) == value.path:
                return  # the module already holds that very function
            module = value.path.partition(":")[0]
            safe = slot is None and value.path in _SAFE_FUNCTIONS
            if not (safe or may_import(module)):
                held = function_import_path(slot) if slot is not None else None
                holds = (
                    f"holds {held!r}"
                    if held is not None
                    else ("is empty" if slot is None else f"holds {slot!r}")
                )
                errors.append(
                    f'function "{key}": refused {value.path!r} from the state dict '
                    f"(the slot {holds}). A function reference loads only into a slot "
                    "already holding that function; if you trust this checkpoint, "
                    "pass allow_functions=True or allow_functions=[module names] to "
                    "load_state_dict (it imports the module), or assign the "
                    "function yourself."
                )
                return
            try:
                func = value.resolve()
            except Exception as e:  # importing runs the module's code: report it
                errors.append(
                    f'function "{key}": cannot import {value.path!r}: '
                    f"{type(e).__name__}: {e}"
                )
                return
            actions.append(lambda: self._functions.__setitem__(name, func))
            return
        if value is not None and not callable(value):
            errors.append(f'function "{key}": expected a function, got {value!r}.')
            return
        actions.append(lambda: self._functions.__setitem__(name, value))

    # -- the trainer protocol --------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """One training step: return ``(score, explanation)`` or a dict with
        ``"loss": (score, explanation)`` plus extra metrics."""
        raise NotImplementedError(  # abstract: the Trainer protocol
            f"{type(self).__name__}.training_step is not implemented: override it to "
            "train with afnio.trainer.Trainer."
        )

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        """One validation step (same return value as :meth:`training_step`)."""
        raise NotImplementedError(  # abstract: the Trainer protocol
            f"{type(self).__name__}.validation_step is not implemented: override it "
            "to validate with afnio.trainer.Trainer."
        )

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """One test step (same return value as :meth:`training_step`)."""
        raise NotImplementedError(  # abstract: the Trainer protocol
            f"{type(self).__name__}.test_step is not implemented: override it to "
            "test with afnio.trainer.Trainer."
        )

    def configure_optimizers(self) -> Any:
        """Return the optimizer the Trainer should use."""
        raise NotImplementedError(  # abstract: the Trainer protocol
            f"{type(self).__name__}.configure_optimizers is not implemented: override "
            "it to return an optimizer (e.g. afnio.optim.TGD(self.parameters(), ...))."
        )

    def optimizers(self) -> Any:
        """The optimizer set by ``Trainer.fit`` (for manual optimization).

        Raises:
            AttributeError: before ``Trainer.fit`` has set it.
        """
        if self._optimizers is None:
            raise AttributeError(
                "No optimizer set: optimizers() is available inside Trainer.fit, "
                "after configure_optimizers()."
            )
        return self._optimizers
