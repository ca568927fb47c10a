"""Make the demo H&E/IHC pairs (synthetic IHC, known by construction) from the BSD H&E sample.

Run from the project root: ``python samples/pairs/demo_he_ihc/make_pairs.py``.

Each H&E crop of ``samples/images/he_hgsc_nest.jpg`` (BSD-3-Clause, see samples/README.md) is
deconvolved into haematoxylin (Ruifrok-Johnston, scikit-image HED). Its "IHC" is rendered by
Beer-Lambert with scikit-image's haematoxylin/DAB matrix: the haematoxylin counterstain at 0.6x,
plus DAB around nuclei (the smoothed haematoxylin-positive area) on the left half of the crop (a marker expressed in
one region). No real IHC is involved; the pairs only let the translator code, tests and the CI
config run on data the project ships. Results are written as PNG with a ``pairs.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2hed, rgb_from_hdx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def render_ihc(he: np.ndarray) -> np.ndarray:
    """Synthetic IHC of an H&E crop (uint8 ``(H,W,3)``)."""
    haem = rgb2hed(he)[..., 0].clip(0)
    haem = haem / max(float(np.percentile(haem, 99)), 1e-6)
    dab = gaussian_filter((haem > 0.3).astype(float), 3.0) * 0.6
    dab[:, he.shape[1] // 2 :] = 0.0
    od = np.stack([haem * 0.6, dab, np.zeros_like(haem)], -1) @ rgb_from_hdx  # HDX concentrations -> OD (log10)
    return (255 * np.power(10.0, -od)).clip(0, 255).round().astype(np.uint8)


def main() -> None:
    """Write HE/, IHC/ and pairs.csv next to this script."""
    image = np.asarray(Image.open(ROOT / "samples" / "images" / "he_hgsc_nest.jpg").convert("RGB"))
    (HERE / "HE").mkdir(exist_ok=True)
    (HERE / "IHC").mkdir(exist_ok=True)
    rows = []
    size = 128
    h, w = image.shape[:2]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    for i, (y, x) in enumerate(corners):
        he = image[y : y + size, x : x + size]
        name = f"demo_{i}.png"
        Image.fromarray(he).save(HERE / "HE" / name)
        Image.fromarray(render_ihc(he)).save(HERE / "IHC" / name)
        rows.append({"he": f"HE/{name}", "ihc": f"IHC/{name}", "split": "train" if i < 3 else "test",
                     "patient": f"p{i}"})
    with open(HERE / "pairs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["he", "ihc", "split", "patient"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
