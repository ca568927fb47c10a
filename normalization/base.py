"""Shared behaviour of the classical stain normalizers.

A normalizer is an ``nn.Module`` whose fitted target lives in buffers. Subclasses implement
two hooks, both fed a :class:`TissueSample` (a fixed strided subset of pixels with their OD and
tissue mask, so statistics never need full-resolution masks):

* ``_fit_target(sample)`` estimates and stores the target state from the pooled targets;
* ``_normalize(rgb, sample)`` maps a float ``(B,3,H,W)`` batch and returns ``(output, valid)``.

Everything else (input checks, dtype/rank round trip, the invalid-tile policy, persistence)
lives here so that every method behaves the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from genpath.image_tensor import check_image, to_float_batch
from genpath.utils.atomic import atomic_path
from genpath.utils.logging import get_logger
from normalization.functional import rgb_to_od, sample_pixels, tissue_mask_od
from normalization.fused import od_of_bytes
from normalization.registry import REGISTRY, available_methods, build_normalizer, load_plugins, register_normalizer

logger = get_logger(__name__)
InvalidPolicy = Literal["passthrough", "reference", "raise"]
INVALID_POLICIES = ("passthrough", "reference", "raise")


@dataclass
class TissueSample:
    """The strided estimation subset of a batch.

    Attributes:
        rgb: ``(B,N,3)`` float RGB of the sampled pixels.
        od: ``(B,N,3)`` their optical density.
        mask: ``(B,N)`` which of them are tissue.
        enough: ``(B,)`` whether each tile has enough tissue to be normalized.
    """

    rgb: torch.Tensor
    od: torch.Tensor
    mask: torch.Tensor
    enough: torch.Tensor


def _non_finite(state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """Find the first float tensor of ``state`` holding NaN or infinity: ``(name, "NaN")`` or ``(None, "")``."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name, "NaN" if bool(torch.isnan(tensor).any()) else "infinity"
    return None, ""


