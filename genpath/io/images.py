"""Image files in and out: PNG, JPEG and TIFF tiles as uint8 ``(3,H,W)`` tensors.

How :func:`read_image` turns every file into RGB uint8 (or refuses it, never guessing):

* 8-bit modes (bilevel, grey, palette, RGB, CMYK, YCbCr, HSV) convert as Pillow converts them;
  alpha (RGBA, LA, PA, palette transparency, premultiplied) is composited onto white.
* 16-bit samples (PNG, TIFF, PGM; grey or RGB) keep their high byte, ``v // 256``
  (32768 -> 128, 65535 -> 255): what Pillow itself does with 16-bit RGB.
* Wider integer samples (Pillow's 32-bit ``I``, uint32/int32 TIFFs) must hold 16-bit values
  (0..65535) and read as 16-bit; negative or larger values are refused.
* Float samples (Pillow's ``F``, float TIFFs) must be finite and in [0, 1]; they scale by 255
  (rounded). Anything else is refused, never clipped.
* TIFFs with more than 8 bits or non-unsigned samples, and TIFFs Pillow cannot decode, are read
  with tifffile (first page) under the same rules.
* Refused with a one-line ``ValueError`` naming the file: unreadable, truncated or corrupt files,
  CIELab images, and images over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (decompression bombs).
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from genpath.utils.atomic import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_ARRAY_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


class _Refused(ValueError):
    """A decodable file whose samples genpath will not guess at: ``(expected, got)``."""


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as an RGB uint8 ``(3,H,W)`` tensor (decoding rules: the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: one line naming ``path``: unreadable, truncated or corrupt, too many pixels,
            or samples outside the rules (float outside [0, 1], negative or wider than 16 bits).

    Example:
        >>> read_image("samples/tiles/crc/TUM-TCGA-DRHQMTQA.png").shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    path = Path(path)
    try:
        array = _decode(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image: expected an existing image file, got {path} (missing)") from None
    except _Refused as error:
        expected, got = error.args
        raise ValueError(f"image: expected {expected}, got {got} in {path}") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"image: expected at most {Image.MAX_IMAGE_PIXELS} pixels, got {path} "
                         f"({_first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - decoders raise many error types on corrupt data
        raise ValueError(f"image: expected a readable image file, got {path} "
                         f"({type(error).__name__}: {_first_line(error)})") from None
    return torch.from_numpy(np.array(array, dtype=np.uint8, order="C")).permute(2, 0, 1).contiguous()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no details"


def _check_pixels(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise _Refused(f"at most {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)",
                       f"{width}x{height} (a possible decompression bomb)")


def _decode(path: Path) -> np.ndarray:
    """``(H,W,3)`` uint8 of ``path``: Pillow, or tifffile for the TIFFs Pillow misreads or cannot read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _check_pixels refuses it below
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # metadata noise; pixels raise
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            if _is_tiff(path):
                return _decode_tiff(path)
            raise
    with image:
        _check_pixels(*image.size)
        if image.format == "TIFF" and _wide_tiff(image):
            return _decode_tiff(path)
        try:
            return _decode_pillow(image)
        except _Refused:
            raise
        except Exception:  # noqa: BLE001 - a TIFF Pillow cannot decode may still be one tifffile can
            if image.format == "TIFF":
                return _decode_tiff(path)
            raise


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) in TIFF_MAGIC


def _wide_tiff(image: Image.Image) -> bool:
    """Whether a TIFF has more than 8 bits or signed/float samples (Pillow drops bits or misplaces planes)."""
    tags = image.tag_v2  # type: ignore[attr-defined]
    bits, formats = tags.get(258, 1), tags.get(339, 1)
    bits = bits if isinstance(bits, tuple) else (bits,)
    formats = formats if isinstance(formats, tuple) else (formats,)
    return max(bits, default=1) > 8 or any(f != 1 for f in formats)


