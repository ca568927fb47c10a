"""What a batch report shows of a normalizer: its fitted stain state as colour swatches.

* :func:`stain_state`: a JSON-able summary of a normalizer's *target* state (its buffers) or of
  *source* statistics (one slide's, from :meth:`StainNormalizer.estimate_source`): stain
  vectors and concentration percentiles (Macenko, Vahadane) or LAB means and stds (Reinhard).
* :func:`state_swatches`: that summary as :class:`genpath.report.Swatch` squares: an OD stain
  vector ``v`` is drawn as the RGB colour ``exp(-v)`` (the stain at unit concentration), its
  percentile concentration ``c`` as ``exp(-c·v)`` (how dark the stain gets in that tissue), a
  LAB mean as its RGB colour.
* :func:`tile_statistics`: per-tile summaries, tissue masks and tissue fractions of a batch
  (tile mode), estimated the way the normalizer estimates them.
* :class:`RecordingSlideFitter`: wraps a normalizer for the slide engine and keeps the source
  statistics it fitted on the slide.
* :func:`tile_report` / :func:`report_tiles`: the ``report.html`` of ``genpath normalize tiles``.

Example:
    >>> from normalization import MacenkoNormalizer
    >>> from genpath.io.images import read_image
    >>> norm = MacenkoNormalizer().fit(read_image("samples/images/he_tiatoolbox_target.png")[:, :256, :256])
    >>> [s.label for s in state_swatches(stain_state(norm))]
    ['H', 'H p99', 'E', 'E p99']
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from genpath import __version__
from genpath.image_tensor import to_float_batch
from genpath.report.html import ReportHeader, Swatch
from genpath.report.tiles import TILE_VALUE_COLUMNS, TileBatchReport, run_settings_hash
from normalization.base import SlideMap, StainNormalizer
from normalization.functional import rgb_to_od

__all__ = ["RecordingSlideFitter", "report_tiles", "stain_state", "state_swatches", "tile_report",
           "tile_statistics"]
STAIN_NAMES = ("H", "E")


def _floats(tensor: torch.Tensor) -> list:
    return [round(float(x), 4) if math.isfinite(float(x)) else None for x in tensor.detach().cpu().flatten()]


def stain_state(normalizer: Any, stats: dict[str, torch.Tensor] | None = None) -> dict[str, Any] | None:
    """Summarise source ``stats`` (or, when None, the normalizer's fitted target) as plain lists.

    Returns:
        ``{"stains": [[r,g,b] per stain], "max_concentrations": [...], "percentile": p}`` for
        stain-matrix methods, ``{"lab_mean": [...], "lab_std": [...]}`` for Reinhard, or None
        when the method has no such state (a neural normalizer).
    """
    if stats is None:
        if hasattr(normalizer, "target_stains"):
            stats = {"stains": normalizer.target_stains, "max_concentrations": normalizer.target_max_concentrations}
        elif hasattr(normalizer, "target_mean"):
            stats = {"mean": normalizer.target_mean, "std": normalizer.target_std}
        else:
            return None
    if "stains" in stats:
        stains = stats["stains"].detach().cpu().float().reshape(3, -1)
        return {"stains": [_floats(stains[:, i]) for i in range(stains.shape[1])],
                "max_concentrations": _floats(stats["max_concentrations"]),
                "percentile": float(getattr(normalizer, "percentile", 99.0))}
    if "mean" in stats:
        return {"lab_mean": _floats(stats["mean"]), "lab_std": _floats(stats["std"])}
    return None


def _od_colour(od: list[float]) -> tuple[int, int, int]:
    return tuple(round(255 * math.exp(-max(0.0, v or 0.0))) for v in od)  # type: ignore[return-value]


def state_swatches(state: dict[str, Any] | None, prefix: str = "") -> list[Swatch]:
    """Colour swatches of a :func:`stain_state` summary (none for None)."""
    if not state:
        return []
    swatches = []
    if "stains" in state:
        p = state.get("percentile", 99.0)
        pct = f"p{p:g}"
        for i, vector in enumerate(state["stains"]):
            name = STAIN_NAMES[i] if i < len(STAIN_NAMES) else f"S{i}"
            conc = (state.get("max_concentrations") or [None] * (i + 1))[i]
            od = ", ".join(f"{v:.3f}" for v in vector if v is not None)
            swatches.append(Swatch(f"{prefix}{name}", _od_colour(vector), f"{prefix}{name} OD vector ({od})"))
            if conc is not None:
                swatches.append(Swatch(f"{prefix}{name} {pct}", _od_colour([conc * (v or 0.0) for v in vector]),
                                       f"{prefix}{name} {pct} concentration {conc:.3f}"))
    elif "lab_mean" in state:
        from normalization.functional import lab_to_rgb

        mean = torch.tensor([v or 0.0 for v in state["lab_mean"]]).reshape(1, 3, 1, 1)
        rgb = (lab_to_rgb(mean, clip=True).flatten() * 255).tolist()
        stats = ", ".join(f"{m:.1f}±{s:.1f}" for m, s in zip(state["lab_mean"], state["lab_std"], strict=False)
                          if m is not None and s is not None)
        swatches.append(Swatch(f"{prefix}LAB", tuple(rgb), f"{prefix}LAB mean±std {stats}"))  # type: ignore[arg-type]
    return swatches


def tile_statistics(normalizer: Any, images: torch.Tensor) -> list[dict[str, Any]]:
    """Per tile of ``images`` ``(B,3,H,W)``: ``{"state", "tissue", "mask"}`` as the normalizer sees it.

    ``mask`` is the normalizer's tissue mask ``(H,W)`` bool (OD thresholds), ``tissue`` its
    share of pixels, ``state`` the tile's own source statistics (:func:`stain_state`; None for
    methods without them or tiles where they cannot be estimated).
    """
    rgb, _ = to_float_batch(images, "images")
    if not isinstance(normalizer, StainNormalizer):
        return [{"state": None, "tissue": None, "mask": None} for _ in range(rgb.shape[0])]
    rgb = rgb.to(normalizer.fitted.device)
    with torch.no_grad():
        od = rgb_to_od(rgb, normalizer.io)
        masks = normalizer._tissue_mask(od.permute(0, 2, 3, 1))
        states: list[dict[str, Any] | None] = [None] * rgb.shape[0]
        if normalizer.uses_source_statistics:
            try:
                stats, valid = normalizer._estimate_source(normalizer.sample_tissue(rgb))
                for i in range(rgb.shape[0]):
                    if bool(valid[i]):
                        states[i] = stain_state(normalizer, {k: v[i] for k, v in stats.items()})
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    return [{"state": states[i], "tissue": round(100.0 * float(masks[i].float().mean()), 1), "mask": masks[i].cpu()}
            for i in range(rgb.shape[0])]


class RecordingSlideFitter:
    """A normalizer as the slide engine's processor, keeping the source statistics it fits on each slide.

    Behaves as the normalizer (``__call__``, ``fit_slide``, ``fits_slides``); after a slide,
    :attr:`state` holds the slide's :func:`stain_state` (None when no slide statistics were fitted:
    tiles were then normalized one by one, or the method has none).
    """

    def __init__(self, normalizer: Any) -> None:
        self.normalizer = normalizer
        self.state: dict[str, Any] | None = None

    @property
    def fits_slides(self) -> bool:
        return bool(getattr(self.normalizer, "fits_slides", True))

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return self.normalizer(windows)

    def fit_slide(self, images: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        fitted = self.normalizer.fit_slide(images, mask)
        source = fitted.stats if isinstance(fitted, SlideMap) else None
        if source is not None:
            self.state = stain_state(self.normalizer, source)
        return fitted

    def swatches(self) -> tuple[list[Swatch], list[Swatch]]:
        """``(slide swatches, target swatches)`` for the report."""
        return state_swatches(self.state), state_swatches(stain_state(self.normalizer), "target ")


def normalizer_hash(normalizer: Any) -> str:
    """16 hex digits over a normalizer's method, settings and (small) fitted buffers."""
    settings = json.dumps(getattr(normalizer, "config", {}), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{type(normalizer).__name__}:{settings}".encode())
    if isinstance(normalizer, StainNormalizer):
        for name, tensor in sorted(normalizer.named_buffers()):
            digest.update(name.encode() + tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def tile_report(out: str | Path, normalizer: Any, kept: Iterable[dict[str, Any]] = (),
                target: Sequence[str | Path] | None = None, title: str = "genpath normalize tiles",
                interval: float = 5.0) -> TileBatchReport:
    """Set up the report of a tile batch: method, target thumbnail and swatches, config hash and version in the header.

    The config hash is that of ``OUT/run.json``'s settings (what ``genpath normalize tiles``
    records), else of the normalizer's fitted state.
    """
    out = Path(out)
    method = getattr(normalizer, "method", "") or type(normalizer).__name__
    header = ReportHeader(title=f"{title}: {out.resolve().name}",
                          fields={"method": method, "target": ", ".join(map(str, target or [])) or "-",
                                  "config hash": run_settings_hash(out) or normalizer_hash(normalizer),
                                  "version": __version__},
                          swatches=state_swatches(stain_state(normalizer), "target "),
                          value_columns=TILE_VALUE_COLUMNS)
    report = TileBatchReport(out, header, kept, interval=interval)
    for path in list(target or [])[:4]:
        if Path(path).is_file():
            thumbnail = report.report.thumbnail(str(Path(path).resolve()), "target", Path(path))
            if thumbnail:
                header.images[f"target {Path(path).name}"] = thumbnail
    return report


def report_tiles(report: TileBatchReport, normalizer: Any, images: Sequence[torch.Tensor] | None,
                 outputs: torch.Tensor | None, records: list[dict[str, Any]], seconds: float | None = None) -> None:
    """Add one group of tiles to ``report``: before/after/mask thumbnails, the tile's own stain swatches.

    ``images`` are the inputs (same size), ``outputs`` the normalized batch (None when the group
    failed), ``records`` the manifest records of the group, in the same order; ``seconds`` per tile.
    Statistics are estimated only for the rows that get thumbnails (the first ``max_rows``).
    """
    stats: list[dict[str, Any]] = [{"state": None, "tissue": None, "mask": None}] * len(records)
    if outputs is not None and images is not None and len(images) == len(records) and report.wants_images:
        try:
            stats = tile_statistics(normalizer, torch.stack(list(images)))
        except Exception:  # noqa: BLE001 - statistics are a view; the tiles are already written
            pass
    for i, record in enumerate(records):
        image = images[i] if images is not None and i < len(images) else None
        after = outputs[i] if outputs is not None and record.get("status") != "failed" else None
        size = f"{image.shape[-1]}x{image.shape[-2]}" if image is not None else ""
        report.add(record, {"before": image, "after": after, "mask": stats[i]["mask"]},
                   state_swatches(stats[i]["state"]),
                   {"tissue": stats[i]["tissue"], "size": size,
                    "seconds": round(seconds, 4) if seconds is not None else None})
