"""Streaming pyramid writers: pyramidal BigTIFF (OpenSlide-readable) and OME-Zarr (NGFF 0.4).

Both consume level 0 as horizontal *strips* (one row of tiles, ``(h, W, 3)`` uint8, top to
bottom) so that memory scales with slide width × tile size, never with slide area. Coarser
levels are built on the fly by a :class:`PyramidCascade` (2×2 box averaging per level).

* :class:`TiffPyramidWriter` writes level 0 straight into the TIFF while the cascade stores
  levels ≥ 1 in a temporary on-disk Zarr; those follow level 0 as reduced-resolution pages in
  the main IFD chain (OpenSlide reads every level), with resolution tags (mpp) and optionally
  an Aperio-style description so that QuPath shows the magnification. The file is written
  under a temporary name and renamed when complete.
* :class:`OmeZarrWriter` writes NGFF 0.4 multiscales (zarr format 2, ``omero`` block),
  chunk = tile, and records finished tiles in an append-only log so an interrupted slide
  resumes tile by tile.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

StripSink = Callable[[int, int, np.ndarray], None]  # (level, y, strip)


def pyramid_shapes(width: int, height: int, tile: int, min_size: int | None = None) -> list[tuple[int, int]]:
    """``(width, height)`` of each level: halve until the level fits in one tile (or ``min_size``)."""
    limit = tile if min_size is None else min_size
    shapes = [(width, height)]
    while max(shapes[-1]) > limit:
        w, h = shapes[-1]
        shapes.append(((w + 1) // 2, (h + 1) // 2))
    return shapes


def downsample_2x(strip: np.ndarray) -> np.ndarray:
    """2×2 box average of a uint8 ``(h,w,3)`` array (odd edges replicate the last row/column)."""
    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        strip = np.pad(strip, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = strip.astype(np.uint16)
    total = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


class PyramidCascade:
    """Turn level-0 strips into strips of every coarser level, holding one strip per level.

    Args:
        shapes: ``(width, height)`` per level, from :func:`pyramid_shapes`.
        tile: strip height of every level.
        sink: called as ``sink(level, y, strip)`` for every finished strip of level ≥ 1.
    """

    def __init__(self, shapes: list[tuple[int, int]], tile: int, sink: StripSink) -> None:
        self.shapes, self.tile, self.sink = shapes, tile, sink
        self._buffers: list[list[np.ndarray]] = [[] for _ in shapes]
        self._filled = [0] * len(shapes)
        self._emitted = [0] * len(shapes)

    def push(self, strip: np.ndarray, level: int = 0) -> None:
        """Feed the next strip of ``level`` (rows in order, full width)."""
        if level + 1 >= len(self.shapes):
            return
        small = downsample_2x(strip)
        nxt = level + 1
        w, h = self.shapes[nxt]
        small = small[: h - self._filled[nxt], :w]
        self._buffers[nxt].append(small)
        self._filled[nxt] += small.shape[0]
        self._flush(nxt, final=self._filled[nxt] >= h)

    def _flush(self, level: int, final: bool) -> None:
        pending = sum(b.shape[0] for b in self._buffers[level])
        while pending >= self.tile or (final and pending > 0):
            rows = np.concatenate(self._buffers[level], axis=0)
            out, rest = rows[: self.tile], rows[self.tile :]
            self._buffers[level] = [rest] if rest.shape[0] else []
            pending = rest.shape[0]
            self.sink(level, self._emitted[level], out)
            self._emitted[level] += out.shape[0]
            self.push(out, level)


def strip_tiles(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Split a strip into tiles, left to right, padded to ``tile×tile`` with white."""
    h, w = strip.shape[:2]
    for x in range(0, w, tile):
        piece = strip[:, x : x + tile]
        if piece.shape[0] != tile or piece.shape[1] != tile:
            padded = np.full((tile, tile, 3), 255, np.uint8)
            padded[: piece.shape[0], : piece.shape[1]] = piece
            piece = padded
        yield piece


def aperio_description(width: int, height: int, tile: int, mpp: float | None, magnification: float | None) -> str:
    """Build an Aperio-style ImageDescription (OpenSlide's aperio driver and QuPath read MPP and AppMag)."""
    fields = ["genpath"]
    if magnification:
        fields.append(f"AppMag = {magnification:g}")
    if mpp:
        fields.append(f"MPP = {mpp:.6g}")
    return f"Aperio Image Library genpath\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) |" + "|".join(
        fields[1:]
    )


