"""Distribution metrics on embeddings: Fréchet distance (FID in Inception space) and KID.

1. Embed both image sets with any registered encoder (:func:`embed_images`).
2. :func:`frechet_distance` fits a Gaussian to each set; :func:`kernel_inception_distance` is
   the unbiased MMD² with the cubic polynomial kernel, averaged over random subsets.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def embed_images(encoder: torch.nn.Module, images: Iterable[torch.Tensor] | torch.Tensor, batch_size: int = 64):
    """Embed images (a tensor ``(N,3,H,W)`` or an iterable of batches) → numpy ``(N,D)`` float64."""
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    feats = []
    with torch.no_grad():
        for batch in batches:
            feats.append(encoder(batch).double().cpu().numpy())
    return np.concatenate(feats, axis=0)


def _check(feats: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < min_rows:
        raise ValueError(f"{name}: expected an (N,D) array with N >= {min_rows}, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: expected finite features, got NaN or inf")
    return feats


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N,D)``, ``(M,D)``.

    Example:
        >>> rng = np.random.default_rng(0); a = rng.normal(size=(500, 4))
        >>> round(frechet_distance(a, a + 1.0), 1)
        4.0
    """
    from scipy import linalg

    real, fake = _check(real, "real", 2), _check(fake, "fake", 2)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"fake: expected {real.shape[1]} feature dimensions, got {fake.shape[1]}")
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: unbiased MMD² with kernel ``(x·y/D + 1)³`` over random subsets; returns (mean, std)."""
    real, fake = _check(real, "real", 2), _check(fake, "fake", 2)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"fake: expected {real.shape[1]} feature dimensions, got {fake.shape[1]}")
    rng = np.random.default_rng(seed)
    m = min(subset_size, real.shape[0], fake.shape[0])
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(mmd - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
