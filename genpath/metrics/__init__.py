"""Image and distribution metrics (SSIM, PSNR, LPIPS; Fréchet distance, KID)."""

from genpath.metrics.distribution import embed_images, frechet_distance, kernel_inception_distance
from genpath.metrics.image import MetricUnavailableError, lpips_available, lpips_distance, psnr, ssim

__all__ = [
    "MetricUnavailableError", "embed_images", "frechet_distance", "kernel_inception_distance",
    "lpips_available", "lpips_distance", "psnr", "ssim",
]
