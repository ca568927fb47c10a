"""Diffusion stain normalization (StainFuser-style) against classical methods, one run.

Every diffusion row comes twice: the model's own colours (``colour_anchor="none"``) and with the
normalizer's colour anchor (``+ reinhard anchor``: the normalizer's own :meth:`anchor` applied to
the same output, rounded to 8 bits as the normalizer returns uint8; the option anchors before
rounding, so the two differ by at most one 8-bit level).

1. Restaining-simulator triplets from held-out tiles (PCam files in the 30% hold-out, never
   trained on; the sample tiles when shared data is absent): SSIM / PSNR / ΔE2000 to the ground
   truth for none, Reinhard, Macenko, Vahadane and the diffusion normalizer at 1/2/4/20 steps
   (``--steps``).
2. Real two-scanner pairs (``$GENPATH_SHARED_DATA/mitos_scanner_pairs``, research-only):
   Aperio → Hamamatsu, reference = the least-white Hamamatsu tile of the same slide, 8 px border
   cropped, full resolution and 4× mean-downsampled (the same protocol as
   ``classical_accuracy.py``). None of these slides is used in training.
3. Speed: tiles/s at 256² on this CPU for each step count.
4. A synthetic slide through overlapping windows: seam score (gradient energy on tile borders
   over the interior) with and without overlap, and the overlap's cost against plain tiling.

Run: ``python benchmarks/stainfuser_accuracy.py [--model samples/checkpoints/stainfuser_small]
[--steps 1 2 4 20] [--skip simulator speed slide] [--out out/bench/stainfuser_accuracy.json]
[--cache out/bench/stainfuser_cache]``. Results go to ``--out`` (JSON, rewritten after every MITOS
slide); the models' MITOS outputs are cached per (model, slide, steps) under ``--cache``, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import load_rgb, tissue_tiles  # noqa: E402
from classical_accuracy import METHODS, scores  # noqa: E402

from genpath.data import shared_data_root  # noqa: E402
from genpath.pipelines import StainFuserNormalizer  # noqa: E402
from genpath.training.data import TileFolderDataset  # noqa: E402
from normalization.colour_anchor import anchor_statistics, reinhard_anchor  # noqa: E402
from normalization.restain import RestainingSimulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = (1, 2, 4, 20)
ANCHOR = "reinhard"
ANCHORED = f" + {ANCHOR} anchor"


def fuser(model: Path, steps: int, detail: bool = True, colour_anchor: str = "none") -> StainFuserNormalizer:
    return StainFuserNormalizer(model, num_inference_steps=steps, detail_transfer=detail, min_target_tissue=0.05,
                                colour_anchor=colour_anchor)


def variants(model: Path, steps: tuple[int, ...] = STEPS,
             no_detail: tuple[int, ...] = (4,)) -> dict[str, tuple[StainFuserNormalizer, bool]]:
    """Named diffusion normalizers (raw colours) and whether to report an anchored row too."""
    out = {f"stainfuser {k} step{'s' if k > 1 else ''}": (fuser(model, k), True) for k in steps}
    for k in no_detail:
        out[f"stainfuser {k} steps, no detail"] = (fuser(model, k, detail=False), False)
    return out


def anchored(norm: StainFuserNormalizer, reference: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The normalizer's colour anchor (fitted on ``reference``, as ``fit`` does) on its raw uint8 output, as uint8."""
    mean, std = anchor_statistics(reference.float() / 255, norm.anchor_white_od)
    done = reinhard_anchor(raw.float() / 255, mean, std, norm.anchor_white_od)
    return (done * 255).round().to(torch.uint8)


def model_key(model: Path) -> str:
    """Cache folder name of a model: its folder name and a hash of its resolved path and weights' sizes/times."""
    folder = model.resolve()
    files = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file())
    return f"{folder.name}-{hashlib.sha1(repr((str(folder), files)).encode()).hexdigest()[:10]}"


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def heldout_tiles(n: int = 64) -> torch.Tensor:
    root = shared_data_root()
    if root is not None and (root / "pcam" / "test").is_dir():
        data = TileFolderDataset([root / "pcam" / "test"], 96, holdout=0.3, part="holdout")
        tiles = torch.stack([data[i] for i in range(len(data))])
        od = (-torch.log((tiles.float() + 1) / 241)).clamp(min=0)
        keep = (od.min(1).values > 0.15).float().mean((-1, -2)) > 0.3  # mostly tissue (per-pixel OD, all channels)
        return tiles[keep][:n]
    return tissue_tiles(n, 128)


