"""Classical normalization accuracy against known answers.

1. Restaining simulator (``samples/`` tiles): SSIM/PSNR to the simulated ground truth.
2. Real two-scanner pairs (``$GENPATH_SHARED_DATA/mitos_scanner_pairs``, research-only, not
   shipped): Aperio tiles normalized to a Hamamatsu reference from another slide region, compared
   with the true Hamamatsu tiles (8 px border cropped) by SSIM, PSNR and ΔE2000, at full resolution
   and after 4× mean-downsampling; genpath vs torchstain vs no normalization.

Run: ``python benchmarks/classical_accuracy.py``
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kornia.metrics import psnr, ssim
from skimage.color import deltaE_ciede2000, rgb2lab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import load_rgb, tissue_tiles  # noqa: E402

from genpath.data import shared_data_root  # noqa: E402
from normalization import MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer  # noqa: E402
from normalization.restain import RestainingSimulator  # noqa: E402

METHODS = {"macenko": MacenkoNormalizer, "reinhard": ReinhardNormalizer, "vahadane": VahadaneNormalizer}


def scores(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """Mean SSIM, PSNR (dB) and ΔE2000 of float (B,3,H,W) batches."""
    s = float(ssim(pred, truth, 7).mean())
    p = float(psnr(pred, truth, 1.0))
    lab_p = rgb2lab(pred.permute(0, 2, 3, 1).numpy())
    lab_t = rgb2lab(truth.permute(0, 2, 3, 1).numpy())
    return s, p, float(np.mean(deltaE_ciede2000(lab_p, lab_t)))


def simulator_benchmark() -> None:
    tiles = tissue_tiles(64, 128).float() / 255
    sim = RestainingSimulator()
    print("\n== restaining simulator: 8 target styles x 8 tiles (128x128), SSIM / PSNR / dE2000 to ground truth")
    rows: dict[str, list[tuple[float, float, float]]] = {"none": [], **{m: [] for m in METHODS}}
    for k in range(8):
        batch = tiles[k * 8 : (k + 1) * 8]
        tri = sim(batch, references=tiles[(k * 8 + 13) % 64 : (k * 8 + 13) % 64 + 1].expand(8, -1, -1, -1),
                  generator=torch.Generator().manual_seed(k), share_target_style=True)
        rows["none"].append(scores(tri.source, tri.target))
        for name, cls in METHODS.items():
            norm = cls().fit(tri.reference[:1])
            rows[name].append(scores(norm(tri.source), tri.target))
    for name, vals in rows.items():
        s, p, d = np.mean(vals, axis=0)
        print(f"{name:10s} SSIM {s:.3f}  PSNR {p:5.2f} dB  dE2000 {d:5.2f}")


def mitos_pairs_by_slide(folder: Path) -> dict[str, list[dict]]:
    """Rows of ``folder/pairs.csv`` grouped by slide."""
    with open(folder / "pairs.csv") as handle:
        pairs = list(csv.DictReader(handle))
    by_slide: dict[str, list[dict]] = {}
    for row in pairs:
        by_slide.setdefault(row["slide"], []).append(row)
    return by_slide


def mitos_benchmark(root: Path) -> None:
    folder = root / "mitos_scanner_pairs"
    by_slide = mitos_pairs_by_slide(folder)
    import torchstain

    results: dict[str, list[tuple[float, ...]]] = {}
    for rows in by_slide.values():
        # reference: the Hamamatsu tile of this slide with the least white; evaluated on the others
        rows = sorted(rows, key=lambda r: float(r["white_frac_hamamatsu"]))
        ref_row, eval_rows = rows[0], rows[1:]
        reference = load_rgb(folder / ref_row["hamamatsu"])
        src = torch.stack([load_rgb(folder / r["aperio"]) for r in eval_rows])
        truth = torch.stack([load_rgb(folder / r["hamamatsu"]) for r in eval_rows]).float() / 255
        outputs = {"none": src.float() / 255}
        for name, cls in METHODS.items():
            outputs[f"genpath {name}"] = cls().fit(reference)(src).float() / 255
        for name in ("macenko", "reinhard"):
            ts = getattr(torchstain.normalizers, f"{name.capitalize()}Normalizer")(backend="torch")
            ts.fit(reference)
            outs = []
            for tile in src:
                try:
                    res = ts.normalize(tile, stains=False)[0] if name == "macenko" else ts.normalize(tile)
                    outs.append(res.permute(2, 0, 1).float() / 255)
                except Exception:  # noqa: BLE001 - torchstain fails on some tiles; count as unnormalized
                    outs.append(tile.float() / 255)
            outputs[f"torchstain {name}"] = torch.stack(outs)
        crop = (slice(None), slice(None), slice(8, -8), slice(8, -8))
        for name, pred in outputs.items():
            p, t = pred[crop].clamp(0, 1), truth[crop]
            full = scores(p, t)
            low = scores(F.avg_pool2d(p, 4), F.avg_pool2d(t, 4))
            results.setdefault(name, []).append((*full, *low))
    print("\n== MITOS Aperio -> Hamamatsu (5 slides, reference = another tile of the same slide)")
    print(f"{'method':20s} {'SSIM':>6s} {'PSNR':>6s} {'dE':>6s} | {'SSIM4x':>6s} {'PSNR4x':>6s} {'dE4x':>6s}")
    for name, vals in results.items():
        v = np.mean(vals, axis=0)
        print(f"{name:20s} {v[0]:6.3f} {v[1]:6.2f} {v[2]:6.2f} | {v[3]:6.3f} {v[4]:6.2f} {v[5]:6.2f}")


def main() -> None:
    torch.set_num_threads(2)
    simulator_benchmark()
    root = shared_data_root()
    if root is None or not (root / "mitos_scanner_pairs").is_dir():
        print("\nshared data not found (GENPATH_SHARED_DATA): skipping the MITOS real-pair benchmark")
        return
    mitos_benchmark(root)


if __name__ == "__main__":
    main()
