"""Quality of the embedding-conditioned LDM, measured on held-out PatchCamelyon tiles.

Run: ``python benchmarks/synth_quality.py [--model samples/checkpoints/ldm_small] [--steps 20]
[--n-cond 120] [--n-ref 300] [--variations 2]``

All real tiles are the 30% of ``../shared/data/pcam`` held out from encoder, VAE and LDM
training (stable name hash, ``genpath.training.data.in_holdout``), centre-cropped to the
model's 64 px. They are shuffled (seed 0; labels.csv is sorted by label) and split into
disjoint sets: *conditions* (their embeddings
drive generation), *reference* (real tiles the samples are compared with), *classifier train*
(100 tiles) and *classifier test* (never used anywhere else).

0. The VAE alone: reconstruction SSIM/PSNR/L1 of the reference tiles.
1. KID/FD (Inception, and genpath-small's space) of conditional samples, of samples from the
   unconditional version of the same model (``guidance_scale=0``: only the null-token branch),
   and of the real condition tiles themselves (the floor), all against the reference set.
2. Conditioning: cosine similarity, in the conditioning encoder's space, between a sample and
   its own condition against other conditions, and top-1 retrieval of the own condition.
3. Utility: a small CNN classifier (normal vs tumour) trained on 100 real tiles, with and
   without ``--variations`` synthetic variations of each (same label), accuracy on the test tiles, 3 seeds.
4. Large images: seam score (border/interior gradient energy) of a 4×4-tile image from a real
   region's embedding grid, for independent tiles, shifted windows and overlapping windows.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from genpath.data import shared_data_root
from genpath.encoders import create_encoder
from genpath.io.images import read_image
from genpath.metrics.distribution import embed_images, frechet_distance, kernel_inception_distance
from genpath.pipelines import EmbeddingToImagePipeline
from genpath.pipelines.large_image import generate_large_image, seam_score
from genpath.synth import pipeline_encoder
from genpath.training.data import in_holdout

ROOT = Path(__file__).resolve().parents[1]


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    y, x = (h - size) // 2, (w - size) // 2
    return images[..., y : y + size, x : x + size].contiguous()


def generate(pipe, embeddings: torch.Tensor, steps: int, guidance: float, seed: int, batch: int = 64) -> torch.Tensor:
    """uint8 samples, one per embedding, with per-sample seeds ``seed + i``."""
    out = []
    for start in range(0, len(embeddings), batch):
        chunk = embeddings[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        out.append((images * 255).round().to(torch.uint8))
    return torch.cat(out)


def distances(real: np.ndarray, fake: np.ndarray) -> tuple[float, float, float]:
    kid, kid_std = kernel_inception_distance(real, fake, subsets=50, subset_size=min(100, len(real), len(fake)))
    return frechet_distance(real, fake), kid, kid_std


class TileClassifier(torch.nn.Module):
    """A small CNN (4 conv blocks, global pooling) for 64-px tiles."""

    def __init__(self) -> None:
        super().__init__()
        layers, c = [], 3
        for width in (16, 32, 64, 64):
            layers += [torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
            c = width
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train_classifier(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seed: int,
                     steps: int = 400, batch: int = 32) -> float:
    """Train from scratch with flips/rot90 and return test accuracy."""
    torch.manual_seed(seed)
    model = TileClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    xf = x.float() / 255
    for _ in range(steps):
        idx = torch.randint(0, len(xf), (batch,))
        xb = xf[idx]
        if torch.rand(()) < 0.5:
            xb = xb.flip(-1)
        xb = torch.rot90(xb, int(torch.randint(0, 4, ())), (-2, -1))
        loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b.float() / 255).argmax(1) for b in test_x.split(256)])
    return float((pred == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "ldm_small")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--n-cond", type=int, default=200)
    parser.add_argument("--n-ref", type=int, default=300)
    parser.add_argument("--variations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = shared_data_root()
    if root is None:
        raise SystemExit("shared data not present (set GENPATH_SHARED_DATA)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = EmbeddingToImagePipeline.from_pretrained(args.model)
    encoder = pipeline_encoder(args.model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with open(root / "pcam" / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if in_holdout(r["path"], 0.3)]
    # labels.csv is sorted by label: shuffle (fixed seed) so every split holds both classes
    rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()]
    tiles = centre_crop(torch.stack([read_image(root / "pcam" / r["path"]) for r in rows]), size)
    labels = torch.tensor([int(r["label"]) for r in rows])
    n_cond, n_ref = args.n_cond, args.n_ref
    cond, ref = slice(0, n_cond), slice(n_cond, n_cond + n_ref)
    clf_train, clf_test = slice(n_cond + n_ref, n_cond + n_ref + 100), slice(n_cond + n_ref + 100, None)
    print(f"{len(rows)} held-out PCam tiles at {size}px: {n_cond} conditions, {n_ref} reference, 100 classifier "
          f"train, {len(rows) - n_cond - n_ref - 100} classifier test; {args.steps} steps, guidance {args.guidance}")
    t0 = time.perf_counter()
    emb = torch.from_numpy(embed_images(encoder, tiles)).float()

    # 0. the VAE alone: reconstruction of the held-out reference tiles (posterior mean)
    from kornia.metrics import psnr, ssim

    from genpath.models.vae import decode_tiled, encode_tiled

    with torch.no_grad():
        real = tiles[ref].float() / 255
        recon = torch.cat([decode_tiled(pipe.vae, encode_tiled(pipe.vae, b)) for b in real.split(64)])
    print(f"VAE reconstruction of {len(real)} held-out tiles: SSIM {float(ssim(recon, real, 7).mean()):.3f}, "
          f"PSNR {float(psnr(recon, real, 1.0)):.2f} dB, L1 {float((recon - real).abs().mean()):.4f}")

    # 1. KID / FD against the reference tiles
    samples_c = generate(pipe, emb[cond], args.steps, args.guidance, args.seed)
    samples_u = generate(pipe, emb[cond], args.steps, 0.0, args.seed)
    print(f"generated {2 * n_cond} samples in {time.perf_counter() - t0:.0f}s")
    spaces = {"inception.fid": create_encoder("inception.fid"), "genpath-small": encoder}
    print(f"\n{'set vs reference':34s}" + "".join(f"{s + ' FD':>20s}{s + ' KID×1e3':>24s}" for s in spaces))
    feats = {name: {"ref": embed_images(e, tiles[ref])} for name, e in spaces.items()}
    for label, images in (("real condition tiles (floor)", tiles[cond]), ("conditional LDM", samples_c),
                          ("unconditional (same model)", samples_u)):
        line = f"{label:34s}"
        for name, e in spaces.items():
            fd, kid, kid_std = distances(feats[name]["ref"], embed_images(e, images))
            line += f"{fd:20.2f}{f'{kid * 1e3:.2f}±{kid_std * 1e3:.2f}':>24s}"
        print(line)

    # 2. conditioning: own condition vs others
    k, n = 4, 32
    reps = emb[cond][:n].repeat_interleave(k, 0)
    var = generate(pipe, reps, args.steps, args.guidance, args.seed + 10_000)
    var_emb = torch.nn.functional.normalize(torch.from_numpy(embed_images(encoder, var)).float(), dim=1)
    cond_emb = torch.nn.functional.normalize(emb[cond][:n], dim=1)
    sim = var_emb @ cond_emb.T  # (n·k, n)
    own = torch.arange(n).repeat_interleave(k)
    same = sim[torch.arange(n * k), own].mean()
    other = sim[torch.ones_like(sim, dtype=torch.bool).scatter_(1, own[:, None], False)].mean()
    top1 = (sim.argmax(1) == own).float().mean()
    pair = var_emb @ var_emb.T
    group = own[:, None] == own[None]
    off = ~torch.eye(n * k, dtype=torch.bool)
    print(f"\nconditioning ({n} conditions × {k} samples, cosine in the conditioning encoder's space):")
    print(f"  sample vs own condition {same:.3f}, vs other conditions {other:.3f}, top-1 retrieval {top1:.3f} "
          f"(chance {1 / n:.3f})")
    print(f"  sample vs sample: same condition {pair[group & off].mean():.3f}, different {pair[~group].mean():.3f}")

    # 3. utility for a small classifier
    tx, ty = tiles[clf_train], labels[clf_train]
    syn = generate(pipe, emb[clf_train].repeat_interleave(args.variations, 0), args.steps, args.guidance,
                   args.seed + 20_000)
    sy = ty.repeat_interleave(args.variations)
    test_x, test_y = tiles[clf_test], labels[clf_test]
    print(f"\nclassifier: 100 real tiles ({int(ty.sum())} tumour), +{len(syn)} synthetic variations; "
          f"{len(test_y)} test tiles ({int(test_y.sum())} tumour)")
    results: dict[str, list[float]] = {"real only": [], "real + synthetic": [], "synthetic only": []}
    for seed in range(3):
        results["real only"].append(train_classifier(tx, ty, test_x, test_y, seed))
        results["real + synthetic"].append(train_classifier(torch.cat([tx, syn]), torch.cat([ty, sy]), test_x,
                                                            test_y, seed))
        results["synthetic only"].append(train_classifier(syn, sy, test_x, test_y, seed))
    for name, accs in results.items():
        runs = ", ".join(f"{a:.3f}" for a in accs)
        print(f"  {name:18s} accuracy {np.mean(accs):.3f} ± {np.std(accs):.3f}  ({runs})")

    # 4. large image from a real region's embedding grid
    image = read_image(ROOT / "samples" / "images" / "he_hgsc_nest.jpg")
    region = image[:, :4 * size, :4 * size]
    cells = region.unfold(1, size, size).unfold(2, size, size).permute(1, 2, 0, 3, 4).reshape(16, 3, size, size)
    grid = torch.from_numpy(embed_images(encoder, cells)).float().reshape(4, 4, -1)
    real_seams = seam_score(region.float() / 255, size)
    print(f"\nlarge image 4×4 tiles ({4 * size}px), seam score (1 = no seams; real region {real_seams:.3f}):")
    indep = generate(pipe, grid.reshape(16, -1), args.steps, args.guidance, args.seed)
    mosaic = indep.reshape(4, 4, 3, size, size).permute(2, 0, 3, 1, 4).reshape(3, 4 * size, 4 * size)
    print(f"  independent tiles   {seam_score(mosaic.float() / 255, size):.3f}  cost 1.00x")
    for mode in ("shifted", "overlap"):
        start = time.perf_counter()
        res = generate_large_image(pipe, grid, args.steps, args.guidance, torch.Generator().manual_seed(args.seed),
                                   mode=mode)
        print(f"  {mode:18s}  {seam_score(res.images, size):.3f}  cost {res.cost_ratio:.2f}x "
              f"({time.perf_counter() - start:.1f}s)")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
