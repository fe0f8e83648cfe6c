"""Model clients: base classes, usage and cost accounting, the response cache, and the
registry of client classes. Concrete clients: ``afnio.models.openai``."""

from afnio.models.cache import CacheStats, disable_cache, enable_cache, get_cache
from afnio.models.model import (
    BaseModel,
    ChatCompletionModel,
    EmbeddingModel,
    TextCompletionModel,
)
from afnio.models.model_registry import (
    MODEL_REGISTRY,
    get_model_class,
    register_model_class,
)
from afnio.models.pricing import (
    ModelPrice,
    get_model_price,
    register_model_price,
    unpriced_models,
)

__all__ = [
    "MODEL_REGISTRY",
    "BaseModel",
    "CacheStats",
    "ChatCompletionModel",
    "EmbeddingModel",
    "ModelPrice",
    "TextCompletionModel",
    "disable_cache",
    "enable_cache",
    "get_cache",
    "get_model_class",
    "get_model_price",
    "register_model_class",
    "register_model_price",
    "unpriced_models",
]

# the OpenAI clients register themselves in MODEL_REGISTRY on import
from afnio.models import openai as openai
