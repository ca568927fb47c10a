"""Mask-conditioned synthesis: does the generated tissue follow the nuclei mask? One run.

Masks never used in training:

* ``he_hgsc_nest`` (BSD, shipped): the right quarter of the image (``region`` [0.75, 1] at the
  training scale 0.5), which ``configs/controlnet_hgsc.yaml`` never crops;
* MoNuSeg official test images (``$GENPATH_SHARED_DATA/monuseg``, CC BY-NC-SA) with
  ``--monuseg-model`` (a ControlNet trained by ``configs/controlnet_monuseg.yaml``, not shipped).

For each 64-px mask tile, samples with ControlNet scale 1 and scale 0 (the same model ignoring
the mask: the baseline) from the same seeds, styled by the real tile's embedding. Nuclei are
segmented on every image by colour deconvolution (scikit-image ``rgb2hed``, haematoxylin
channel) and Otsu's threshold: a simple segmenter with no training, applied identically to real
and generated tiles; its Dice on the *real* tiles is the ceiling this segmenter allows. Reported:
Dice and IoU of the segmented foreground against the conditioning mask, and KID (Inception) of
generated tiles against the real held-out tiles.

Run: ``python benchmarks/mask_adherence.py [--model samples/checkpoints/controlnet_hgsc] [--monuseg-model DIR]
[--max-tiles 120]``
"""

from __future__ import annotations

import argparse
import csv
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


def segment_nuclei(images: torch.Tensor) -> np.ndarray:
    """Haematoxylin (rgb2hed) + per-image Otsu: uint8 ``(B,3,H,W)`` -> bool ``(B,H,W)``."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    out = []
    for image in images.permute(0, 2, 3, 1).numpy():
        h = rgb2hed(image)[..., 0]
        out.append(h > threshold_otsu(h) if np.ptp(h) > 1e-6 else np.zeros(h.shape, bool))
    return np.stack(out)


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


def evaluate(name: str, model: Path, sources: list[dict], scale: float, steps: int, seed: int,
             max_tiles: int | None = None, base: Path | None = None) -> None:
    pipe = MaskToImagePipeline.from_pretrained(model, **({"base": base} if base else {}))
    encoder = load_encoder_reference(model)
    images, inst, types = held_out_tiles(sources, scale)
    if max_tiles is not None and len(images) > max_tiles:  # evenly spaced over all images
        keep = torch.linspace(0, len(images) - 1, max_tiles).round().long()
        images, inst, types = images[keep], inst[keep], types[keep]
    with torch.no_grad():
        emb = encoder(images)
    typed = types if pipe.config.num_types else None
    results = {}
    for label, weight in (("ControlNet scale 1", 1.0), ("scale 0 (mask ignored)", 0.0)):
        out = []
        for start in range(0, len(images), 16):
            sl = slice(start, start + 16)
            gens = [torch.Generator().manual_seed(seed + i) for i in range(start, min(start + 16, len(images)))]
            out.append(pipe(inst[sl], None if typed is None else typed[sl], embeddings=emb[sl],
                            controlnet_conditioning_scale=weight, num_inference_steps=steps, generator=gens).images)
        results[label] = (torch.cat(out) * 255).round().to(torch.uint8)
    truth = (inst > 0).numpy()
    inception = create_encoder("inception.fid")
    real_feats = embed_images(inception, images)
    print(f"\n== {name}: {len(images)} held-out 64-px mask tiles, {steps} steps, style = the real tile's embedding")
    print(f"{'images':28s} {'Dice':>6s} {'IoU':>6s} {'KID x1e3 vs real':>18s}")
    d, j = dice_iou(segment_nuclei(images), truth)
    print(f"{'real tiles (ceiling)':28s} {d:6.3f} {j:6.3f} {'':>18s}")
    for label, generated in results.items():
        d, j = dice_iou(segment_nuclei(generated), truth)
        kid, kid_std = kernel_inception_distance(real_feats, embed_images(inception, generated), subsets=20,
                                                 subset_size=min(len(images), 50))
        print(f"{label:28s} {d:6.3f} {j:6.3f} {f'{kid * 1e3:.2f}±{kid_std * 1e3:.2f}':>18s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "controlnet_hgsc")
    parser.add_argument("--monuseg-model", type=Path, default=None)
    parser.add_argument("--base", type=Path, default=ROOT / "samples" / "checkpoints" / "ldm_small",
                        help="base LDM of ControlNet-only folders (checked against their base.json fingerprint)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tiles", type=int, default=120, help="MoNuSeg: evaluate at most this many tiles")
    args = parser.parse_args()
    torch.set_num_threads(2)
    images = ROOT / "samples" / "images"
    hgsc = [{"image": images / "he_hgsc_nest.jpg", "instances": images / "he_hgsc_nest_inst_mask.npz",
             "types": images / "he_hgsc_nest_type_mask.npz", "region": [0.75, 1.0]}]
    evaluate("he_hgsc_nest, right quarter (never trained on)", args.model, hgsc, 0.5, args.steps, args.seed,
             base=args.base)
    root = shared_data_root()
    if args.monuseg_model is not None:
        if root is None:
            print("shared data not found: skipping MoNuSeg")
            return
        with open(root / "monuseg" / "manifest.csv", newline="") as handle:
            test = [r["stem"] for r in csv.DictReader(handle) if r["official_split"] == "test"]
        sources = [{"image": root / "monuseg" / "images" / f"{s}.png",
                    "instances": root / "monuseg" / "instance_masks" / f"{s}.png"} for s in test]
        evaluate("MoNuSeg official test images", args.monuseg_model, sources, 0.5, args.steps, args.seed,
                 args.max_tiles, base=args.base)


if __name__ == "__main__":
    main()
