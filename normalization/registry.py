"""The registry of normalization methods: built-in subclasses and entry-point plugins.

Every :class:`~normalization.base.StainNormalizer` subclass with a ``method`` name registers
itself on definition. Methods that live in other packages (genpath's diffusion normalizer,
``stainfuser``, needs layer-2 pipelines) are declared in the ``genpath.normalizers``
entry-point group and imported only when asked for by name, so this package never imports
upward.

Example:
    >>> "stainfuser" in available_methods()  # listed without importing it
    True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from genpath.utils.logging import get_logger

#: A :class:`~normalization.base.StainNormalizer` subclass (named loosely here: the base
#: imports this module, not the other way round).
NormalizerClass = type[nn.Module]

logger = get_logger(__name__)
#: method name -> class
REGISTRY: dict[str, NormalizerClass] = {}
#: Entry-point group through which other packages add methods without this package importing them.
ENTRY_POINT_GROUP = "genpath.normalizers"


def load_plugins(name: str | None = None) -> None:
    """Register methods that installed packages declare in the ``genpath.normalizers`` entry-point group.

    Only the plugin ``name`` is imported (all unregistered ones when None), so the classical
    methods never pay for (or depend on) the neural ones. A plugin that fails to import is
    skipped with a warning naming it: one broken extra must not take the others down.
    """
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in REGISTRY or (name is not None and entry.name != name):
            continue
        try:
            cls = entry.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must not break the registry
            logger.warning("normalizer plugin %r (%s) failed to load: %s", entry.name, entry.value, error)
            continue
        REGISTRY.setdefault(entry.name, cls)


def register_normalizer(cls: NormalizerClass) -> NormalizerClass:
    """Register a :class:`~normalization.base.StainNormalizer` subclass under its ``method`` (a class decorator).

    Subclasses with a ``method`` register themselves on definition; this is for classes created
    elsewhere. Packages that should be found without being imported declare an entry point in
    the ``genpath.normalizers`` group instead (see ``pyproject.toml``).
    """
    if not cls.method:
        raise ValueError(f"cls: expected a StainNormalizer with a 'method' name, got {cls.__name__}")
    REGISTRY[cls.method] = cls
    return cls


def available_methods() -> list[str]:
    """Names of registered normalization methods (``macenko``, ``reinhard``, ..., and plugins such as ``stainfuser``).

    Example:
        >>> {"macenko", "reinhard", "vahadane"} <= set(available_methods())
        True
    """
    from importlib.metadata import entry_points

    return sorted(set(REGISTRY) | {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)})


def build_normalizer(method: str, **kwargs: Any) -> nn.Module:
    """Instantiate a normalizer by method name.

    Example:
        >>> build_normalizer("macenko").method
        'macenko'
    """
    if method not in REGISTRY and isinstance(method, str):
        load_plugins(method)
    if method not in REGISTRY:
        raise ValueError(f"method: expected one of {available_methods()}, got {method!r}")
    return REGISTRY[method](**kwargs)
