"""Mask-conditioned synthesis: does the generated tissue follow the nuclei mask? One run.

Masks never used in training:

* ``he_hgsc_nest`` (BSD, shipped): the right quarter of the image (``region`` [0.75, 1] at the
  training scale 0.5), which ``configs/controlnet_hgsc.yaml`` never crops;
* MoNuSeg official test images (``$GENPATH_SHARED_DATA/monuseg``, CC BY-NC-SA; evaluation only,
  never trained on by any shipped model): by default the *shipped* ``--model`` is evaluated on
  them (skipped cleanly without the shared data); ``--monuseg-model DIR`` evaluates another model
  there instead (e.g. one trained by ``configs/controlnet_monuseg.yaml``, not shipped).

For each 64-px mask tile, samples with ControlNet scale 1 and scale 0 (the same model ignoring
the mask: the baseline) from the same seeds, styled by the real tile's embedding. Nuclei are
segmented on every image by colour deconvolution (scikit-image ``rgb2hed``, haematoxylin
channel) and Otsu's threshold: a simple segmenter with no training, applied identically to real
and generated tiles (:func:`genpath.metrics.nuclei.haematoxylin_foreground`); its Dice on the
*real* tiles is the ceiling this segmenter allows. Reported: Dice and IoU of the segmented
foreground against the conditioning mask, their ratio to the no-mask baseline, and KID
(Inception) of generated tiles against the real held-out tiles. Results also go to ``--out``
(JSON).

Run: ``python benchmarks/mask_adherence.py [--model samples/checkpoints/controlnet_hgsc] [--monuseg-model DIR]
[--compare DIR ...] [--sets hgsc,monuseg] [--max-tiles 120] [--steps 25] [--cache DIR]
[--out out/bench/mask_adherence.json]``
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from genpath.data import shared_data_root
from genpath.encoders import create_encoder
from genpath.encoders.reference import load_encoder_reference
from genpath.metrics.distribution import embed_images, kernel_inception_distance
from genpath.pipelines import MaskToImagePipeline
from genpath.training.mask_data import MaskTileDataset

ROOT = Path(__file__).resolve().parents[1]
#: (printed label, ControlNet conditioning scale, JSON key): scale 0 is the same model ignoring the mask.
SETTINGS = (("ControlNet scale 1", 1.0, "controlnet"), ("scale 0 (mask ignored)", 0.0, "no_mask"))


def segment_nuclei(images: torch.Tensor) -> np.ndarray:
    """Haematoxylin (rgb2hed) + per-image Otsu: uint8 ``(B,3,H,W)`` -> bool ``(B,H,W)``."""
    from genpath.metrics.nuclei import haematoxylin_foreground

    return haematoxylin_foreground(images.permute(0, 2, 3, 1).numpy())


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = (pred & truth).sum((1, 2))
    total = pred.sum((1, 2)) + truth.sum((1, 2))
    union = (pred | truth).sum((1, 2))
    return float(np.mean(2 * inter / np.maximum(total, 1))), float(np.mean(inter / np.maximum(union, 1)))


def held_out_tiles(sources: list[dict], scale: float, size: int = 64) -> tuple[torch.Tensor, ...]:
    """Non-overlapping tiles (with nuclei) of the given regions: images uint8, instances, types."""
    data = MaskTileDataset(sources, size, scale=scale, crops_per_image=1)
    images, insts, types = [], [], []
    for i, entry in enumerate(data.entries):
        image, inst, typ = data.load(i)
        h, w = inst.shape
        low, high = entry["region"]
        for y in range(0, h - size + 1, size):
            for x in range(round(low * w), round(high * w) - size + 1, size):
                if (inst[y : y + size, x : x + size] > 0).float().mean() > 0.02:
                    images.append(image[:, y : y + size, x : x + size])
                    insts.append(inst[y : y + size, x : x + size])
                    types.append(typ[y : y + size, x : x + size])
    return torch.stack(images), torch.stack(insts), torch.stack(types)


def _fingerprint(model: Path) -> str:
    import hashlib

    weights = sorted(Path(model).rglob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def generate(pipe: MaskToImagePipeline, inst: torch.Tensor, typed: torch.Tensor | None, emb: torch.Tensor,
             weight: float, steps: int, seed: int, cache: Path | None) -> torch.Tensor:
    """Sample one image per mask tile (seed ``seed + i`` for tile ``i``), uint8; reuses ``cache`` when it exists."""
    if cache is not None and cache.is_file():
        return torch.from_numpy(np.load(cache))
    out = []
    for start in range(0, len(inst), 16):
        sl = slice(start, start + 16)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(start, min(start + 16, len(inst)))]
        out.append(pipe(inst[sl], None if typed is None else typed[sl], embeddings=emb[sl],
                        controlnet_conditioning_scale=weight, num_inference_steps=steps, generator=gens).images)
    images = (torch.cat(out) * 255).round().to(torch.uint8)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".tmp.npy"), images.numpy())
        cache.with_suffix(".tmp.npy").replace(cache)
    return images


def evaluate(name: str, models: list[Path], sources: list[dict], scale: float, steps: int, seed: int,
             max_tiles: int | None = None, base: Path | None = None, cache: Path | None = None) -> dict:
    """Ceiling, no-mask baseline (scale 0: the base LDM alone, the same for every ControlNet over it)
    and each model at scale 1, on the same tiles, styles and seeds."""
    import time

    images, inst, types = held_out_tiles(sources, scale)
    if max_tiles is not None and len(images) > max_tiles:  # evenly spaced over all images
        keep = torch.linspace(0, len(images) - 1, max_tiles).round().long()
        images, inst, types = images[keep], inst[keep], types[keep]
    encoder = load_encoder_reference(models[0])
    with torch.no_grad():
        emb = encoder(images)
    truth = (inst > 0).numpy()
    inception = create_encoder("inception.fid")
    real_feats = embed_images(inception, images)
    tag = f"{name.split(',')[0].split()[0]}-{len(images)}t-{steps}s-{seed}"
    d, j = dice_iou(segment_nuclei(images), truth)
    record = {"set": name, "tiles": len(images), "steps": steps, "seed": seed, "ceiling": {"dice": d, "iou": j},
              "models": {}}
    print(f"\n== {name}: {len(images)} held-out 64-px mask tiles, {steps} steps, style = the real tile's embedding")
    header = f"{'images (ControlNet folder)':34s} {'Dice':>6s} {'IoU':>6s} {'KID x1e3 vs real':>18s}"
    print(f"{header} {'Dice/no-mask':>13s}")
    print(f"{'real tiles (ceiling)':34s} {d:6.3f} {j:6.3f}")

    def score(generated: torch.Tensor) -> dict:
        d, j = dice_iou(segment_nuclei(generated), truth)
        kid, kid_std = kernel_inception_distance(real_feats, embed_images(inception, generated), subsets=20,
                                                 subset_size=min(len(images), 50))
        return {"dice": d, "iou": j, "kid_x1e3": kid * 1e3, "kid_std_x1e3": kid_std * 1e3}

    for k, model in enumerate(models):
        light = base is not None and (Path(model) / "base.json").is_file()  # a ControlNet-only folder
        pipe = MaskToImagePipeline.from_pretrained(model, **({"base": base} if light else {}))
        typed = types if pipe.config.num_types else None
        runs = [("controlnet", 1.0)] if k else [("no_mask", 0.0), ("controlnet", 1.0)]
        for key, weight in runs:
            started = time.perf_counter()
            where = None if cache is None else cache / f"{tag}-{key}-{_fingerprint(model) if weight else 'base'}.npy"
            result = score(generate(pipe, inst, typed, emb, weight, steps, seed, where))
            seconds = time.perf_counter() - started
            if key == "no_mask":
                record["no_mask"] = result
                label = "scale 0 (mask ignored)"
            else:
                result["dice_ratio"] = result["dice"] / max(record["no_mask"]["dice"], 1e-8)
                result["share_of_ceiling"] = result["dice"] / max(record["ceiling"]["dice"], 1e-8)
                record["models"][str(model)] = result
                label = f"scale 1: {model.parent.name}/{model.name}"
            ratio = f"{result['dice_ratio']:.2f}x" if "dice_ratio" in result else ""
            kid = f"{result['kid_x1e3']:.2f}±{result['kid_std_x1e3']:.2f}"
            print(f"{label[:34]:34s} {result['dice']:6.3f} {result['iou']:6.3f} {kid:>18s} {ratio:>13s}"
                  f"  ({seconds:.0f} s)", flush=True)
    return record


def monuseg_test_sources(root: Path) -> list[dict]:
    """MoNuSeg official test images with their instance masks (evaluation only: CC BY-NC-SA)."""
    with open(root / "monuseg" / "manifest.csv", newline="") as handle:
        test = [r["stem"] for r in csv.DictReader(handle) if r["official_split"] == "test"]
    return [{"image": root / "monuseg" / "images" / f"{s}.png",
             "instances": root / "monuseg" / "instance_masks" / f"{s}.png"} for s in test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "controlnet_hgsc")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="more ControlNets over the same base, scored on the same tiles, seeds and baseline")
    parser.add_argument("--monuseg-model", type=Path, default=None,
                        help="evaluate this model on MoNuSeg instead of --model")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep generated tiles here (per set, model weights, steps, seed): reruns skip them")
    parser.add_argument("--base", type=Path, default=ROOT / "samples" / "checkpoints" / "ldm_small",
                        help="base LDM of ControlNet-only folders (checked against their base.json fingerprint)")
    parser.add_argument("--sets", default="hgsc,monuseg", help="comma-separated: hgsc, monuseg")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tiles", type=int, default=120, help="MoNuSeg: evaluate at most this many tiles")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/bench/mask_adherence.json"))
    args = parser.parse_args()
    sets = {s.strip() for s in args.sets.split(",") if s.strip()}
    if not sets or sets - {"hgsc", "monuseg"}:
        raise ValueError(f"--sets: expected some of hgsc, monuseg, got {args.sets!r}")
    torch.set_num_threads(args.threads)
    records = []
    if "hgsc" in sets:
        images = ROOT / "samples" / "images"
        hgsc = [{"image": images / "he_hgsc_nest.jpg", "instances": images / "he_hgsc_nest_inst_mask.npz",
                 "types": images / "he_hgsc_nest_type_mask.npz", "region": [0.75, 1.0]}]
        records.append(evaluate("he_hgsc_nest, right quarter (never trained on)", [args.model, *args.compare], hgsc,
                                0.5, args.steps, args.seed, base=args.base, cache=args.cache))
    root = shared_data_root()
    if "monuseg" in sets:
        if root is None or not (root / "monuseg" / "manifest.csv").is_file():
            print("shared data (monuseg) not found: skipping MoNuSeg")
        else:
            models = [args.monuseg_model] if args.monuseg_model else [args.model, *args.compare]
            records.append(evaluate("MoNuSeg official test images (never trained on)", models,
                                    monuseg_test_sources(root), 0.5, args.steps, args.seed, args.max_tiles,
                                    base=args.base, cache=args.cache))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
