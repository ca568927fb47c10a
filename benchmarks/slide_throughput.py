"""Whole-slide normalization: time against a plain read + pyramid re-write, and peak memory vs slide size.

Run: ``python benchmarks/slide_throughput.py [--size 20000] [--memory-sizes 10000 40000] [--work DIR]``

1. Synthesize slides (real CRC-VAL-HE-7K patches in tissue blobs, JPEG SVS, 512 tiles).
2. Time, in the same run and with the same writer settings:
   * baseline: read every level-0 tile with OpenSlide and write the same pyramidal TIFF;
   * ``genpath normalize --method macenko`` on the same slide (tissue detection, per-slide fit,
     normalization of tissue tiles, pyramid, QC).
   Prints the ratio (target ≤ 1.5).
3. Peak RSS of ``genpath normalize`` (a fresh process each) on slides of each memory size.
   Prints the ratio largest/smallest (target: flat, ≤ 1.5 GB).
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


def baseline_rewrite(slide: Path, out: Path) -> float:
    """Plain read of every level-0 tile with OpenSlide + the same pyramidal TIFF write."""
    import openslide

    from genpath.io.slide import composite_on_white
    from genpath.io.slide_writer import TiffPyramidWriter

    start = time.perf_counter()
    source = openslide.OpenSlide(str(slide))
    width, height = source.dimensions
    tile = 512

    def strips():
        for y in range(0, height, tile):
            h = min(tile, height - y)
            strip = np.empty((h, width, 3), np.uint8)
            for x in range(0, width, tile):
                w = min(tile, width - x)
                strip[:, x : x + w] = composite_on_white(np.asarray(source.read_region((x, y), 0, (w, h))))
            yield strip

    TiffPyramidWriter(out, width, height, tile, mpp=0.5, compression="jpeg", quality=90).write(strips())
    return time.perf_counter() - start


def run_cli(slide: Path, out: Path) -> tuple[float, float]:
    """Run ``genpath normalize slides`` in a fresh process; returns (seconds, peak RSS in MB)."""
    code = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        f"r = subprocess.run([{str(Path(sys.executable).parent / 'genpath')!r}, 'normalize', 'slides', {str(slide)!r},"
        f" '--method', 'macenko', '--target', {str(TARGET)!r}, '--out', {str(out)!r}, '--tile-size', '512',"
        " '--overwrite'], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps({'rc': r.returncode, 'seconds': dt,"
        " 'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'err': r.stderr[-2000:]}))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    if result["rc"] != 0:
        raise RuntimeError(result["err"])
    return result["seconds"], result["rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--work", type=Path, default=None, help="keep slides here between runs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="genpath-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}")

    slide = make_slide(work / f"synthetic_{args.size}.svs", args.size)
    base = baseline_rewrite(slide, work / "baseline.tiff")
    norm, rss = run_cli(slide, work / "out")
    print(f"\n{args.size}x{args.size}: plain read + pyramid re-write {base:.1f}s, "
          f"genpath normalize --method macenko {norm:.1f}s, ratio {norm / base:.2f} (target <= 1.5); "
          f"{args.size ** 2 / 1e6 / norm:.1f} Mpx/s; peak RSS {rss:.0f} MB")

    memory = {}
    for size in args.memory_sizes:
        path = make_slide(work / f"synthetic_{size}.svs", size)
        seconds, rss = run_cli(path, work / f"out_{size}")
        memory[size] = rss
        print(f"{size}x{size}: {seconds:.1f}s, peak RSS {rss:.0f} MB", flush=True)
    small, large = min(memory), max(memory)
    print(f"peak RSS {large}² / {small}²: {memory[large] / memory[small]:.2f} "
          f"({memory[large]:.0f} MB vs {memory[small]:.0f} MB; target flat, <= 1536 MB)")


if __name__ == "__main__":
    main()
