"""Image encoders behind one interface and a small registry (see :mod:`genpath.encoders.registry`)."""

from genpath.encoders.base import ImageEncoder
from genpath.encoders.registry import create_encoder, list_encoders, register_encoder
from genpath.encoders.small_cnn import SmallHistologyEncoder

__all__ = ["ImageEncoder", "SmallHistologyEncoder", "create_encoder", "list_encoders", "register_encoder"]