def _decode_pillow(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "LAB":
        raise _Refused("an RGB, grey, palette or CMYK image", "colour mode LAB (CIELab)")
    if mode in _ARRAY_MODES:
        return _samples_to_rgb(_to_uint8(np.asarray(image)))
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _on_white(image)
    return np.asarray(image.convert("RGB"))


def _on_white(image: Image.Image) -> np.ndarray:
    """Composite an image with straight alpha onto white."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert samples of any depth to uint8 under the rules of the module docstring."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise _Refused("finite float samples in [0, 1]", "NaN or infinity")
        lo, hi = float(array.min()), float(array.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise _Refused("float samples in [0, 1]", f"range [{lo:.4g}, {hi:.4g}]")
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise _Refused("integer or float samples", f"dtype {array.dtype}")
    lo, hi = int(array.min()), int(array.max())
    if array.dtype.itemsize == 1:
        if lo < 0:
            raise _Refused("8-bit unsigned samples (0..255)", f"range [{lo}, {hi}]")
        return array.astype(np.uint8)
    if lo < 0 or hi > 65535:
        raise _Refused("8- or 16-bit unsigned samples (0..65535)", f"range [{lo}, {hi}]")
    return (array.astype(np.uint32) >> 8).astype(np.uint8)


def _samples_to_rgb(samples: np.ndarray, alpha: str | None = None) -> np.ndarray:
    """uint8 ``(H,W)`` grey or ``(H,W,C)`` grey/RGB samples (+ a last alpha sample) as ``(H,W,3)`` on white.

    Args:
        samples: uint8 samples.
        alpha: None (no alpha sample), ``"straight"`` or ``"premultiplied"``.
    """
    if samples.ndim == 2:
        samples = samples[..., None]
    colour = samples[..., :-1] if alpha else samples
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    if alpha is None:
        return colour
    a = samples[..., -1:].astype(np.int32)
    if alpha == "premultiplied":  # c·a + white·(1 - a), with c·a stored
        return np.minimum(colour.astype(np.int32) + 255 - a, 255).astype(np.uint8)
    return _on_white(Image.fromarray(np.concatenate([colour, samples[..., -1:]], axis=-1)))  # (H,W,4) uint8: RGBA


def _decode_tiff(path: Path) -> np.ndarray:
    """Decode the first page of a TIFF with tifffile: grey or RGB, any sample depth, optional alpha."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages.first
        _check_pixels(int(page.imagewidth), int(page.imagelength))
        photometric, axes = int(page.photometric), page.axes
        extras = [int(e) for e in page.extrasamples]
        if not set(axes) <= {"Y", "X", "S"}:
            raise _Refused("a 2-D TIFF page (Y, X and samples)", f"axes {axes!r}")
        if photometric not in (0, 1, 2):  # MINISWHITE, MINISBLACK, RGB
            name = getattr(tifffile.PHOTOMETRIC(photometric), "name", str(photometric))
            raise _Refused("a grey or RGB TIFF", f"photometric {name}")
        array = page.asarray()
    if "S" in axes:
        array = np.moveaxis(array, axes.index("S"), -1)
    else:
        array = array[..., None]
    n_colour = 3 if photometric == 2 else 1
    alpha = {1: "premultiplied", 2: "straight"}.get(extras[0]) if extras else None
    if array.shape[-1] < n_colour or (n_colour == 1 and array.shape[-1] > (2 if alpha else 1)):
        raise _Refused("grey, grey + alpha, RGB or RGB + alpha samples",
                       f"{array.shape[-1]} samples per pixel (photometric {photometric})")
    array = array[..., : n_colour + (1 if alpha else 0)]
    samples = _to_uint8(array)
    if photometric == 0:  # MINISWHITE: 0 is white
        samples[..., :1] = 255 - samples[..., :1]
    return _samples_to_rgb(samples, alpha)


def write_image(image: torch.Tensor, path: str | Path, quality: int = 95) -> Path:
    """Write a uint8 or float ``(3,H,W)`` tensor atomically (temporary file, then rename)."""
    path = Path(path)
    if image.is_floating_point():
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"image: expected finite values to write {path}, got NaN or infinity")
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    kwargs = {"quality": quality} if path.suffix.lower() in {".jpg", ".jpeg"} else {}
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, **kwargs)  # the temporary name keeps the suffix: same format
    return path


def expand_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """Expand files, folders (recursively) and glob patterns into ``(file, relative name)`` pairs.

    Raises:
        FileNotFoundError: an input matches nothing.
    """
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            found.extend((p, p.relative_to(path)) for p in files)
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise FileNotFoundError(f"inputs: expected an image file, folder or glob, got {item!r} (no match)")
            found.extend((m, Path(m.name)) for m in files)
    return found


def plan_outputs(
    files: list[tuple[Path, Path]], out: str | Path, output_format: str
) -> list[tuple[Path, Path, str | None]]:
    """Give each input file its output path under ``out``, refusing those that would destroy data.

    An output that is one of the inputs, or that an earlier input already claimed (``a.jpg`` and
    ``a.png`` both becoming ``a.png``), gets an error instead of being written.

    Args:
        files: ``(file, relative name)`` pairs from :func:`expand_inputs`.
        out: output folder.
        output_format: ``png``, ``jpg``, ``tif`` (the suffix) or ``same`` (each input's own).

    Returns:
        ``(file, destination, error)`` per input, ``error`` None when it may be written.

    Example:
        >>> plan = plan_outputs([(Path("in/a.jpg"), Path("a.jpg")), (Path("in/a.png"), Path("a.png"))], "o", "png")
        >>> [(d.as_posix(), e is None) for _, d, e in plan]
        [('o/a.png', True), ('o/a.png', False)]
    """
    out = Path(out)
    inputs = {path.resolve() for path, _ in files}
    claimed: dict[Path, Path] = {}
    plan = []
    for path, relative in files:
        suffix = relative.suffix if output_format == "same" else f".{output_format}"
        destination = out / relative.with_suffix(suffix)
        key = destination.resolve()
        error = None
        if key in inputs:
            error = f"out: writing {destination} would overwrite an input"
        elif claimed.setdefault(key, path) != path:
            error = f"out: {path} and {claimed[key]} would both write {destination}"
        plan.append((path, destination, error))
    return plan

