"""One loading path for every genpath pipeline: local folders only, cast, checked, quiet.

:class:`GenpathPipelineMixin` gives each pipeline the same ``from_pretrained``:

1. the path must be a local folder (genpath never downloads: ``local_files_only=True``);
   otherwise a one-line ``FileNotFoundError`` naming the argument;
2. ``model_index.json`` must name this pipeline class (or a subclass, so a base class such as
   :class:`~genpath.pipelines.image_translation.ImageTranslationPipeline` loads either
   translator) and list every component the class needs, each in its subfolder; otherwise a
   one-line ``ValueError``;
3. the components load cast to ``dtype`` (float32 by default: the shipped checkpoints are
   fp16), through diffusers' ``dtype=`` keyword (never the deprecated ``torch_dtype=``);
4. the loaded parts must fit together (the pipeline's ``check_components``, e.g.
   ``"unet: expected in/out channels 8/4 ..."``);
5. progress bars (diffusers' "Loading pipeline components" and the sampler's) are switched
   off unless ``disable_progress_bar=False``.

Pipelines stored in another layout override :meth:`GenpathPipelineMixin._load_folder` (the
ControlNet shipped apart from its base model: :class:`~genpath.pipelines.mask_to_image.MaskToImagePipeline`;
the published PixCell folders: :class:`~genpath.pipelines.pixcell.PixCellPipeline`).

Published folders whose ``model_index.json`` names a custom pipeline file (PixCell's
``PixCellPipeline`` with ``["pixcell_transformer_2d", "PixCellTransformer2DModel"]``) load only
when genpath has its own class of that name that declares, in ``published_components``, the
component classes it rebuilds itself (by class name, from their config and safetensors): the
library named next to them is never imported, nor any file of the folder.

Example:
    >>> from genpath.pipelines import EmbeddingToImagePipeline
    >>> pipe = EmbeddingToImagePipeline.from_pretrained("samples/checkpoints/ldm_small")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch

from genpath.utils.logging import get_logger
from genpath.utils.quiet_imports import import_kornia

logger = get_logger(__name__)
import_kornia()  # diffusers' pipeline loading imports kornia (guiders): without its TorchScript warnings

ARGUMENT = "pretrained_model_name_or_path"
_PIPELINES: dict[str, type[GenpathPipelineMixin]] = {}


def check_pretrained_folder(path: str | Path | None, argument: str = ARGUMENT, what: str = "pipeline folder") -> Path:
    """Return ``path`` as a ``Path`` when it is an existing local folder.

    Args:
        path: the folder.
        argument: the caller's name for it, used in the error (``"model"``, ``"options.pipeline"``).
        what: what the folder should hold, used in the error.

    Raises:
        FileNotFoundError: ``path`` is None, missing or not a folder (genpath never downloads).

    Example:
        >>> check_pretrained_folder("no/such/folder", "model", "folder")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model: expected a local folder, got no/such/folder (missing; genpath never downloads)
    """
    if path is None:
        raise FileNotFoundError(f"{argument}: expected a local {what}, got None")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{argument}: expected a local {what}, got {folder} (missing; genpath never downloads)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{argument}: expected a local {what}, got {folder} (a file, not a folder)")
    return folder


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Switch diffusers' loading progress bars off inside the block (restored afterwards)."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.is_progress_bar_enabled()
    if not enabled:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            diffusers_logging.enable_progress_bar()


#: Where a model_index.json component may come from: diffusers itself or genpath's own modules.
#: Anything else (a module file inside the folder, any other installed package) is refused before
#: diffusers imports it, so loading a folder never imports or runs code the folder chose.
TRUSTED_LIBRARIES = ("diffusers",)
TRUSTED_LIBRARY_PREFIXES = ("genpath.",)


def _check_libraries(index: Path, spec: dict[str, Any], published: dict[str, tuple[str, ...]] | None = None) -> None:
    """Refuse components whose library is not diffusers or genpath (no custom code from a folder).

    ``published`` maps a component to the class names genpath rebuilds itself for it (a published
    layout such as PixCell's); such a component passes whatever library it names, which is never imported.
    """
    if spec.get("_custom_pipeline") or spec.get("custom_pipeline"):
        raise ValueError(f"{ARGUMENT}: expected no custom pipeline code in {index}, got one "
                         "(genpath never runs code from a model folder)")
    for key, value in spec.items():
        if key.startswith("_") or not isinstance(value, list) or not value or value[0] is None:
            continue
        library = value[0]
        if published and len(value) == 2 and value[1] in published.get(key, ()):
            continue  # rebuilt by genpath from config + safetensors; the library is not imported
        if not isinstance(library, str) or not (library in TRUSTED_LIBRARIES
                                                or library.startswith(TRUSTED_LIBRARY_PREFIXES)):
            raise ValueError(f"{ARGUMENT}: expected components from diffusers or genpath in {index}, got "
                             f"{key} from {library!r} (genpath never imports code a model folder names)")


def read_model_index(folder: str | Path, argument: str = ARGUMENT, what: str = "pipeline") -> dict[str, Any]:
    """Parse ``folder/model_index.json`` into a dict (structure only; nothing is imported).

    Raises:
        FileNotFoundError: no ``model_index.json``.
        ValueError: not a JSON object.
    """
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{argument}: expected a {what} folder with model_index.json, got {folder}")
    try:
        spec = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{argument}: expected JSON in {index}, got a parse error ({error})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{argument}: expected a JSON object in {index}, got {type(spec).__name__}")
    return spec


def pipeline_class_name(folder: str | Path) -> str | None:
    """Return the ``_class_name`` a folder's ``model_index.json`` records (None without a readable one).

    Example:
        >>> pipeline_class_name("no/such/folder") is None
        True
    """
    try:
        name = read_model_index(folder).get("_class_name")
    except (FileNotFoundError, ValueError):
        return None
    return name if isinstance(name, str) else None


def _pipeline_class(name: str | None) -> type[GenpathPipelineMixin] | None:
    """Return the genpath pipeline class called ``name`` (importing genpath's pipeline modules on demand)."""
    if name not in _PIPELINES and isinstance(name, str):
        import genpath.pipelines as package

        if name in package.__all__:
            getattr(package, name)  # importing the module registers the class
    return _PIPELINES.get(name) if isinstance(name, str) else None


class GenpathPipelineMixin:
    """``from_pretrained`` through one checked path, and a ``check_components`` hook.

    Put it first among the bases: ``class MyPipeline(GenpathPipelineMixin, DiffusionPipeline)``.
    Subclasses are registered by name, so a folder's ``model_index.json`` can pick the class.
    ``published_components`` (component → class names) lists the foreign component classes of a
    published layout that the subclass rebuilds itself (see the module doc).
    """

    published_components: dict[str, tuple[str, ...]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _PIPELINES[cls.__name__] = cls

    def check_components(self) -> None:
        """Raise a one-line ``ValueError`` naming the component that does not fit (default: no checks)."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        dtype: torch.dtype = torch.float32,
        disable_progress_bar: bool = True,
        **kwargs: Any,
    ) -> Self:
        """Load a saved pipeline folder (see the module doc for every check).

        Args:
            pretrained_model_name_or_path: a local ``save_pretrained`` folder (never a Hub id).
            dtype: dtype of the loaded weights (float32 by default; shipped weights are fp16).
            disable_progress_bar: no progress bars while loading nor while sampling.
            **kwargs: passed to ``DiffusionPipeline.from_pretrained`` (e.g. a replacement
                ``scheduler=``); ``local_files_only`` is always True.

        Returns:
            The pipeline, of the class recorded in the folder (``cls`` or a subclass).

        Raises:
            FileNotFoundError: the folder is missing, or holds no pipeline.
            ValueError: the folder holds another pipeline class, lacks a component, or its
                components do not fit together.
        """
        folder = check_pretrained_folder(pretrained_model_name_or_path, ARGUMENT, f"{cls.__name__} folder")
        kwargs.pop("local_files_only", None)
        if "torch_dtype" in kwargs:  # diffusers' old name: accepted, with the same notice diffusers gives
            warnings.warn("torch_dtype= is deprecated; pass dtype= instead", FutureWarning, stacklevel=2)
            dtype = kwargs.pop("torch_dtype")
        with _progress_bars(not disable_progress_bar):
            pipe = cls._load_folder(folder, dtype=dtype, disable_progress_bar=disable_progress_bar, **kwargs)
        pipe.check_components()
        if disable_progress_bar:
            pipe.set_progress_bar_config(disable=True)
        logger.debug("loaded %s from %s (%s)", type(pipe).__name__, folder, dtype)
        return pipe

    @classmethod
    def _load_folder(cls, folder: Path, dtype: torch.dtype, disable_progress_bar: bool = True,
                     **kwargs: Any) -> GenpathPipelineMixin:
        """Load a ``save_pretrained`` folder (``model_index.json`` + one subfolder per component)."""
        spec, target = cls._index_and_class(folder)
        _check_libraries(folder / "model_index.json", spec)  # diffusers imports what the index names: no exceptions
        target._check_index(folder, spec, provided=set(kwargs))
        parent = super(GenpathPipelineMixin, target)
        # weights from safetensors only: never torch.load of a pickle from an untrusted folder
        try:
            return parent.from_pretrained(str(folder), dtype=dtype, local_files_only=True, use_safetensors=True,
                                          **kwargs)
        except OSError as error:  # diffusers' "no safetensors / missing file" errors are EnvironmentErrors
            raise ValueError(f"{ARGUMENT}: expected every component's weights as safetensors in {folder}, got "
                             f"{str(error).splitlines()[0][:200]}") from None

    @classmethod
    def _index_and_class(cls, folder: Path) -> tuple[dict[str, Any], type[GenpathPipelineMixin]]:
        """Read ``model_index.json``, pick the genpath class it names (``cls`` or a subclass), check its libraries."""
        spec = read_model_index(folder, ARGUMENT, cls.__name__)
        name = spec.get("_class_name")
        target = _pipeline_class(name)
        if target is None:
            _check_libraries(folder / "model_index.json", spec)  # a foreign folder: name what it would import
        if target is None or not issubclass(target, cls):
            raise ValueError(f"{ARGUMENT}: expected a checkpoint of {cls.__name__} (or a subclass), "
                             f"got _class_name {name!r} in {folder}")
        _check_libraries(folder / "model_index.json", spec, target.published_components)
        return spec, target

    @classmethod
    def _check_index(cls, folder: Path, spec: dict[str, Any], provided: set[str]) -> None:
        """Every component ``__init__`` needs is listed in ``model_index.json`` and has its subfolder."""
        expected, _ = cls._get_signature_keys(cls)  # diffusers: required __init__ parameters
        listed = {k for k, v in spec.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
        root = folder.resolve()
        outside = [k for k in listed if (folder / k).exists() and not (folder / k).resolve().is_relative_to(root)]
        if outside:
            raise ValueError(f"{ARGUMENT}: expected every component inside {folder}, got {outside} linking outside it "
                             "(a model folder may only name its own files)")
        missing = [k for k in expected if k not in listed and k not in provided]
        missing += [k for k in expected if k in listed and k not in provided and not (folder / k).is_dir()]
        if missing:
            raise ValueError(f"{ARGUMENT}: expected components {list(expected)} in {folder}, "
                             f"got {sorted(set(missing))} missing")
