"""The one-step student (``stainfuser_1step``) against its teacher (``stainfuser_small``) at 1, 4 and 20 steps.

The protocol of ``stainfuser_accuracy.py`` (parts 1-3), for named (model, steps) variants:

1. Restaining-simulator triplets from held-out PCam tiles (never trained on): SSIM / PSNR / ΔE2000
   to the ground truth, 8 target styles × 8 tiles.
2. MITOS-ATYPIA-14 Aperio → Hamamatsu pairs (research-only, never trained on): reference = the
   least-white Hamamatsu tile of the slide, 8-px border cropped, full resolution and 4×
   mean-downsampled; per-slide means, then the mean over slides.
3. Speed: tiles/s for 8 tiles of 256² (2 threads), every variant in one pass.

Resumable: every (part, variant, group or slide) result is appended to ``--out`` (JSON lines)
and skipped when found there, so the script can be stopped and rerun; the tables are printed
from the file.

Run: ``python benchmarks/stainfuser_distill.py --out /work/runs/stainfuser_distill.jsonl``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import load_rgb, tissue_tiles  # noqa: E402
from classical_accuracy import mitos_pairs_by_slide, scores  # noqa: E402
from stainfuser_accuracy import heldout_tiles  # noqa: E402

from genpath.data import shared_data_root  # noqa: E402
from genpath.pipelines import StainFuserNormalizer  # noqa: E402
from normalization.restain import RestainingSimulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "samples" / "checkpoints"


def variants(student: Path, teacher: Path) -> dict[str, tuple[Path, int, str]]:
    """Name -> (model folder, steps, colour anchor); the student first (the result the benchmark is for).

    The models alone (anchor ``none``) are the distillation's comparison; ``+ reinhard`` adds the
    normalizer's default colour anchor to the output, for the numbers a user gets.
    """
    out: dict[str, tuple[Path, int, str]] = {}
    for anchor, suffix in (("none", ""), ("reinhard", " + reinhard")):
        out[f"student 1 step{suffix}"] = (student, 1, anchor)
        for steps in (1, 4, 20):
            out[f"teacher {steps} step{'s' if steps > 1 else ''}{suffix}"] = (teacher, steps, anchor)
    return out


def normalizer(model: Path, steps: int, anchor: str = "none") -> StainFuserNormalizer:
    return StainFuserNormalizer(model, num_inference_steps=steps, detail_transfer=True, min_target_tissue=0.05,
                                colour_anchor=anchor)


def done_keys(out: Path) -> set[tuple[str, str, str]]:
    if not out.is_file():
        return set()
    return {(r["part"], r["variant"], str(r["item"])) for r in map(json.loads, out.read_text().splitlines())}


def append(out: Path, record: dict) -> None:
    with open(out, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def simulator_part(named: dict[str, tuple[Path, int, str]], out: Path) -> None:
    tiles = heldout_tiles().float() / 255
    sim, groups = RestainingSimulator(), len(tiles) // 8
    done = done_keys(out)
    for name, (model, steps, anchor) in {"none": (None, 0, "none"), **named}.items():
        norm = normalizer(model, steps, anchor) if model is not None else None
        for k in range(groups):
            if ("simulator", name, str(k)) in done:
                continue
            batch = tiles[k * 8 : (k + 1) * 8]
            ref = tiles[(k * 8 + 13) % len(tiles)][None].expand(8, -1, -1, -1)
            tri = sim(batch, references=ref, generator=torch.Generator().manual_seed(k), share_target_style=True)
            pred = tri.source if norm is None else norm.fit(tri.reference[:1])(tri.source)
            s, p, d = scores(pred, tri.target)
            append(out, {"part": "simulator", "variant": name, "item": k, "ssim": s, "psnr": p, "de": d})
            print(f"simulator {name} group {k}: SSIM {s:.3f}", flush=True)


def mitos_part(named: dict[str, tuple[Path, int, str]], root: Path, out: Path) -> None:
    folder = root / "mitos_scanner_pairs"
    by_slide = mitos_pairs_by_slide(folder)
    done = done_keys(out)
    crop = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    for name, (model, steps, anchor) in {"none": (None, 0, "none"), **named}.items():
        norm = normalizer(model, steps, anchor) if model is not None else None
        for slide, rows in sorted(by_slide.items()):
            if ("mitos", name, slide) in done:
                continue
            rows = sorted(rows, key=lambda r: float(r["white_frac_hamamatsu"]))
            reference = load_rgb(folder / rows[0]["hamamatsu"])
            src = torch.stack([load_rgb(folder / r["aperio"]) for r in rows[1:]])
            truth = torch.stack([load_rgb(folder / r["hamamatsu"]) for r in rows[1:]]).float() / 255
            if norm is None:
                pred = src.float() / 255
            else:
                norm.fit(reference)
                pred = torch.cat([norm(src[i : i + 8]) for i in range(0, len(src), 8)]).float() / 255
            p, t = pred[crop].clamp(0, 1), truth[crop]
            full, low = scores(p, t), scores(F.avg_pool2d(p, 4), F.avg_pool2d(t, 4))
            append(out, {"part": "mitos", "variant": name, "item": slide, "tiles": len(src),
                         "ssim": full[0], "psnr": full[1], "de": full[2],
                         "ssim4": low[0], "psnr4": low[1], "de4": low[2]})
            print(f"mitos {name} slide {slide}: SSIM {full[0]:.3f} SSIM4x {low[0]:.3f}", flush=True)


def speed_part(named: dict[str, tuple[Path, int, str]], out: Path, repeats: int) -> None:
    tiles = tissue_tiles(8, 256)
    norms = {name: normalizer(*spec).fit(tissue_tiles(1, 256)) for name, spec in named.items()}
    for norm in norms.values():
        norm(tiles[:1])
    seconds: dict[str, list[float]] = {name: [] for name in norms}
    for _ in range(repeats):  # interleaved, so that load changes on a shared machine hit every variant alike
        for name, norm in norms.items():
            start = time.perf_counter()
            norm(tiles)
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        append(out, {"part": "speed", "variant": name, "item": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "tiles_per_s": 8 / min(values), "seconds": values})


def report(out: Path) -> None:
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    for part, keys in (("simulator", ("ssim", "psnr", "de")),
                       ("mitos", ("ssim", "psnr", "de", "ssim4", "psnr4", "de4"))):
        rows = [r for r in records if r["part"] == part]
        if not rows:
            continue
        print(f"\n== {part}: " + ("8 target styles x 8 held-out PCam tiles" if part == "simulator"
                                   else "MITOS Aperio -> Hamamatsu, mean over slides"))
        print(f"{'variant':20s} {'items':>5s} " + " ".join(f"{k:>6s}" for k in keys))
        for name in dict.fromkeys(r["variant"] for r in rows):
            vals = [[r[k] for k in keys] for r in rows if r["variant"] == name]
            mean = np.mean(vals, axis=0)
            print(f"{name:20s} {len(vals):5d} " + " ".join(f"{v:6.3f}" if k.startswith("ssim") else f"{v:6.2f}"
                                                           for k, v in zip(keys, mean, strict=True)))
    speed = [r for r in records if r["part"] == "speed"]
    if speed:
        print("\n== speed, 8 tiles of 256x256, 2 CPU threads (best of the interleaved repeats)")
        for r in speed:
            print(f"{r['variant']:20s} {r['tiles_per_s']:6.2f} tiles/s  ({r['item']})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", type=Path, default=CHECKPOINTS / "stainfuser_1step")
    parser.add_argument("--teacher", type=Path, default=CHECKPOINTS / "stainfuser_small")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines of results (appended, resumable)")
    parser.add_argument("--parts", nargs="*", default=["simulator", "mitos", "speed"],
                        choices=["simulator", "mitos", "speed"])
    parser.add_argument("--variants", nargs="*", default=None,
                        help="a subset of the variant names (default: the models alone, no colour anchor)")
    parser.add_argument("--repeats", type=int, default=3, help="speed: interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    named = variants(args.student, args.teacher)
    unknown = sorted(set(args.variants or []) - set(named))
    if unknown:
        parser.error(f"--variants: expected names among {sorted(named)}, got {unknown}")
    named = {k: v for k, v in named.items() if (k in args.variants if args.variants else v[2] == "none")}
    if "simulator" in args.parts:
        simulator_part(named, args.out)
    root = shared_data_root()
    if "mitos" in args.parts:
        if root is None or not (root / "mitos_scanner_pairs").is_dir():
            print("\nshared data not found (GENPATH_SHARED_DATA): skipping the MITOS real-pair benchmark")
        else:
            mitos_part(named, root, args.out)
    if "speed" in args.parts:
        speed_part(named, args.out, args.repeats)
    report(args.out)


if __name__ == "__main__":
    main()
