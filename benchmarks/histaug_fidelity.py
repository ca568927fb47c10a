"""HistAug fidelity (per transform, against the identity baseline) and speed (against pixel augmentation + re-encoding).

Run: ``python benchmarks/histaug_fidelity.py [--model samples/checkpoints/histaug_small] [--n 512]``

Tiles are the 30% of ``../shared/data/pcam`` held out from encoder and HistAug training (stable
name hash, ``genpath.training.data.in_holdout``).

1. Fidelity: for each transform alone (every other key at its identity), params drawn per patch
   with the transform on, the cosine similarity between HistAug's prediction and the true
   ``embed(T(x, params))``, against the baseline "return the clean embedding". "all (training
   mix)" draws params like training did; "all on" switches every transform on at once.
2. Speed: embeddings per second of HistAug (one slide-wise draw, and per-patch draws) against
   pixel augmentation + re-encoding of the same patches, for the model's own encoder and, for
   a foundation-model-sized cost, a ViT-B/16 at 224 px (timm, random weights: speed does not
   depend on them) with an untrained HistAug of the same architecture for D=768.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from augment.functional import apply_augmentation_params
from augment.histaug import HistAugModel
from augment.params import identity_params
from augment.sampling import AugmentationSampler
from genpath.data import shared_data_root
from genpath.encoders.reference import load_encoder_reference
from genpath.io.images import read_image
from genpath.training.data import in_holdout

ROOT = Path(__file__).resolve().parents[1]


def embed(encoder: torch.nn.Module, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encoder(b) for b in images.split(batch)]).float()


def fidelity(model: HistAugModel, encoder: torch.nn.Module, tiles: torch.Tensor, clean: torch.Tensor,
             params: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean cosine (prediction vs truth, clean vs truth) for one params draw."""
    true = torch.cat([embed(encoder, apply_augmentation_params(t.float() / 255, {k: v[i: i + len(t)]
                                                                              for k, v in params.items()}))
                      for i, t in zip(range(0, len(tiles), 128), tiles.split(128), strict=True)])
    with torch.no_grad():
        pred = model(clean, params)
    cos = torch.nn.functional.cosine_similarity
    return float(cos(pred, true).mean()), float(cos(clean, true).mean())


def throughput(fn, n: int, repeat: int = 3) -> float:  # noqa: ANN001
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def speed(name: str, model: HistAugModel, encoder: torch.nn.Module, tiles: torch.Tensor) -> None:
    n = len(tiles)
    clean = embed(encoder, tiles)
    wsi = model.sample_params(n, mode="wsi", generator=torch.Generator().manual_seed(0))
    wsi_one = {k: v[:1] for k, v in wsi.items()}
    patch = model.sample_params(n, mode="patch", generator=torch.Generator().manual_seed(0))

    def pixel() -> None:
        for i in range(0, n, 128):
            embed(encoder, apply_augmentation_params(tiles[i: i + 128].float() / 255,
                                                     {k: v[i: i + 128] for k, v in patch.items()}))

    def feature(p: dict[str, torch.Tensor]):  # noqa: ANN202
        def run() -> None:
            with torch.no_grad():
                model(clean, p)
        return run

    px = throughput(pixel, n, repeat=1)
    fw, fp = throughput(feature(wsi_one), n), throughput(feature(patch), n)
    print(f"  {name:34s} pixel+encode {px:9.0f}/s   HistAug wsi {fw:9.0f}/s ({fw / px:6.1f}x)   "
          f"per-patch {fp:9.0f}/s ({fp / px:6.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "histaug_small")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--speed-n", type=int, default=1024)
    args = parser.parse_args()
    root = shared_data_root()
    if root is None:
        raise SystemExit("shared data not present (set GENPATH_SHARED_DATA)")
    model = HistAugModel.from_pretrained(str(args.model), dtype=torch.float32).eval()
    encoder = load_encoder_reference(args.model).eval()
    with open(root / "pcam" / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if in_holdout(r["path"], 0.3)]
    tiles = torch.stack([read_image(root / "pcam" / r["path"]) for r in rows[: args.n]])
    clean = embed(encoder, tiles)
    print(f"HistAug {args.model.name}: {len(tiles)} held-out PCam tiles, encoder {encoder.name} "
          f"(D={encoder.embed_dim}), {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters")
    print(f"\n{'transform':22s}{'HistAug cos':>13s}{'identity cos':>14s}{'gain':>8s}")
    g = torch.Generator().manual_seed(0)
    base = identity_params(model.keys, len(tiles))
    rows_out = []
    for name in model.sampler.transforms:
        one = AugmentationSampler([name], model.sampler.ranges, model.config.max_radius, p_each=1.0)
        params = {**base, **one.sample(len(tiles), mode="patch", generator=g)}
        rows_out.append((name, *fidelity(model, encoder, tiles, clean, params)))
    mix = model.sample_params(len(tiles), mode="patch", generator=g)
    rows_out.append(("all (training mix)", *fidelity(model, encoder, tiles, clean, mix)))
    full = AugmentationSampler(model.sampler.transforms, model.sampler.ranges, model.config.max_radius, 1.0)
    rows_out.append(("all on", *fidelity(model, encoder, tiles, clean, full.sample(len(tiles), generator=g))))
    for name, ours, ident in rows_out:
        print(f"{name:22s}{ours:13.4f}{ident:14.4f}{ours - ident:+8.4f}")

    print(f"\nspeed ({args.speed_n} patches, {torch.get_num_threads()} threads, best of 3; ratio = HistAug / pixel):")
    reps = (args.speed_n + len(tiles) - 1) // len(tiles)
    speed_tiles = tiles.repeat(reps, 1, 1, 1)[: args.speed_n]
    speed(f"{encoder.name} (D={encoder.embed_dim}, 96 px)", model, encoder, speed_tiles)
    try:
        import timm

        from genpath.encoders.entries import TimmEncoder

        vit = TimmEncoder(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), 224,
                          (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        big = HistAugModel(embed_dim=vit.embed_dim, **{k: model.config[k] for k in
                                                        ("num_chunks", "hidden_dim", "depth", "num_heads")}).eval()
        speed("ViT-B/16 224 px (D=768, untrained)", big, vit.eval(), speed_tiles[:128])
    except Exception as error:  # noqa: BLE001 - the comparison is optional
        print(f"  ViT-B/16 comparison skipped: {error}")


if __name__ == "__main__":
    main()
