"""Diffusion stain normalization (StainFuser-style) against classical methods, one run.

1. Restaining-simulator triplets from held-out tiles (PCam files in the 30% hold-out, never
   trained on; the sample tiles when shared data is absent): SSIM / PSNR / ΔE2000 to the ground
   truth for none, Reinhard, Macenko, Vahadane and the diffusion normalizer at 1/2/4/20 steps.
2. Real two-scanner pairs (``$GENPATH_SHARED_DATA/mitos_scanner_pairs``, research-only):
   Aperio → Hamamatsu, reference = the least-white Hamamatsu tile of the same slide, 8 px border
   cropped, full resolution and 4× mean-downsampled (the same protocol as
   ``classical_accuracy.py``). None of these slides is used in training.
3. Speed: tiles/s at 256² on this CPU for each step count.
4. A synthetic slide through overlapping windows: seam score (gradient energy on tile borders
   over the interior) with and without overlap, and the overlap's cost against plain tiling.

Run: ``python benchmarks/stainfuser_accuracy.py [--model samples/checkpoints/stainfuser_small]``
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import load_rgb, tissue_tiles  # noqa: E402
from classical_accuracy import METHODS, scores  # noqa: E402

from genpath.data import shared_data_root  # noqa: E402
from genpath.pipelines import StainFuserNormalizer  # noqa: E402
from genpath.training.data import TileFolderDataset  # noqa: E402
from normalization.restain import RestainingSimulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = (1, 2, 4, 20)


def fuser(model: Path, steps: int, detail: bool = True) -> StainFuserNormalizer:
    return StainFuserNormalizer(model, num_inference_steps=steps, detail_transfer=detail, min_target_tissue=0.05)


def variants(model: Path) -> dict[str, StainFuserNormalizer]:
    out = {f"stainfuser {k} step{'s' if k > 1 else ''}": fuser(model, k) for k in STEPS}
    out["stainfuser 4 steps, no detail"] = fuser(model, 4, detail=False)
    return out


def heldout_tiles(n: int = 64) -> torch.Tensor:
    root = shared_data_root()
    if root is not None and (root / "pcam" / "test").is_dir():
        data = TileFolderDataset([root / "pcam" / "test"], 96, holdout=0.3, part="holdout")
        tiles = torch.stack([data[i] for i in range(len(data))])
        od = (-torch.log((tiles.float() + 1) / 241)).clamp(min=0)
        keep = (od.min(1).values > 0.15).float().mean((-1, -2)) > 0.3  # mostly tissue (per-pixel OD, all channels)
        return tiles[keep][:n]
    return tissue_tiles(n, 128)


def simulator_benchmark(model: Path) -> None:
    tiles = heldout_tiles().float() / 255
    sim, groups = RestainingSimulator(), len(tiles) // 8
    rows: dict[str, list[tuple[float, float, float]]] = {}
    normalizers = variants(model)
    for k in range(groups):
        batch = tiles[k * 8 : (k + 1) * 8]
        ref = tiles[(k * 8 + 13) % len(tiles)][None].expand(8, -1, -1, -1)
        tri = sim(batch, references=ref, generator=torch.Generator().manual_seed(k), share_target_style=True)
        rows.setdefault("none", []).append(scores(tri.source, tri.target))
        for name, cls in METHODS.items():
            rows.setdefault(name, []).append(scores(cls().fit(tri.reference[:1])(tri.source), tri.target))
        for name, norm in normalizers.items():
            rows.setdefault(name, []).append(scores(norm.fit(tri.reference[:1])(tri.source), tri.target))
    print(f"\n== restaining simulator, held-out tiles {tuple(tiles.shape[-2:])}: {groups} target styles x 8 tiles")
    print(f"{'method':32s} {'SSIM':>6s} {'PSNR':>6s} {'dE':>6s}")
    for name, vals in rows.items():
        s, p, d = np.mean(vals, axis=0)
        print(f"{name:32s} {s:6.3f} {p:6.2f} {d:6.2f}")


def mitos_benchmark(model: Path, root: Path, slides: list[str] | None = None,
                    finetuned: list[Path] | None = None) -> None:
    folder = root / "mitos_scanner_pairs"
    with open(folder / "pairs.csv") as handle:
        pairs = list(csv.DictReader(handle))
    by_slide: dict[str, list[dict]] = {}
    for row in pairs:
        if slides is None or row["slide"] in slides:
            by_slide.setdefault(row["slide"], []).append(row)
    normalizers = variants(model)
    for tuned in finetuned or []:
        normalizers[f"stainfuser fine-tuned ({tuned.parent.name}) 4 steps"] = fuser(tuned, 4)
    results: dict[str, list[tuple[float, ...]]] = {}
    for rows in by_slide.values():
        rows = sorted(rows, key=lambda r: float(r["white_frac_hamamatsu"]))
        reference = load_rgb(folder / rows[0]["hamamatsu"])
        src = torch.stack([load_rgb(folder / r["aperio"]) for r in rows[1:]])
        truth = torch.stack([load_rgb(folder / r["hamamatsu"]) for r in rows[1:]]).float() / 255
        outputs = {"none": src.float() / 255}
        for name, cls in METHODS.items():
            outputs[name] = cls().fit(reference)(src).float() / 255
        for name, norm in normalizers.items():
            norm.fit(reference)
            outputs[name] = torch.cat([norm(src[i : i + 8]) for i in range(0, len(src), 8)]).float() / 255
        crop = (slice(None), slice(None), slice(8, -8), slice(8, -8))
        for name, pred in outputs.items():
            p, t = pred[crop].clamp(0, 1), truth[crop]
            results.setdefault(name, []).append((*scores(p, t), *scores(F.avg_pool2d(p, 4), F.avg_pool2d(t, 4))))
    print(f"\n== MITOS Aperio -> Hamamatsu, slides {sorted(by_slide)}; reference = another tile of the slide")
    print(f"{'method':32s} {'SSIM':>6s} {'PSNR':>6s} {'dE':>6s} | {'SSIM4x':>6s} {'PSNR4x':>6s} {'dE4x':>6s}")
    for name, vals in results.items():
        v = np.mean(vals, axis=0)
        print(f"{name:32s} {v[0]:6.3f} {v[1]:6.2f} {v[2]:6.2f} | {v[3]:6.3f} {v[4]:6.2f} {v[5]:6.2f}")


def speed_benchmark(model: Path) -> None:
    tiles = tissue_tiles(8, 256)
    print("\n== speed, 8 tiles of 256x256, 2 CPU threads")
    for steps in STEPS:
        norm = fuser(model, steps).fit(tissue_tiles(1, 256))
        norm(tiles[:1])
        start = time.perf_counter()
        norm(tiles)
        print(f"{steps:2d} steps: {8 / (time.perf_counter() - start):6.2f} tiles/s")


def slide_benchmark(model: Path, tmp: Path, tiles: list[int], overlap: int = 16) -> None:
    from PIL import Image

    from genpath.io.slide import open_slide
    from genpath.io.synthetic_slide import write_synthetic_slide
    from genpath.pipelines.large_image import seam_score
    from normalization.slide import SlideOptions, normalize_slide

    def read(slide: Path) -> torch.Tensor:
        with open_slide(slide) as reader:
            return torch.from_numpy(reader.read_region((0, 0), 0, (1024, 768))).permute(2, 0, 1).float() / 255

    files = sorted((ROOT / "samples" / "tiles" / "crc").glob("*.png"))
    patches = np.stack([np.asarray(Image.open(p).convert("RGB"))[:192, :192] for p in files])
    path = write_synthetic_slide(tmp / "slide.tif", 1024, 768, patches, kind="tiff", tile=256, tissue_share=0.9,
                                 seed=0, compression="zlib")
    norm = fuser(model, 4).fit(tissue_tiles(1, 256))
    original = read(path)
    for tile in tiles:
        print(f"\n== synthetic 1024x768 slide, {tile}-px tiles, 4 steps")
        print(f"input seam score ({tile}-px grid): {seam_score(original, tile):.3f}")
        seconds = {}
        for pad in (0, overlap):
            options = SlideOptions(tile_size=tile, overlap=pad, output_format="ome-zarr", qc=False, min_tissue=0.0)
            start = time.perf_counter()
            normalize_slide(path, tmp / f"out{tile}_{pad}.ome.zarr", norm, options)
            seconds[pad] = time.perf_counter() - start
            out = read(tmp / f"out{tile}_{pad}.ome.zarr")
            print(f"overlap {pad:2d}: seam score {seam_score(out, tile):.3f}, {seconds[pad]:.1f} s")
        area = ((tile + 2 * overlap) / tile) ** 2
        print(f"overlap cost vs plain tiling: {seconds[overlap] / seconds[0]:.2f}x (window area ratio {area:.2f})")


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "stainfuser_small")
    parser.add_argument("--finetuned", type=Path, nargs="*", default=[],
                        help="models fine-tuned on MITOS pairs (configs/stainfuser_mitos.yaml): evaluated on --slides")
    parser.add_argument("--slides", nargs="*", default=None, help="MITOS slides to evaluate (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["simulator", "mitos", "speed", "slide"])
    parser.add_argument("--slide-tiles", nargs="*", type=int, default=[256, 512],
                        help="tile sizes for the slide seam/overlap-cost part (16-px overlap each)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if "simulator" not in args.skip:
        simulator_benchmark(args.model)
    root = shared_data_root()
    if "mitos" not in args.skip:
        if root is None or not (root / "mitos_scanner_pairs").is_dir():
            print("\nshared data not found (GENPATH_SHARED_DATA): skipping the MITOS real-pair benchmark")
        else:
            mitos_benchmark(args.model, root, args.slides, args.finetuned)
    if "speed" not in args.skip:
        speed_benchmark(args.model)
    if "slide" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            slide_benchmark(args.model, Path(tmp), args.slide_tiles)


if __name__ == "__main__":
    main()
