"""The registry of model client classes that checkpoints may name.

A checkpoint stores a model client as ``{"class_type", "provider", "usage"}``. On load,
``class_type`` must name a registered class, and the caller passes the live client for
that slot (keys are never stored in checkpoints). Concrete clients (``afnio.models.
openai``) and the integrations' adapters register themselves here.

Example::

    >>> from afnio.models.model_registry import MODEL_REGISTRY, register_model_class
    >>> from afnio.models import BaseModel
    >>> @register_model_class
    ... class EchoModel(BaseModel):
    ...     def update_usage(self, usage, model_name=None):
    ...         pass
    >>> MODEL_REGISTRY["EchoModel"] is EchoModel
    True
    >>> del MODEL_REGISTRY["EchoModel"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from afnio.models.model import BaseModel

__all__ = [
    "MODEL_REGISTRY",
    "get_model_class",
    "model_class_name",
    "register_model_class",
]

MODEL_REGISTRY: dict[str, type[BaseModel]] = {}
_NAMES: dict[type, str] = {}

M = TypeVar("M", bound="type[BaseModel]")


def register_model_class(cls: M, name: str | None = None) -> M:
    """Register a :class:`BaseModel` subclass under ``name`` (default: its class
    name). Usable as a decorator.

    Raises:
        TypeError: if ``cls`` is not a BaseModel subclass.
        ValueError: if another class is already registered under that name.
    """
    from afnio.models.model import BaseModel

    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise TypeError(f"`cls` must be a BaseModel subclass, got {cls!r}.")
    key = name or cls.__name__
    existing = MODEL_REGISTRY.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"A model class is already registered as {key!r} ({existing.__module__}."
            f"{existing.__qualname__}); pass another `name`."
        )
    MODEL_REGISTRY[key] = cls
    _NAMES[cls] = key
    return cls


def model_class_name(cls: type) -> str:
    """The name a checkpoint uses for ``cls``: its registered name, else its class
    name."""
    name = _NAMES.get(cls)
    if name is not None and MODEL_REGISTRY.get(name) is cls:
        return name
    return cls.__name__


def get_model_class(name: str) -> type[BaseModel]:
    """Return the class registered as ``name``.

    Raises:
        KeyError: naming the known classes.
    """
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY)) or "none"
        raise KeyError(
            f"No model class registered as {name!r} (registered: {known}). Import the "
            "package that defines it, or call register_model_class()."
        ) from None
