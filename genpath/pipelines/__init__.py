"""Diffusers pipelines of genpath."""

from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline

__all__ = ["EmbeddingToImagePipeline"]