def _uint8_batch(images: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Check a uint8 image tensor and return it as a ``(B,3,H,W)`` view plus the rank restore."""
    images = check_image(images, "images")
    squeeze = images.ndim == 3
    return (images[None] if squeeze else images), (lambda out: out.squeeze(0) if squeeze else out)


class SlideMap:
    """A normalizer bound to one slide's source statistics: the tile function the slide engine streams.

    Calling it normalizes windows with the fixed statistics; :meth:`vips_map` gives the same
    per-pixel map as a libvips pipeline (:mod:`normalization.vips_maps`) when the method has one,
    which the engine then runs on the whole slide in C (:mod:`genpath.wsi.vips_slide`).
    """

    def __init__(self, normalizer: StainNormalizer, stats: dict[str, torch.Tensor]) -> None:
        self.normalizer, self.stats = normalizer, stats

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return self.normalizer(windows, source=self.stats)

    def vips_map(self, image: Any) -> Any | None:
        """``image`` (a 3-band uchar ``pyvips.Image``) through this slide's map, or None."""
        stats = {k: v.detach().float().cpu() for k, v in self.stats.items()}
        return self.normalizer._vips_map(image, stats)


class StainNormalizer(nn.Module):
    """Base class: fit a target once, then normalize any number of batches.

    Args:
        io: background intensity (0–255 scale) for optical density.
        beta: minimum OD for a pixel to count as tissue.
        od_max: maximum OD for tissue; darker pixels (black, pen, folds) are excluded.
        min_tissue_fraction: a tile needs at least this share of tissue pixels to be normalized.
        min_tissue_pixels: and at least this many tissue pixels.
        max_pixels: pixels per tile used to estimate statistics (a fixed strided subset).
        on_invalid: what to do with tiles whose statistics cannot be estimated (background,
            black, single colour, noise, too little tissue): ``"passthrough"`` returns them
            unchanged, ``"reference"`` normalizes them assuming the target's stains, ``"raise"``
            raises a ``ValueError`` naming them.
    """

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            REGISTRY[cls.method] = cls

    def __init__(
        self,
        io: float = 240.0,
        beta: float = 0.15,
        od_max: float = 3.0,
        min_tissue_fraction: float = 0.02,
        min_tissue_pixels: int = 64,
        max_pixels: int = 16384,
        on_invalid: InvalidPolicy = "passthrough",
    ) -> None:
        super().__init__()
        if on_invalid not in INVALID_POLICIES:
            raise ValueError(f"on_invalid: expected one of {INVALID_POLICIES}, got {on_invalid!r}")
        if not io > 1.0:
            raise ValueError(f"io: expected a background intensity > 1 (0-255 scale), got {io}")
        if not 0.0 <= min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction: expected a value in [0, 1], got {min_tissue_fraction}")
        if max_pixels < 16:
            raise ValueError(f"max_pixels: expected at least 16, got {max_pixels}")
        self.config: dict[str, Any] = {
            "io": float(io), "beta": float(beta), "od_max": float(od_max),
            "min_tissue_fraction": float(min_tissue_fraction),
            "min_tissue_pixels": int(min_tissue_pixels), "max_pixels": int(max_pixels),
            "on_invalid": on_invalid,
        }
        self.io, self.beta, self.od_max = float(io), float(beta), float(od_max)
        self.min_tissue_fraction, self.min_tissue_pixels = min_tissue_fraction, min_tissue_pixels
        self.max_pixels, self.on_invalid = max_pixels, on_invalid
        self.register_buffer("fitted", torch.tensor(False))

    # ----------------------------------------------------------------------------- hooks
    #: Whether the subclass implements ``on_invalid="reference"`` itself; if not, invalid tiles
    #: pass through under that policy too.
    supports_reference: ClassVar[bool] = False
    #: Whether the method can apply one set of slide-level source statistics to every tile
    #: (:meth:`estimate_source`); tile-wise (neural) methods blend overlapping windows instead.
    uses_source_statistics: ClassVar[bool] = True

    def _fit_target(self, sample: TissueSample) -> None:
        raise NotImplementedError

    def _normalize(self, rgb: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    #: Whether the subclass maps uint8 batches itself (:meth:`_normalize_uint8`,
    #: :meth:`_apply_source_uint8`, fused table kernels of :mod:`normalization.fused`) instead of
    #: through float; its output is then within one level of the float path's, rounded.
    fused_uint8: ClassVar[bool] = False

    def _normalize_uint8(self, images: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _apply_source_uint8(self, images: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _tissue_mask(self, od_pixels: torch.Tensor) -> torch.Tensor:
        return tissue_mask_od(od_pixels, self.beta, self.od_max, dim=-1)

    # ----------------------------------------------------------------------------- API
    def sample_tissue(self, rgb: torch.Tensor, user_mask: torch.Tensor | None = None) -> TissueSample:
        """Take the strided estimation subset of each tile and find its tissue pixels.

        Tissue counts for ``min_tissue_pixels`` and ``min_tissue_fraction`` are taken on this
        subset (at most ``max_pixels`` per tile), not on every pixel.

        Shape:
            rgb ``(B,3,H,W)`` float or uint8, user_mask ``(B,H,W)`` bool or None.
        """
        rgb_px = sample_pixels(rgb, self.max_pixels)
        if rgb_px.is_floating_point():
            od_px = rgb_to_od(rgb_px, self.io)
        else:  # uint8: the values of converting the whole batch first, OD by a byte table
            rgb_px, od_px = rgb_px.to(torch.float32) / 255.0, od_of_bytes(rgb_px, self.io)
        mask = self._tissue_mask(od_px)
        if user_mask is not None:
            mask = mask & (sample_pixels(user_mask[:, None].to(rgb_px), self.max_pixels)[..., 0] > 0.5)
        count, n = mask.sum(-1), mask.shape[-1]
        enough = (count >= min(self.min_tissue_pixels, n)) & (count >= self.min_tissue_fraction * n)
        return TissueSample(rgb_px, od_px, mask, enough)

    def _pool(
        self,
        images_in: torch.Tensor | Sequence[torch.Tensor],
        tissue_mask: torch.Tensor | Sequence[torch.Tensor] | None,
        name: str,
    ) -> TissueSample:
        """Pool the estimation subsets of one or several images into a single-row sample."""
        images = [images_in] if isinstance(images_in, torch.Tensor) else list(images_in)
        if not images:
            raise ValueError(f"{name}: expected at least one image, got an empty sequence")
        masks_in: list[torch.Tensor | None]
        if tissue_mask is None:
            masks_in = [None] * len(images)
        elif isinstance(tissue_mask, torch.Tensor):
            masks_in = [tissue_mask] if len(images) == 1 else list(tissue_mask.unbind(0))
        else:
            masks_in = list(tissue_mask)
        if len(masks_in) != len(images):
            raise ValueError(
                f"tissue_mask: expected one mask per image in {name} ({len(images)}), got {len(masks_in)}"
            )
        samples = []
        for i, (image, user_mask) in enumerate(zip(images, masks_in, strict=True)):
            rgb, _ = to_float_batch(image, f"{name}[{i}]")
            rgb = rgb.to(self.fitted.device)
            if user_mask is not None:
                user_mask = torch.as_tensor(user_mask, device=rgb.device).bool()
                if user_mask.shape[-2:] != rgb.shape[-2:]:
                    raise ValueError(
                        f"tissue_mask: expected spatial size {tuple(rgb.shape[-2:])}, got {tuple(user_mask.shape)}"
                    )
                user_mask = user_mask.expand(rgb.shape[0], *rgb.shape[-2:])
            samples.append(self.sample_tissue(rgb, user_mask))
        pooled = TissueSample(
            *(torch.cat([getattr(x, f).flatten(0, 1)[None] for x in samples], 1) for f in ("rgb", "od", "mask")),
            enough=torch.ones(1, dtype=torch.bool, device=self.fitted.device),
        )
        total = int(pooled.mask.sum())
        if total < self.min_tissue_pixels:
            raise ValueError(
                f"{name}: expected at least {self.min_tissue_pixels} tissue pixels "
                f"(OD in [{self.beta}, {self.od_max}]) among the sampled pixels, got {total}"
            )
        return pooled

    def fit(
        self,
        target_images: torch.Tensor | Sequence[torch.Tensor],
        tissue_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> Self:
        """Estimate the target stain state from one or several images.

        Tissue pixels of all targets are pooled into a single estimate.

        Args:
            target_images: ``(B,3,H,W)``, ``(3,H,W)`` or a list of such (sizes may differ).
            tissue_mask: optional boolean ``(B,H,W)``/``(H,W)`` (or list matching the images)
                restricting which pixels count; it is combined with the OD tissue mask.

        Returns:
            self, fitted.

        Raises:
            ValueError: the targets hold too little tissue to estimate stains.
        """
        self._fit_target(self._pool(target_images, tissue_mask, "target_images"))
        name, what = _non_finite(self.state_dict())
        if name is not None:
            raise ValueError(f"target_images: expected images whose stain state can be estimated, "
                             f"got {what} in the fitted {name}")
        self.fitted.fill_(True)
        return self

    def estimate_source(
        self,
        source_images: torch.Tensor | Sequence[torch.Tensor],
        tissue_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Estimate one set of *source* stain statistics from pooled images (e.g. a whole slide).

        Pass the result as ``forward(tiles, source=...)`` so every tile of a slide gets the same
        map: no seams between tiles, whatever each tile holds.

        Args:
            source_images: ``(B,3,H,W)``, ``(3,H,W)`` or a list of such.
            tissue_mask: optional boolean masks, as in :meth:`fit`.

        Returns:
            Method-specific tensors (e.g. ``stains`` ``(3,2)`` and ``max_concentrations`` ``(2,)``).

        Raises:
            ValueError: the images hold too little tissue, or stains cannot be estimated.
        """
        stats, valid = self._estimate_source(self._pool(source_images, tissue_mask, "source_images"))
        if not bool(valid.all()):
            raise ValueError(
                "source_images: expected H&E-stained tissue, got pixels whose stain statistics "
                "could not be estimated (single colour, noise or too little tissue)"
            )
        return {k: v[0] for k, v in stats.items()}

    @property
    def fits_slides(self) -> bool:
        """Whether the slide engine should read tissue windows for :meth:`fit_slide` (source statistics)."""
        return bool(self.uses_source_statistics)

    def fit_slide(
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Fit one map for a whole slide: the slide engine's hook (:class:`genpath.wsi.hooks.SlideFitter`).

        Args:
            images: tissue windows ``(B,3,h,w)`` sampled over the slide, or its low-resolution
                image ``(3,h,w)`` with ``mask``.
            mask: tissue mask of a ``(3,h,w)`` ``images``.

        Returns:
            ``forward`` bound to the slide's source statistics, or None when this method does
            not use source statistics or they cannot be estimated (then tiles are normalized
            one by one).
        """
        if not self.uses_source_statistics:
            return None
        try:
            stats = self.estimate_source(images, mask)
        except ValueError:
            return None
        return SlideMap(self, stats)

    def _vips_map(self, image: Any, stats: dict[str, torch.Tensor]) -> Any | None:
        """Return the map for fixed source ``stats`` as a libvips pipeline on ``image``, or None (none here)."""
        return None

    def _estimate_source(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not support fixed source statistics")

    def _apply_source(self, rgb: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not support fixed source statistics")

    def forward(
        self,
        images: torch.Tensor,
        *,
        source: dict[str, torch.Tensor] | None = None,
        return_valid: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalize a batch of images to the fitted target.

        Each tile is processed independently: its output does not depend on its batch companions.

        Args:
            images: uint8 or float RGB, ``(B,3,H,W)`` or ``(3,H,W)``; never modified.
            source: fixed source statistics from :meth:`estimate_source`; every tile then gets
                the same map (tiles are always valid). None estimates them per tile.
            return_valid: also return the per-tile validity mask.

        Returns:
            Normalized images in the input's dtype, rank and device; with ``return_valid``,
            a tuple ``(images, valid)`` where ``valid`` is ``(B,)`` bool (``()`` for one image).

        Raises:
            RuntimeError: called before :meth:`fit` or :meth:`load`.
            ValueError: ``on_invalid="raise"`` and some tile is invalid.
        """
        if not bool(self.fitted):
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call .fit(target_images) "
                f"or {type(self).__name__}.load(path) before normalizing"
            )
        fused = self.fused_uint8 and isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        rgb, restore = _uint8_batch(images) if fused else to_float_batch(images, "images")
        rgb = rgb.to(self.fitted.device)
        if source is not None:
            b = rgb.shape[0]
            dtype = torch.float32 if fused else rgb.dtype
            stats = {k: v.to(device=rgb.device, dtype=dtype)[None].expand(b, *v.shape) for k, v in source.items()}
            out = self._apply_source_uint8(rgb, stats) if fused else self._apply_source(rgb, stats)
            valid = torch.ones(b, dtype=torch.bool, device=rgb.device)
        elif fused:
            out, valid = self._normalize_uint8(rgb, self.sample_tissue(rgb))
        else:
            out, valid = self._normalize(rgb, self.sample_tissue(rgb))
        if not bool(valid.all()) and (self.on_invalid == "passthrough" or not self.supports_reference):
            out[~valid] = rgb[~valid]
        if self.on_invalid == "raise" and not bool(valid.all()):
            bad = torch.nonzero(~valid).flatten().tolist()
            raise ValueError(
                f"images: expected tiles with enough stained tissue, got invalid tiles at {bad} "
                "(background, black, single-colour or noise); use on_invalid='passthrough' to skip them"
            )
        out = restore(out.to(images.device))
        if not return_valid:
            return out
        valid = valid.to(images.device)
        return (out, valid.squeeze(0)) if images.ndim == 3 else (out, valid)

    # ----------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Save the fitted state and settings to a ``.safetensors`` file (written atomically)."""
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit() before .save()")
        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"genpath_normalizer": self.method, "config": json.dumps(self.config)}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> StainNormalizer:
        """Load a normalizer saved with :meth:`save`; ``overrides`` replace saved settings.

        Called on the base class, the method recorded in the file decides the subclass.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: expected a saved normalizer file, got {path} (missing)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a bad file
            raise ValueError(f"path: expected a genpath normalizer .safetensors file, got an unreadable file {path} "
                             f"({error})") from None
        method = meta.get("genpath_normalizer")
        if method not in REGISTRY and isinstance(method, str):
            load_plugins(method)
        if method not in REGISTRY:
            raise ValueError(
                f"path: expected a genpath normalizer file, got metadata method {method!r} in {path}"
            )
        target = REGISTRY[method]
        if cls is not StainNormalizer and not issubclass(target, cls):
            raise ValueError(f"path: expected a {cls.method} normalizer, got {method} in {path}")
        try:
            saved = json.loads(meta.get("config", "{}"))
            if not isinstance(saved, dict):
                raise TypeError(f"config is a {type(saved).__name__}")
            bad = [k for k, v in saved.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise ValueError(f"path: expected finite settings in {path}, got {bad[0]}={saved[bad[0]]}")
            module = target(**{**saved, **overrides})
            state = load_file(str(path))
        except (TypeError, RuntimeError, json.JSONDecodeError, SafetensorError) as error:
            raise ValueError(f"path: expected a valid {method} normalizer state in {path}, got {error}") from None
        name, what = _non_finite(state)
        if name is not None:
            raise ValueError(f"path: expected finite values in every tensor of {path}, got {what} in {name}")
        try:
            module.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"path: expected a valid {method} normalizer state in {path}, got {error}") from None
        return module


__all__ = ["StainNormalizer", "TissueSample", "available_methods", "build_normalizer", "register_normalizer"]
