"""The classical normalizers' fitted per-pixel maps as libvips pipelines, for whole slides.

After its per-slide fit a classical normalizer is one fixed map of three bytes. Built here from
the same fitted tensors as the uint8 kernels of :mod:`normalization.fused`, the map runs inside
a streaming libvips pipeline (decode, map, pyramid, JPEG encode, threaded, in C): see
:mod:`genpath.wsi.vips_slide`. Every function takes and returns a ``pyvips.Image`` (3-band
uchar RGB), is lazy (nothing is computed until the image is written) and matches the uint8
kernel to within one level (values within float rounding of a half level may round the other
way).

* :func:`od_map_vips` (Macenko, any fixed 3×3 optical-density map): with ``l = log(x + 1)``,
  the mapped intensity is ``exp(w) - 1`` with ``w = log(io)·(1 - M·1) + M·l``, i.e. a product of
  per-byte powers ``io^(1-ΣM) · Π_k (x_k + 1)^M_ck``: three 256-entry float tables, two
  multiplies and a rounding cast; no ``log`` or ``exp`` per pixel.
* :func:`nnls_od_map_vips` (Vahadane): optical density by table, the closed-form two-stain
  non-negative least squares of :func:`~normalization.functional.concentrations_nonneg`, the
  target stains, and the intensity by table.
* :func:`reinhard_lab_map_vips` (Reinhard): kornia's LAB conversion (sRGB curve by table,
  cube root, Reinhard's affine map, the inverse with its clamps) and the sRGB encoding by a
  65536-entry table.

``pyvips`` is imported only by the functions that build lookup-table images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from normalization.fused import _F_TO_LAB, _LAB_OFFSET, _RGB_TO_XYZ, _WHITE, _XYZ_TO_RGB  # kornia's LAB constants

#: Steps per unit of the quantised log-intensity ``w`` fed to the 65536-entry output table.
VIPS_OD_STEPS = 11000
#: Largest ``|w|`` exponent (natural log) the power-product form keeps finite in float32.
_MAX_EXPONENT = 80.0



def lut_image(values: np.ndarray) -> Any:
    """Build a libvips lookup-table image from ``(entries, bands)`` values (float32 or uint8)."""
    import pyvips

    values = np.ascontiguousarray(values)
    if values.ndim == 1:
        values = values[:, None]
    fmt = {np.dtype(np.uint8): "uchar", np.dtype(np.float32): "float"}[values.dtype]
    return pyvips.Image.new_from_memory(values.tobytes(), values.shape[0], 1, values.shape[1], fmt)


def _matrix_image(matrix: np.ndarray) -> Any:
    import pyvips

    return pyvips.Image.new_from_array(np.asarray(matrix, dtype=np.float64).tolist())


def _od_output_table() -> np.ndarray:
    """``round(clamp(exp(w) - 1, 0, 255))`` at ``w = i / VIPS_OD_STEPS``, 65536 entries."""
    w = np.arange(65536, dtype=np.float64) / VIPS_OD_STEPS
    return np.clip(np.round(np.exp(w) - 1.0), 0, 255).astype(np.uint8)


def od_map_vips(image: Any, matrix: torch.Tensor, io: float = 240.0) -> Any | None:
    """:func:`~normalization.fused.apply_od_map_uint8` with one ``(3,3)`` map, as a libvips pipeline.

    Returns None when the map's powers could overflow float32 (entries far from any stain
    map): the caller then uses the tile engine.

    Shape:
        image ``3-band uchar W×H`` -> ``3-band uchar W×H``; matrix ``(3,3)``.
    """
    m = matrix.detach().double().cpu().numpy()
    if not np.isfinite(m).all() or np.abs(m).sum(1).max() * math.log(256.0) + abs(math.log(io)) * (
        1 + np.abs(m).sum(1).max()
    ) > _MAX_EXPONENT:
        return None
    x = np.arange(256, dtype=np.float64) + 1.0
    gain = io ** (1.0 - m.sum(1))  # (3,) per output channel
    factors = []
    for k in range(3):
        table = np.stack([x ** m[c, k] * (gain[c] if k == 0 else 1.0) for c in range(3)], -1).astype(np.float32)
        factors.append(image[k].maplut(lut_image(table)))
    product = factors[0] * factors[1] * factors[2]  # exp(w)
    return (product - 0.5).cast("uchar")  # round(clamp(exp(w) - 1)): the cast truncates and clips


def nnls_od_map_vips(
    image: Any, stains: torch.Tensor, scale: torch.Tensor, target_stains: torch.Tensor, io: float = 240.0
) -> Any:
    """:func:`~normalization.fused.vahadane_apply_uint8` for one slide, as a libvips pipeline.

    Shape:
        image ``3-band uchar``; stains/target_stains ``(3,2)``, scale ``(2,)`` -> ``3-band uchar``.
    """
    s = stains.detach().double().cpu().numpy()
    log_io = math.log(io)
    od_table = (log_io - np.log1p(np.arange(256, dtype=np.float64))).astype(np.float32)
    od = image.maplut(lut_image(od_table))  # 3-band float OD
    free = od.recomb(_matrix_image(np.linalg.pinv(s)))  # (2 bands) unconstrained least squares
    norms = np.maximum((s * s).sum(0), 1e-12)
    single = od.recomb(_matrix_image(s.T / norms[:, None])).clamp(min=0.0, max=1e30)  # each stain alone
    gain_h = single[0] * single[0] * float(norms[0])
    gain_e = single[1] * single[1] * float(norms[1])
    zero = single[0] * 0.0
    chosen = (gain_h >= gain_e).ifthenelse(single[0].bandjoin(zero), zero.bandjoin(single[1]))
    feasible = (free >= 0.0).bandand()
    concentrations = feasible.ifthenelse(free, chosen)
    weight = -(target_stains.detach().double().cpu().numpy() * scale.detach().double().cpu().numpy()[None, :])
    w = concentrations.recomb(_matrix_image(weight * VIPS_OD_STEPS))  # (3 bands) M·c in table steps
    index = w.linear([1.0] * 3, [log_io * VIPS_OD_STEPS + 0.5] * 3).cast("ushort")  # clips to 0..65535
    return index.maplut(lut_image(_od_output_table()))


def reinhard_lab_map_vips(image: Any, p: torch.Tensor, q: torch.Tensor) -> Any:
    """:func:`~normalization.fused.reinhard_transfer_uint8` for one slide, as a libvips pipeline.

    ``lab' = P·f + q`` (:func:`~normalization.fused.lab_transfer_matrices`) on kornia's LAB.

    Shape:
        image ``3-band uchar``; p ``(3,3)``, q ``(3,)`` or ``(3,1)`` -> ``3-band uchar``.
    """
    byte = np.arange(256, dtype=np.float64) / 255.0
    linear = np.where(byte > 0.04045, ((byte + 0.055) / 1.055) ** 2.4, byte / 12.92).astype(np.float32)
    white = np.asarray(_WHITE)
    lin = image.maplut(lut_image(linear))
    steps = 65535  # LAB's companding f(t), t in [0, 1], by a table (as the uint8 kernel)
    t = np.arange(steps + 1, dtype=np.float64) / steps
    companding = np.where(t > 0.008856, np.maximum(t, 0.008856) ** (1 / 3), 7.787 * t + 4.0 / 29.0)
    index = lin.recomb(_matrix_image(np.asarray(_RGB_TO_XYZ) / white[:, None] * steps)).linear(1.0, 0.5)
    f = index.cast("ushort").maplut(lut_image(companding.astype(np.float32)))  # the cast clips to [0, 1]
    lab = f.recomb(_matrix_image(p.detach().double().cpu().numpy())).linear(
        [1.0] * 3, q.detach().double().cpu().numpy().reshape(3).tolist()
    )
    lab = lab[0].clamp(min=0.0, max=100.0).bandjoin(lab[1:3])
    a_inv = np.linalg.inv(np.asarray(_F_TO_LAB))
    f = lab.recomb(_matrix_image(a_inv)).linear([1.0] * 3, (-a_inv @ np.asarray(_LAB_OFFSET)).tolist())
    f = f[0:2].bandjoin(f[2].clamp(min=0.0, max=1e30))  # kornia: Z < 0 is out of range
    xyz = (f > 0.2068966).ifthenelse(f * f * f, (f - 4.0 / 29.0) / 7.787)
    rgb = xyz.recomb(_matrix_image(np.asarray(_XYZ_TO_RGB) * white[None, :]))
    index = rgb.linear([float(steps)] * 3, [0.5] * 3).cast("ushort")  # clips to [0, 1]
    lin_out = np.arange(steps + 1, dtype=np.float64) / steps
    srgb = np.where(lin_out > 0.0031308, 1.055 * np.maximum(lin_out, 0.0031308) ** (1 / 2.4) - 0.055, 12.92 * lin_out)
    return index.maplut(lut_image((np.clip(srgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)))
