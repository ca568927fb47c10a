"""H&E → HER2-IHC translation on BCI pairs never used in training. One run.

Pairs: ``$GENPATH_SHARED_DATA/he_ihc_pairs/bci_her2`` (non-commercial licence), the 8 pairs of
split ``test``; the translators train on the 5 ``train`` pairs (split by pair, never by crop).
Images are read at half resolution (512 px), as the training configs do.

Methods: the H&E unchanged; a global colour transfer to IHC statistics (Reinhard, fitted on the
5 training IHC images); the VAE's reconstruction of the *true* IHC (the ceiling of any
latent-space translator over that VAE, not a translator); the one-step ASP generator
(``--gan``); the diffusion translator at 1 and 4 steps (``--diffusion``).

Measures, per test image then averaged: PSNR and SSIM against the true IHC (consecutive
sections: both barely separate methods; published BCI results sit at PSNR 14-21, SSIM 0.2-0.48);
DAB agreement, the Pearson correlation of DAB density (H-DAB colour deconvolution) after 32×
mean pooling (16×16 maps), per image; DAB-positive area fraction (DAB OD > 0.2) per image,
reported as mean absolute error and as Pearson correlation across the 8 images against the true
fractions; KID (Inception) of 64-px tiles cut from the outputs against tiles of the true IHC.

Run: ``python benchmarks/translation_bci.py --gan out/train/translator_bci_gan/pipeline [MORE_GAN_DIRS]
--diffusion out/train/translator_bci_diffusion/pipeline``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genpath.data import shared_data_root
from genpath.encoders import create_encoder
from genpath.io.images import read_image
from genpath.metrics.distribution import embed_images, kernel_inception_distance
from genpath.metrics.image import psnr, ssim
from genpath.translation.data import pairs_from_layout
from genpath.translation.stains import dab_correlation, dab_positive_fraction, looks_like_ihc

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path, scale: float) -> torch.Tensor:
    image = read_image(path)[None].float()
    h, w = (round(s * scale) for s in image.shape[-2:])
    return (F.interpolate(image, size=(h, w), mode="area").round() / 255).clamp(0, 1)


def tiles(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    b, c, h, w = images.shape
    t = images[:, :, : h - h % size, : w - w % size].unfold(2, size, size).unfold(3, size, size)
    return (t.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, size, size) * 255).round().to(torch.uint8)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def main() -> None:
    from genpath.models.vae import decode_tiled, encode_tiled, load_vae
    from genpath.pipelines import Translator
    from normalization import ReinhardNormalizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--gan", type=Path, nargs="*", default=[], help="one or more generator pipeline folders")
    parser.add_argument("--diffusion", type=Path, default=None)
    parser.add_argument("--vae", type=Path, default=ROOT / "samples" / "checkpoints" / "vae_small")
    parser.add_argument("--scale", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = shared_data_root()
    if root is None or not (root / "he_ihc_pairs" / "bci_her2").is_dir():
        raise SystemExit("shared data not present (set GENPATH_SHARED_DATA): he_ihc_pairs/bci_her2 is needed")
    folder = root / "he_ihc_pairs" / "bci_her2"
    train, test = pairs_from_layout(folder, "csv", "train"), pairs_from_layout(folder, "csv", "test")
    he = torch.cat([load(p.he, args.scale) for p in test])
    ihc = torch.cat([load(p.ihc, args.scale) for p in test])
    print(f"BCI HER2: {len(test)} test pairs ({', '.join(p.name for p in test)}), {len(train)} training pairs; "
          f"{tuple(he.shape[-2:])} px")
    print(f"IHC check on the inputs: H&E flagged as IHC {int(looks_like_ihc(he).sum())}/{len(he)}, "
          f"true IHC flagged {int(looks_like_ihc(ihc).sum())}/{len(ihc)}")

    outputs: dict[str, torch.Tensor] = {"H&E unchanged": he}
    targets = [load(p.ihc, args.scale)[0] for p in train]
    outputs["global colour transfer (Reinhard)"] = ReinhardNormalizer().fit(targets)(he)
    vae = load_vae(str(args.vae)).eval()
    with torch.no_grad():
        outputs["VAE recon of true IHC (ceiling)"] = decode_tiled(vae, encode_tiled(vae, ihc), tile=512).clamp(0, 1)
    seconds: dict[str, float] = {}
    for gan in args.gan:
        translator = Translator(gan)
        label = f"ASP generator, {translator.pipe.translator.config.upsampling} (1 pass)"
        start = time.perf_counter()
        with torch.no_grad():
            outputs[label] = torch.cat([translator(he[i : i + 1]) for i in range(len(he))])
        seconds[label] = time.perf_counter() - start
    if args.diffusion is not None:
        for steps in (1, 4):
            translator = Translator(args.diffusion, num_inference_steps=steps)
            start = time.perf_counter()
            with torch.no_grad():
                name = f"diffusion, {steps} step{'s' if steps > 1 else ''}"
                outputs[name] = torch.cat([translator(he[i : i + 1]) for i in range(len(he))])
            seconds[name] = time.perf_counter() - start

    inception = create_encoder("inception.fid")
    real = embed_images(inception, tiles(ihc))
    true_fraction = dab_positive_fraction(ihc).numpy()
    print(f"true DAB-positive fractions: {np.round(true_fraction, 3).tolist()}")
    header = (f"{'method':36s} {'PSNR':>6s} {'SSIM':>6s} {'DABr':>6s} {'DAB+MAE':>8s} {'DAB+r':>6s} "
              f"{'KIDx1e3':>12s} {'s/img':>6s}")
    print("\n" + header)
    for name, out in outputs.items():
        out = out.float().clamp(0, 1)
        frac = dab_positive_fraction(out).numpy()
        corr = dab_correlation(out, ihc, pool=32).numpy()
        kid, kid_std = kernel_inception_distance(real, embed_images(inception, tiles(out)), subsets=20,
                                                 subset_size=200)
        per_image = f"{seconds[name] / len(he):6.2f}" if name in seconds else f"{'':>6s}"
        print(f"{name:36s} {psnr(out, ihc).mean():6.2f} {ssim(out, ihc).mean():6.3f} {np.nanmean(corr):6.3f} "
              f"{np.abs(frac - true_fraction).mean():8.3f} {pearson(frac, true_fraction):6.3f} "
              f"{f'{kid * 1e3:.1f}±{kid_std * 1e3:.1f}':>12s} {per_image}")


if __name__ == "__main__":
    main()