def simulator_benchmark(model: Path, steps: tuple[int, ...], no_detail: tuple[int, ...]) -> dict[str, list[float]]:
    tiles = heldout_tiles().float() / 255
    sim, groups = RestainingSimulator(), len(tiles) // 8
    rows: dict[str, list[tuple[float, float, float]]] = {}
    normalizers = variants(model, steps, no_detail)
    for k in range(groups):
        batch = tiles[k * 8 : (k + 1) * 8]
        ref = tiles[(k * 8 + 13) % len(tiles)][None].expand(8, -1, -1, -1)
        tri = sim(batch, references=ref, generator=torch.Generator().manual_seed(k), share_target_style=True)
        rows.setdefault("none", []).append(scores(tri.source, tri.target))
        for name, cls in METHODS.items():
            rows.setdefault(name, []).append(scores(cls().fit(tri.reference[:1])(tri.source), tri.target))
        for name, (norm, anchor) in normalizers.items():
            raw = norm.fit(tri.reference[:1])(tri.source)
            rows.setdefault(name, []).append(scores(raw, tri.target))
            if anchor:
                done = reinhard_anchor(raw, norm.anchor_mean, norm.anchor_std, norm.anchor_white_od)
                rows.setdefault(name + ANCHORED, []).append(scores(done, tri.target))
    print(f"\n== restaining simulator, held-out tiles {tuple(tiles.shape[-2:])}: {groups} target styles x 8 tiles")
    print(f"{'method':44s} {'SSIM':>6s} {'PSNR':>6s} {'dE':>6s}")
    means = {}
    for name, vals in rows.items():
        means[name] = [float(v) for v in np.mean(vals, axis=0)]
        s, p, d = means[name]
        print(f"{name:44s} {s:6.3f} {p:6.2f} {d:6.2f}")
    return means


def mitos_benchmark(model: Path, root: Path, slides: list[str] | None = None, finetuned: list[Path] | None = None,
                    steps: tuple[int, ...] = STEPS, no_detail: tuple[int, ...] = (4,), cache: Path | None = None,
                    results: dict[str, Any] | None = None, out: Path | None = None) -> dict[str, Any]:
    """Aperio -> Hamamatsu on the MITOS pairs; per-slide scores go to ``results["mitos"]`` (and ``out``) as they come.

    Scores already in ``results`` for a (slide, method) are kept, and model outputs cached under
    ``cache`` are reused, so a rerun resumes.
    """
    folder = root / "mitos_scanner_pairs"
    with open(folder / "pairs.csv") as handle:
        pairs = list(csv.DictReader(handle))
    by_slide: dict[str, list[dict]] = {}
    for row in pairs:
        if slides is None or row["slide"] in slides:
            by_slide.setdefault(row["slide"], []).append(row)
    normalizers = variants(model, steps, no_detail)
    models = dict.fromkeys(normalizers, model)
    for tuned in finetuned or []:
        name = f"stainfuser fine-tuned ({tuned.parent.name}) 4 steps"
        normalizers[name], models[name] = (fuser(tuned, 4), True), tuned
    results = results if results is not None else {}
    mitos = results.setdefault("mitos", {})
    per_slide: dict[str, dict[str, list[float]]] = mitos.setdefault("per_slide", {})
    for slide, rows in sorted(by_slide.items()):
        done = per_slide.setdefault(slide, {})
        rows = sorted(rows, key=lambda r: float(r["white_frac_hamamatsu"]))
        reference = load_rgb(folder / rows[0]["hamamatsu"])
        src = torch.stack([load_rgb(folder / r["aperio"]) for r in rows[1:]])
        truth = torch.stack([load_rgb(folder / r["hamamatsu"]) for r in rows[1:]]).float() / 255
        outputs = {"none": src}
        for name, cls in METHODS.items():
            if name not in done:
                outputs[name] = cls().fit(reference)(src)
        for name, (norm, anchor) in normalizers.items():
            if name in done and (not anchor or name + ANCHORED in done):
                continue
            key = name.replace("stainfuser ", "").replace(" ", "_").replace(",", "")
            file = None if cache is None else cache / model_key(models[name]) / f"{slide.replace('/', '_')}_{key}.pt"
            if file is not None and file.is_file():
                raw = torch.load(file)
            else:
                started = time.perf_counter()
                norm.fit(reference)
                raw = torch.cat([norm(src[i : i + 8]) for i in range(0, len(src), 8)])
                print(f"  {slide} {name}: {time.perf_counter() - started:.0f} s", flush=True)
                if file is not None:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(raw, file)
            outputs[name] = raw
            if anchor:
                outputs[name + ANCHORED] = anchored(norm, reference, raw)
        crop = (slice(None), slice(None), slice(8, -8), slice(8, -8))
        for name, pred in outputs.items():
            p, t = (pred.float() / 255)[crop].clamp(0, 1), truth[crop]
            done[name] = [float(v) for v in (*scores(p, t), *scores(F.avg_pool2d(p, 4), F.avg_pool2d(t, 4)))]
        mitos["mean"] = mitos_means(per_slide)
        write_json(out, results)
    print(f"\n== MITOS Aperio -> Hamamatsu, slides {sorted(by_slide)}; reference = another tile of the slide")
    print(f"{'method':44s} {'SSIM':>6s} {'PSNR':>6s} {'dE':>6s} | {'SSIM4x':>6s} {'PSNR4x':>6s} {'dE4x':>6s}")
    for name, v in mitos_means({k: per_slide[k] for k in by_slide}).items():
        print(f"{name:44s} {v[0]:6.3f} {v[1]:6.2f} {v[2]:6.2f} | {v[3]:6.3f} {v[4]:6.2f} {v[5]:6.2f}")
    return results