class TiffPyramidWriter:
    """Write a pyramidal, tiled BigTIFF from level-0 strips.

    Args:
        path: final output path; written as ``.<name>.partial`` and renamed when complete.
        width, height: level-0 size.
        tile: tile size (multiple of 16).
        mpp: microns per pixel at level 0 (resolution tags; None writes none).
        compression: ``"jpeg"`` (lossy, ``quality``) or ``"zlib"`` (lossless).
        aperio: write an Aperio-style description (MPP, AppMag) so QuPath shows magnification.
        magnification: objective power recorded with ``aperio``; derived from mpp when None.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        tile: int = 512,
        mpp: float | None = None,
        compression: str = "jpeg",
        quality: int = 90,
        aperio: bool = True,
        magnification: float | None = None,
    ) -> None:
        if tile % 16:
            raise ValueError(f"tile: expected a multiple of 16 (TIFF tiles), got {tile}")
        if compression not in ("jpeg", "zlib"):
            raise ValueError(f"compression: expected 'jpeg' or 'zlib', got {compression!r}")
        self.path, self.width, self.height, self.tile = Path(path), int(width), int(height), int(tile)
        self.mpp, self.compression, self.quality, self.aperio = mpp, compression, int(quality), aperio
        self.magnification = magnification or (round(10.0 / mpp) if mpp else None)
        self.shapes = pyramid_shapes(self.width, self.height, self.tile)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self._levels_dir = self.path.with_name(f".{self.path.name}.levels.zarr")

    def _write_options(self, level: int) -> dict:
        w, h = self.shapes[level]
        factor = self.width / w
        options: dict = {
            "shape": (h, w, 3), "dtype": np.uint8, "tile": (self.tile, self.tile), "photometric": "rgb",
            "subfiletype": 0 if level == 0 else 1, "metadata": None,
        }
        if self.compression == "jpeg":
            options.update(compression="jpeg", compressionargs={"level": self.quality})
        else:
            options.update(compression="zlib", predictor=True)
        if self.mpp:
            options.update(resolution=(1e4 / (self.mpp * factor),) * 2, resolutionunit="CENTIMETER")
        if level == 0 and self.aperio:
            options["description"] = aperio_description(
                self.width, self.height, self.tile, self.mpp, self.magnification
            )
        return options

    def write(self, strips: Iterable[np.ndarray]) -> Path:
        """Consume level-0 strips (top to bottom) and write the whole pyramid; returns the final path."""
        import tifffile
        import zarr

        shutil.rmtree(self._levels_dir, ignore_errors=True)
        store = zarr.open_group(str(self._levels_dir), mode="w", zarr_format=2)
        arrays = {
            k: store.create_array(str(k), shape=(h, w, 3), chunks=(self.tile, self.tile, 3), dtype="uint8")
            for k, (w, h) in enumerate(self.shapes) if k > 0
        }

        def sink(level: int, y: int, strip: np.ndarray) -> None:
            arrays[level][y : y + strip.shape[0]] = strip

        cascade = PyramidCascade(self.shapes, self.tile, sink)
        rows = {"seen": 0}

        def level0_tiles() -> Iterator[np.ndarray]:
            for strip in strips:
                if strip.shape[1] != self.width or strip.dtype != np.uint8:
                    raise ValueError(
                        f"strips: expected uint8 strips {self.width} wide, got {strip.shape} {strip.dtype}"
                    )
                rows["seen"] += strip.shape[0]
                cascade.push(strip)
                yield from strip_tiles(strip, self.tile)

        try:
            with tifffile.TiffWriter(self.partial, bigtiff=True) as tw:
                tw.write(level0_tiles(), **self._write_options(0))
                if rows["seen"] != self.height:
                    raise ValueError(f"strips: expected {self.height} rows in all, got {rows['seen']}")
                for k in range(1, len(self.shapes)):
                    tw.write(self._zarr_tiles(arrays[k]), **self._write_options(k))
            os.replace(self.partial, self.path)
        finally:
            self.partial.unlink(missing_ok=True)
            shutil.rmtree(self._levels_dir, ignore_errors=True)
        return self.path

    def _zarr_tiles(self, array) -> Iterator[np.ndarray]:  # noqa: ANN001 - a zarr array
        for y in range(0, array.shape[0], self.tile):
            yield from strip_tiles(np.asarray(array[y : y + self.tile]), self.tile)


class OmeZarrWriter:
    """Write an OME-Zarr (NGFF 0.4) image pyramid, chunk = tile, resumable tile by tile.

    The image lives under ``path`` (a ``.ome.zarr`` folder); arrays ``0``, ``1``, ... are
    ``(c, y, x)`` uint8 with chunks ``(3, tile, tile)``. While level 0 is being written, finished
    tiles are appended to ``path/.genpath_done``; :meth:`done_tiles` reads it back so a rerun
    skips them. :meth:`finish` builds the coarser levels from level 0, writes the ``multiscales``
    and ``omero`` metadata, and removes the log: a store without the log and with metadata is
    complete.

    Args:
        path: output folder.
        width, height: level-0 size.
        tile: chunk size.
        mpp: microns per pixel at level 0 (``coordinateTransformations`` scale), or None.
        name: image name in the metadata.
    """

    def __init__(
        self, path: str | Path, width: int, height: int, tile: int = 512, mpp: float | None = None, name: str = ""
    ) -> None:
        self.path, self.width, self.height, self.tile = Path(path), int(width), int(height), int(tile)
        self.mpp, self.name = mpp, name or Path(path).name
        self.shapes = pyramid_shapes(self.width, self.height, self.tile)
        self.log = self.path / ".genpath_done"
        self._group = None

    def open(self, resume: bool, key: str = "") -> set[tuple[int, int]]:
        """Create the store (or reopen it when ``resume`` and compatible); returns finished tiles.

        Args:
            resume: keep the tiles of an interrupted run if the store matches.
            key: identifies the run's settings (e.g. a config hash); a partial store written
                under another key is rebuilt rather than mixed.
        """
        import zarr

        done = self.done_tiles() if resume else set()
        key_file = self.path / ".genpath_key"
        compatible = False
        if resume and self.log.exists() and key_file.exists() and key_file.read_text() == key:
            try:
                group = zarr.open_group(str(self.path), mode="r+", zarr_format=2)
                compatible = tuple(group["0"].shape) == (3, self.height, self.width) and tuple(
                    group["0"].chunks
                ) == (3, self.tile, self.tile)
            except Exception:  # noqa: BLE001 - an unreadable partial store is rebuilt
                compatible = False
        if not compatible:
            done = set()
            shutil.rmtree(self.path, ignore_errors=True)
            group = zarr.open_group(str(self.path), mode="w", zarr_format=2)
            group.create_array("0", shape=(3, self.height, self.width), chunks=(3, self.tile, self.tile),
                               dtype="uint8", fill_value=255)
            self.log.write_text("")
            key_file.write_text(key)
        self._group = group
        return done

    def done_tiles(self) -> set[tuple[int, int]]:
        """Tiles ``(row, col)`` recorded as finished (a torn last line is ignored)."""
        if not self.log.exists():
            return set()
        done = set()
        for line in self.log.read_text().splitlines():
            parts = line.split(",")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                done.add((int(parts[0]), int(parts[1])))
        return done

    def write_strip(self, row: int, strip: np.ndarray, skip: set[tuple[int, int]] = frozenset()) -> None:  # type: ignore[assignment]
        """Write tile row ``row`` chunk by chunk, logging each finished tile."""
        if self._group is None:
            raise RuntimeError("OmeZarrWriter: call .open() before writing strips")
        array = self._group["0"]
        y = row * self.tile
        with open(self.log, "a") as log:
            for col, x in enumerate(range(0, self.width, self.tile)):
                if (row, col) in skip:
                    continue
                piece = strip[:, x : x + self.tile]
                array[:, y : y + piece.shape[0], x : x + piece.shape[1]] = np.moveaxis(piece, -1, 0)
                log.write(f"{row},{col}\n")
            log.flush()

    def finish(self) -> Path:
        """Build coarser levels from level 0, write NGFF metadata, drop the resume log."""
        if self._group is None:
            raise RuntimeError("OmeZarrWriter: call .open() before .finish()")
        group = self._group
        for k, (w, h) in enumerate(self.shapes):
            if k and str(k) in group:
                del group[str(k)]
            if k:
                group.create_array(str(k), shape=(3, h, w), chunks=(3, self.tile, self.tile), dtype="uint8",
                                   fill_value=255)

        def sink(level: int, y: int, strip: np.ndarray) -> None:
            group[str(level)][:, y : y + strip.shape[0], :] = np.moveaxis(strip, -1, 0)

        cascade = PyramidCascade(self.shapes, self.tile, sink)
        base = group["0"]
        for y in range(0, self.height, self.tile):
            cascade.push(np.moveaxis(np.asarray(base[:, y : y + self.tile, :]), 0, -1))
        group.attrs.update(self._metadata())
        self.log.unlink(missing_ok=True)
        (self.path / ".genpath_key").unlink(missing_ok=True)
        return self.path

    def _metadata(self) -> dict:
        scale0 = self.mpp or 1.0
        datasets = []
        for k, (w, _) in enumerate(self.shapes):
            factor = self.width / w
            datasets.append({
                "path": str(k),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, scale0 * factor, scale0 * factor]}],
            })
        axes = [{"name": "c", "type": "channel"},
                {"name": "y", "type": "space", **({"unit": "micrometer"} if self.mpp else {})},
                {"name": "x", "type": "space", **({"unit": "micrometer"} if self.mpp else {})}]
        channels = [
            {"label": label, "color": color, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
            for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
        ]
        return {
            "multiscales": [{"version": "0.4", "name": self.name, "axes": axes, "datasets": datasets,
                             "type": "box (2x2 mean)"}],
            "omero": {"name": self.name, "version": "0.4", "channels": channels,
                      "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0}},
            "genpath": json.loads(json.dumps({"mpp": self.mpp})),
        }


def is_complete_ome_zarr(path: str | Path) -> bool:
    """Tell whether ``path`` is a finished OME-Zarr written by :class:`OmeZarrWriter`."""
    path = Path(path)
    if not (path / ".zattrs").is_file() or (path / ".genpath_done").exists():
        return False
    try:
        return "multiscales" in json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
        return False
