"""genpath's diffusers pipelines, their output classes, and the modules built on them.

Every pipeline loads through one path (:class:`~genpath.pipelines.loading.GenpathPipelineMixin`:
``Pipeline.from_pretrained(folder)``, local only, float32, checked, quiet), takes
``generator=`` and ``return_dict=`` and returns its own ``BaseOutput`` dataclass.

Names are imported on first use (diffusers is a heavy import), so
``import genpath.pipelines`` is cheap.

Example:
    >>> from genpath.pipelines import EmbeddingToImagePipeline
    >>> EmbeddingToImagePipeline.__name__
    'EmbeddingToImagePipeline'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline, EmbeddingToImagePipelineOutput
    from genpath.pipelines.image_translation import (
        GeneratorTranslationPipeline,
        GeneratorTranslationPipelineOutput,
        ImageTranslationPipeline,
        LatentTranslationPipeline,
        LatentTranslationPipelineOutput,
    )
    from genpath.pipelines.large_image import LargeImagePipelineOutput, generate_large_image, seam_score
    from genpath.pipelines.loading import GenpathPipelineMixin, check_pretrained_folder
    from genpath.pipelines.mask_to_image import MaskToImagePipeline, MaskToImagePipelineOutput, export_controlnet
    from genpath.pipelines.pixcell import PixCellPipeline, PixCellPipelineOutput, pixcell_tokens
    from genpath.pipelines.pixcell_controlnet import PixCellControlNet, PixCellControlNetPipeline
    from genpath.pipelines.pixcell_large import generate_large_pixcell
    from genpath.pipelines.stain_transfer import StainTransferPipeline, StainTransferPipelineOutput
    from genpath.pipelines.stainfuser_normalizer import StainFuserNormalizer
    from genpath.pipelines.stainfuser_published import StainFuserPipeline, StainFuserPipelineOutput
    from genpath.pipelines.translator import Translator

_MODULES = {
    "embedding_to_image": ("EmbeddingToImagePipeline", "EmbeddingToImagePipelineOutput"),
    "image_translation": ("GeneratorTranslationPipeline", "GeneratorTranslationPipelineOutput",
                          "ImageTranslationPipeline", "LatentTranslationPipeline", "LatentTranslationPipelineOutput"),
    "large_image": ("LargeImagePipelineOutput", "generate_large_image", "seam_score"),
    "loading": ("GenpathPipelineMixin", "check_pretrained_folder"),
    "mask_to_image": ("MaskToImagePipeline", "MaskToImagePipelineOutput", "export_controlnet"),
    "pixcell": ("PixCellPipeline", "PixCellPipelineOutput", "pixcell_tokens"),
    "pixcell_controlnet": ("PixCellControlNet", "PixCellControlNetPipeline"),
    "pixcell_large": ("generate_large_pixcell",),
    "stain_transfer": ("StainTransferPipeline", "StainTransferPipelineOutput"),
    "stainfuser_normalizer": ("StainFuserNormalizer",),
    "stainfuser_published": ("StainFuserPipeline", "StainFuserPipelineOutput"),
    "translator": ("Translator",),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "EmbeddingToImagePipeline",
    "EmbeddingToImagePipelineOutput",
    "GeneratorTranslationPipeline",
    "GeneratorTranslationPipelineOutput",
    "GenpathPipelineMixin",
    "ImageTranslationPipeline",
    "LargeImagePipelineOutput",
    "LatentTranslationPipeline",
    "LatentTranslationPipelineOutput",
    "MaskToImagePipeline",
    "MaskToImagePipelineOutput",
    "PixCellControlNet",
    "PixCellControlNetPipeline",
    "PixCellPipeline",
    "PixCellPipelineOutput",
    "StainFuserNormalizer",
    "StainFuserPipeline",
    "StainFuserPipelineOutput",
    "StainTransferPipeline",
    "StainTransferPipelineOutput",
    "Translator",
    "check_pretrained_folder",
    "export_controlnet",
    "generate_large_image",
    "generate_large_pixcell",
    "pixcell_tokens",
    "seam_score",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'genpath.pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"genpath.pipelines.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
