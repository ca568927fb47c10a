"""Whole-slide normalization against libvips doing the same I/O, and peak memory vs slide size. One run.

Run: ``python benchmarks/slide_throughput.py [--size 20000] [--memory-sizes 10000 40000] [--work DIR]
[--methods macenko reinhard vahadane] [--out out/bench/slide_throughput.json]``

1. Synthesize slides (real CRC-VAL-HE-7K patches in tissue blobs, JPEG SVS, 512 tiles).
2. In the same run, each a fresh process, wall time and peak RSS of:
   * the peer: libvips reading the slide and re-writing it as a tiled pyramidal BigTIFF with JPEG
     tiles (``vips tiffsave SLIDE out.tif --tile --tile-width 512 --tile-height 512 --pyramid
     --compression jpeg --Q 90 --bigtiff``, through pyvips' bundled libvips);
   * ``genpath normalize slides SLIDE --method M`` for each method, the whole CLI run (start-up,
     tissue detection, per-slide fit, normalization, pyramid, QC, manifest, report);
   * the import floor: a process that imports what the command imports and exits.
   Prints genpath / libvips per method (target <= 1.5) and peak RSS raw and above the floor
   (target <= 200 MB above it).
3. Peak RSS of ``genpath normalize --method macenko`` on slides of each memory size: largest / smallest
   (target: flat).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "samples" / "images" / "he_tiatoolbox_target.png"


def patches() -> np.ndarray:
    files = sorted((ROOT / "samples" / "tiles" / "crc").glob("*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB"))[:192, :192] for p in files])


def make_slide(path: Path, size: int) -> Path:
    from genpath.io.synthetic_slide import write_synthetic_slide

    if not path.exists():
        start = time.perf_counter()
        write_synthetic_slide(path, size, size, patches(), kind="svs", tile=512, mpp=0.5, tissue_share=0.35)
        print(f"  made {path.name} ({size}x{size}) in {time.perf_counter() - start:.1f}s", flush=True)
    return path


def run_measured(argv: list[str]) -> dict:
    """Run ``argv`` in a fresh process; wall seconds and peak RSS (MB) of that process tree."""
    code = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        f"r = subprocess.run({argv!r}, capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps({'rc': r.returncode, 'seconds': dt,"
        " 'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'err': r.stderr[-2000:]}))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    if result["rc"] != 0:
        raise RuntimeError(result["err"])
    return result


def libvips_rewrite(slide: Path, out: Path) -> dict:
    """The peer: libvips read + pyramidal JPEG BigTIFF re-write of the same slide (``vips tiffsave``)."""
    code = (
        "import pyvips, sys\n"
        "pyvips.Image.new_from_file(sys.argv[1], access='sequential').tiffsave(sys.argv[2], tile=True,"
        " tile_width=512, tile_height=512, pyramid=True, compression='jpeg', Q=90, bigtiff=True)\n"
    )
    return run_measured([sys.executable, "-c", code, str(slide), str(out)])


def import_floor() -> dict:
    """What a ``genpath normalize slides`` process costs before it reads anything."""
    code = "import genpath.cli, genpath.apps.normalize, normalization, genpath.wsi.vips_slide, pyvips, torch"
    return run_measured([sys.executable, "-c", code])


def run_cli(slide: Path, out: Path, method: str = "macenko") -> dict:
    """``genpath normalize slides`` in a fresh process."""
    genpath = str(Path(sys.executable).parent / "genpath")
    return run_measured([genpath, "normalize", "slides", str(slide), "--method", method, "--target", str(TARGET),
                         "--out", str(out), "--tile-size", "512", "--overwrite"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--methods", nargs="+", default=["macenko", "reinhard", "vahadane"])
    parser.add_argument("--work", type=Path, default=None, help="keep slides here between runs")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "slide_throughput.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="genpath-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}")

    slide = make_slide(work / f"synthetic_{args.size}.svs", args.size)
    floor = import_floor()
    peer = libvips_rewrite(slide, work / "libvips.tif")
    print(f"import floor: {floor['seconds']:.2f}s, {floor['rss_mb']:.0f} MB peak RSS")
    print(f"{args.size}x{args.size}: libvips read + pyramid re-write {peer['seconds']:.2f}s, "
          f"{peer['rss_mb']:.0f} MB peak RSS", flush=True)
    results: dict = {"size": args.size, "floor": floor, "libvips": peer, "methods": {}, "memory": {}}
    for method in args.methods:
        run = run_cli(slide, work / f"out_{method}", method)
        results["methods"][method] = run
        print(f"  genpath normalize slides --method {method}: {run['seconds']:.2f}s, "
              f"ratio {run['seconds'] / peer['seconds']:.2f} to libvips (target <= 1.5); "
              f"peak RSS {run['rss_mb']:.0f} MB, "
              f"{run['rss_mb'] - floor['rss_mb']:.0f} MB above the floor (target <= 200)", flush=True)

    for size in args.memory_sizes:
        path = make_slide(work / f"synthetic_{size}.svs", size)
        run = run_cli(path, work / f"out_{size}")
        run["libvips"] = libvips_rewrite(path, work / f"libvips_{size}.tif")
        results["memory"][size] = run
        print(f"{size}x{size} macenko: {run['seconds']:.1f}s ({run['seconds'] / run['libvips']['seconds']:.2f}x "
              f"libvips), peak RSS {run['rss_mb']:.0f} MB ({run['rss_mb'] - floor['rss_mb']:.0f} above the floor; "
              f"libvips alone {run['libvips']['rss_mb']:.0f} MB)", flush=True)
    if results["memory"]:
        small, large = min(results["memory"]), max(results["memory"])
        a, b = results["memory"][small]["rss_mb"], results["memory"][large]["rss_mb"]
        print(f"peak RSS {large}² / {small}²: {b / a:.2f} ({b:.0f} MB vs {a:.0f} MB; target flat)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
