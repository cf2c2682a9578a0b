"""Model sources and loaders: what a server or gateway needs of a Hugging Face model."""

from models.loading import DTYPES, Head, Span, load_config, load_head, load_span
from models.resolve import ModelSource, resolve_model

__all__ = [
    "DTYPES",
    "Head",
    "ModelSource",
    "Span",
    "load_config",
    "load_head",
    "load_span",
    "resolve_model",
]