def mitos_means(per_slide: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """Mean over slides of each method's six scores (methods scored on every slide only)."""
    names = [n for n in next(iter(per_slide.values()), {}) if all(n in s for s in per_slide.values())]
    return {n: [float(v) for v in np.mean([s[n] for s in per_slide.values()], axis=0)] for n in names}


def speed_benchmark(model: Path, steps: tuple[int, ...]) -> dict[str, float]:
    tiles = tissue_tiles(8, 256)
    print("\n== speed, 8 tiles of 256x256, 2 CPU threads (colour anchor on: the default)")
    speeds = {}
    for k in steps:
        norm = fuser(model, k, colour_anchor=ANCHOR).fit(tissue_tiles(1, 256))
        norm(tiles[:1])
        start = time.perf_counter()
        norm(tiles)
        speeds[f"{k} steps"] = 8 / (time.perf_counter() - start)
        print(f"{k:2d} steps: {speeds[f'{k} steps']:6.2f} tiles/s")
    rgb = tiles.float() / 255
    start = time.perf_counter()
    norm.anchor(rgb)
    speeds["anchor ms per tile"] = (time.perf_counter() - start) / 8 * 1000
    print(f"colour anchor alone: {speeds['anchor ms per tile']:.1f} ms per tile")
    return speeds


def slide_benchmark(model: Path, tmp: Path, tiles: list[int], overlap: int = 16) -> dict[str, float]:
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
    norm = fuser(model, 4, colour_anchor=ANCHOR).fit(tissue_tiles(1, 256))
    original = read(path)
    found: dict[str, float] = {}
    for tile in tiles:
        print(f"\n== synthetic 1024x768 slide, {tile}-px tiles, 4 steps, colour anchor on")
        found[f"{tile} input seam"] = seam_score(original, tile)
        print(f"input seam score ({tile}-px grid): {found[f'{tile} input seam']:.3f}")
        seconds = {}
        for pad in (0, overlap):
            options = SlideOptions(tile_size=tile, overlap=pad, output_format="ome-zarr", qc=False, min_tissue=0.0)
            start = time.perf_counter()
            normalize_slide(path, tmp / f"out{tile}_{pad}.ome.zarr", norm, options)
            seconds[pad] = time.perf_counter() - start
            out = read(tmp / f"out{tile}_{pad}.ome.zarr")
            found[f"{tile} overlap {pad} seam"], found[f"{tile} overlap {pad} s"] = seam_score(out, tile), seconds[pad]
            print(f"overlap {pad:2d}: seam score {seam_score(out, tile):.3f}, {seconds[pad]:.1f} s")
        area = ((tile + 2 * overlap) / tile) ** 2
        print(f"overlap cost vs plain tiling: {seconds[overlap] / seconds[0]:.2f}x (window area ratio {area:.2f})")
    return found


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "stainfuser_small")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="sampler step counts to evaluate")
    parser.add_argument("--no-detail-steps", type=int, nargs="*", default=[4],
                        help="step counts also run without detail transfer (none: skip that ablation)")
    parser.add_argument("--finetuned", type=Path, nargs="*", default=[],
                        help="models fine-tuned on MITOS pairs (configs/stainfuser_mitos.yaml): evaluated on --slides")
    parser.add_argument("--slides", nargs="*", default=None, help="MITOS slides to evaluate (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["simulator", "mitos", "speed", "slide"])
    parser.add_argument("--skip-simulator", action="store_true", help="same as --skip simulator")
    parser.add_argument("--slide-tiles", nargs="*", type=int, default=[256, 512],
                        help="tile sizes for the slide seam/overlap-cost part (16-px overlap each)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results here (JSON; MITOS scores already in it are kept: a rerun resumes)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache the models' MITOS outputs here (per model, slide, steps) and reuse them")
    args = parser.parse_args()
    if args.skip_simulator:
        args.skip.append("simulator")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    steps, no_detail = tuple(args.steps), tuple(args.no_detail_steps)
    results: dict[str, Any] = {}
    if args.out is not None and args.out.is_file():
        results = json.loads(args.out.read_text())
        if results.get("model") != str(args.model):
            raise SystemExit(f"--out {args.out} holds results of model {results.get('model')}, not {args.model}")
    results.update(model=str(args.model), steps=list(steps), anchor=ANCHOR)
    if "simulator" not in args.skip:
        results["simulator"] = simulator_benchmark(args.model, steps, no_detail)
        write_json(args.out, results)
    root = shared_data_root()
    if "mitos" not in args.skip:
        if root is None or not (root / "mitos_scanner_pairs").is_dir():
            print("\nshared data not found (GENPATH_SHARED_DATA): skipping the MITOS real-pair benchmark")
        else:
            mitos_benchmark(args.model, root, args.slides, args.finetuned, steps, no_detail, args.cache, results,
                            args.out)
    if "speed" not in args.skip:
        results["speed"] = speed_benchmark(args.model, steps)
        write_json(args.out, results)
    if "slide" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            results["slide"] = slide_benchmark(args.model, Path(tmp), args.slide_tiles)
        write_json(args.out, results)


if __name__ == "__main__":
    main()
