"""Image encoders behind one interface and a small registry (see :mod:`genpath.encoders.registry`).

Importing the package registers the built-in families (:mod:`genpath.encoders.entries` and the
published presets of :mod:`genpath.encoders.published`, which import the registry; the registry
imports no family).
"""

from genpath.encoders import entries, published  # noqa: F401 - register the built-in families
from genpath.encoders.base import ImageEncoder
from genpath.encoders.registry import create_encoder, list_encoders, register_encoder
from genpath.encoders.small_cnn import SmallHistologyEncoder

__all__ = ["ImageEncoder", "SmallHistologyEncoder", "create_encoder", "list_encoders", "register_encoder"]
