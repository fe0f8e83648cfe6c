"""Model clients: the base class, the usage dict and the registry of client classes."""

from afnio.models.model import BaseModel
from afnio.models.model_registry import (
    MODEL_REGISTRY,
    get_model_class,
    register_model_class,
)

__all__ = ["MODEL_REGISTRY", "BaseModel", "get_model_class", "register_model_class"]
