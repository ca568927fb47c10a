"""Does genpath's synthetic data help a low-data nuclei segmenter? One seeded run, a few CPU minutes.

Setting: a tiny U-Net (widths 8-16-32, 64-px tiles) learns nuclei foreground from only ``--real``
labelled real tiles: 64-px tiles of the BSD ``he_hgsc_nest`` image (left three quarters, scale
0.5, its ground-truth masks). Arms, each trained ``--seeds`` times for ``--steps`` steps, every
batch half real tiles and half the arm's extra pairs (all with random flips/rotations):

* ``real``: the real tiles only (the whole batch);
* ``+ synthetic (labelled masks)``: ControlNet pairs whose masks are new layouts of the
  labelled tiles' masks (dihedral turns, nuclei moved, dropped and duplicated) styled by the
  labelled tiles' embeddings: nothing beyond the labelled set is used;
* ``+ synthetic (pseudo masks)``: ControlNet pairs from masks the classical segmenter
  (:func:`genpath.metrics.nuclei.segment_nuclei`) draws on unlabelled shippable H&E (hgsc
  stroma, tiatoolbox target, CRC tiles, PCam outside its hold-out), styled by those crops;
* ``+ pseudo-labelled real``: the same unlabelled crops with those classical masks as labels
  (the non-generative alternative the previous arm must beat);
* ``reference``: all labelled tiles of the nest's left three quarters, no extra pairs (what
  more real labels would give; the ControlNet itself was trained on all of them).
* ``filtered``: only the better half of the synthetic pairs by mask adherence (Dice of the
  classical foreground of the generated image against its mask); the pseudo-mask pairs are used
  filtered only.

For each 64-px mask the ControlNet (``--model``, default the shipped ``controlnet_hgsc``) draws one
image (``--sample-steps`` DDIM steps, seeded); the label is the conditioning mask. Test sets, never
trained on: the MoNuSeg official test images (``$GENPATH_SHARED_DATA/monuseg``, CC BY-NC-SA;
evaluation only) and the held-out right quarter of ``he_hgsc_nest``. Reported: mean per-tile Dice
of the thresholded prediction (mean ± std over seeds, and the paired gain over ``real``), next to
the classical segmenter's Dice on the same tiles. Generated pairs and each arm's scores are cached
(``--cache``) per model weights and settings, so a rerun skips what is done (the arms without
generated pairs are shared by all models).

Run: ``python benchmarks/synth_utility.py [--model samples/checkpoints/controlnet_hgsc] [--real 8]
[--synthetic 64] [--seeds 3] [--steps 200] [--out out/bench/synth_utility.json]``
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mask_adherence import _fingerprint, dice_iou, held_out_tiles, monuseg_test_sources  # noqa: E402

from genpath.data import shared_data_root  # noqa: E402
from genpath.metrics.nuclei import haematoxylin_foreground  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "samples" / "images"
HGSC = {"image": IMAGES / "he_hgsc_nest.jpg", "instances": IMAGES / "he_hgsc_nest_inst_mask.npz",
        "types": IMAGES / "he_hgsc_nest_type_mask.npz"}


class TinyUNet(nn.Module):
    """Two-level U-Net, widths ``(w, 2w, 4w)``: ``(B,3,H,W)`` in [0,1] -> logits ``(B,H,W)``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU())

        w = width
        self.down1, self.down2, self.mid = block(3, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2, self.up1 = block(6 * w, 2 * w), block(3 * w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down1(x * 2 - 1)
        b = self.down2(F.avg_pool2d(a, 2))
        c = self.mid(F.avg_pool2d(b, 2))
        b = self.up2(torch.cat([b, F.interpolate(c, scale_factor=2.0)], 1))
        return self.head(self.up1(torch.cat([a, F.interpolate(b, scale_factor=2.0)], 1)))[:, 0]


def dihedral(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randint(0, 4, (len(x),), generator=g).tolist()
    flip = torch.rand(len(x), generator=g).lt(0.5).tolist()
    xs = [torch.rot90(x[i], k[i], (-2, -1)).flip(-1) if flip[i] else torch.rot90(x[i], k[i], (-2, -1))
          for i in range(len(x))]
    ys = [torch.rot90(y[i], k[i], (-2, -1)).flip(-1) if flip[i] else torch.rot90(y[i], k[i], (-2, -1))
          for i in range(len(y))]
    return torch.stack(xs), torch.stack(ys)


def train_segmenter(real: tuple[torch.Tensor, torch.Tensor], extra: tuple[torch.Tensor, torch.Tensor] | None,
                    steps: int, seed: int, batch: int = 16) -> TinyUNet:
    """Adam, BCE + soft Dice; each batch half real, half ``extra`` (all real when None)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = TinyUNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        n_real = batch if extra is None else batch // 2
        i = torch.randint(0, len(real[0]), (n_real,), generator=g)
        x, y = real[0][i], real[1][i]
        if extra is not None:
            j = torch.randint(0, len(extra[0]), (batch - n_real,), generator=g)
            x, y = torch.cat([x, extra[0][j]]), torch.cat([y, extra[1][j]])
        x, y = dihedral(x.float() / 255, y.float(), g)
        logits = net(x)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y).sum((1, 2)) + 1) / (p.sum((1, 2)) + y.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y) + dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def predict(net: TinyUNet, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([net(x.float() / 255) > 0 for x in images.split(64)]).numpy()


def labelled_tiles(count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (None: all) evenly spaced 64-px tiles (with nuclei) of the nest's left three quarters.

    Returns uint8 images and instance maps.
    """
    images, inst, _ = held_out_tiles([{**HGSC, "region": [0.0, 0.75]}], 0.5)
    if count is None:
        return images, inst
    keep = torch.linspace(0, len(images) - 1, count).round().long()
    return images[keep], inst[keep]


def relayout(inst: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """New mask layouts from labelled masks: dihedral turns, then nuclei moved, dropped and duplicated."""
    from genpath.masks import drop_nuclei, duplicate_nuclei, move_nuclei

    g = torch.Generator().manual_seed(seed)
    out = inst.repeat(copies, 1, 1)
    k = torch.randint(0, 4, (len(out),), generator=g).tolist()
    out = torch.stack([torch.rot90(m, r, (0, 1)) for m, r in zip(out, k, strict=True)])
    out, _ = move_nuclei(out, None, fraction=0.5, max_shift=16, generator=g)
    out, _ = drop_nuclei(out, None, fraction=0.2, generator=g)
    out, _ = duplicate_nuclei(out, None, fraction=0.2, generator=g)
    return out


def unlabelled_crops(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of shippable H&E without masks, with classical masks (the ControlNet config's generated sources)."""
    from genpath.training.mask_data import MaskTileDataset

    sources = [{"generated": IMAGES / "he_hgsc_stroma.jpg"}, {"generated": IMAGES / "he_tiatoolbox_target.png"},
               {"generated": ROOT / "samples" / "tiles" / "crc", "scale": 1.0}]
    root = shared_data_root()
    if root is not None and (root / "pcam" / "test").is_dir():
        sources.append({"generated": root / "pcam" / "test", "holdout": 0.3, "limit": 64, "scale": 2.0})
    data = MaskTileDataset(sources, 64, scale=0.5, crops_per_image=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    images, inst = [], []
    while len(images) < count:  # crops with some nuclei, sources weighted by image
        entry = int(torch.randint(0, len(data.entries), (1,), generator=g))
        image, masks, _ = data.load(entry)
        y = int(torch.randint(0, image.shape[-2] - 63, (1,), generator=g))
        x = int(torch.randint(0, image.shape[-1] - 63, (1,), generator=g))
        crop = masks[y : y + 64, x : x + 64]
        if (crop > 0).float().mean() > 0.05:
            images.append(image[:, y : y + 64, x : x + 64])
            inst.append(crop)
    return torch.stack(images), torch.stack(inst)


def synthesize(model: Path, base: Path, inst: torch.Tensor, styles: torch.Tensor, steps: int, seed: int,
               cache: Path) -> torch.Tensor:
    """One ControlNet image per mask (seed ``seed + i``), styled by ``styles`` (uint8 tiles); cached."""
    from genpath.encoders.reference import load_encoder_reference
    from genpath.pipelines import MaskToImagePipeline

    if cache.is_file():
        return torch.from_numpy(np.load(cache))
    pipe = MaskToImagePipeline.from_pretrained(model, base=base)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        emb = load_encoder_reference(model)(styles)
    out = []
    for start in range(0, len(inst), 16):
        sl = slice(start, start + 16)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(start, min(start + 16, len(inst)))]
        out.append(pipe(inst[sl], None, embeddings=emb[sl], num_inference_steps=steps, generator=gens).images)
    images = (torch.cat(out) * 255).round().to(torch.uint8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, images.numpy())
    return images


def adherence(images: torch.Tensor, inst: torch.Tensor) -> np.ndarray:
    """Per-pair Dice of the classical foreground of ``images`` against ``inst > 0``."""
    pred = haematoxylin_foreground(images.permute(0, 2, 3, 1).numpy())
    truth = (inst > 0).numpy()
    return 2 * (pred & truth).sum((1, 2)) / np.maximum(pred.sum((1, 2)) + truth.sum((1, 2)), 1)


def best_half(images: torch.Tensor, inst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = np.argsort(-adherence(images, inst), kind="stable")[: len(images) // 2]
    keep = torch.from_numpy(order.copy())
    return images[keep], inst[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "controlnet_hgsc")
    parser.add_argument("--base", type=Path, default=ROOT / "samples" / "checkpoints" / "ldm_small")
    parser.add_argument("--real", type=int, default=8, help="labelled real tiles")
    parser.add_argument("--synthetic", type=int, default=64, help="generated pairs per synthetic source")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="segmenter training steps")
    parser.add_argument("--max-tiles", type=int, default=120, help="MoNuSeg test tiles")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("out/bench/synth_utility_cache"))
    parser.add_argument("--out", type=Path, default=Path("out/bench/synth_utility.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    real_images, real_inst = labelled_tiles(args.real)
    real = (real_images, (real_inst > 0).to(torch.uint8))
    copies = -(-args.synthetic // args.real)
    layouts = relayout(real_inst, copies, seed=1)[: args.synthetic]
    layout_styles = real_images.repeat(copies, 1, 1, 1)[: args.synthetic]
    pseudo_images, pseudo_inst = unlabelled_crops(args.synthetic, seed=2)
    tag = f"{_fingerprint(args.model)}-{args.real}r-{args.synthetic}n-{args.sample_steps}s"
    synth_layouts = synthesize(args.model, args.base, layouts, layout_styles, args.sample_steps, 10,
                               args.cache / f"layouts-{tag}.npy")
    synth_pseudo = synthesize(args.model, args.base, pseudo_inst, pseudo_images, args.sample_steps, 20_000,
                              args.cache / f"pseudo-{tag}.npy")
    generated_s = time.perf_counter() - started
    arms = {  # (images, instances) of each arm's extra pairs
        "real": None,
        "+ synthetic (labelled masks)": (synth_layouts, layouts),
        "+ synthetic (labelled masks), filtered": best_half(synth_layouts, layouts),
        "+ synthetic (pseudo masks), filtered": best_half(synth_pseudo, pseudo_inst),
        "+ pseudo-labelled real": (pseudo_images, pseudo_inst),
    }
    arms = {k: v if v is None else (v[0], (v[1] > 0).to(torch.uint8)) for k, v in arms.items()}

    tests = {"hgsc right quarter": held_out_tiles([{**HGSC, "region": [0.75, 1.0]}], 0.5)[:2]}
    root = shared_data_root()
    if root is not None and (root / "monuseg" / "manifest.csv").is_file():
        images, inst, _ = held_out_tiles(monuseg_test_sources(root), 0.5)
        keep = torch.linspace(0, len(images) - 1, min(args.max_tiles, len(images))).round().long()
        tests["MoNuSeg test"] = (images[keep], inst[keep])
    else:
        print("shared data (monuseg) not found: testing on the hgsc hold-out only")

    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "adherence": {"labelled masks": float(adherence(synth_layouts, layouts).mean()),
                                   "pseudo masks": float(adherence(synth_pseudo, pseudo_inst).mean())},
                     "classical": {}, "arms": {}}
    for name, (images, inst) in tests.items():
        results["classical"][name] = dice_iou(haematoxylin_foreground(images.permute(0, 2, 3, 1).numpy()),
                                              (inst > 0).numpy())[0]
    all_images, all_inst = labelled_tiles(None)
    reference = f"reference: all {len(all_images)} labelled tiles"
    arms[reference] = None
    for arm, extra in arms.items():
        pool = (all_images, (all_inst > 0).to(torch.uint8)) if arm == reference else real
        # per-arm scores are kept: arms without generated pairs do not depend on the model
        uses_model = "synthetic" in arm
        key = f"{tag if uses_model else f'{args.real}r-{args.synthetic}n'}-{args.steps}st-{args.seeds}sd-" \
              f"{len(tests)}t-{args.max_tiles}"
        stem = "".join(c if c.isalnum() else "_" for c in arm)
        done = args.cache / f"arm-{stem}-{key}.json"
        if done.is_file():
            scores = json.loads(done.read_text())
        else:
            scores = {name: [] for name in tests}
            for seed in range(args.seeds):
                net = train_segmenter(pool, extra, args.steps, seed)
                for name, (images, inst) in tests.items():
                    scores[name].append(dice_iou(predict(net, images), (inst > 0).numpy())[0])
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(scores))
        results["arms"][arm] = {"real_tiles": len(pool[0]), "extra_pairs": 0 if extra is None else len(extra[0]),
                                "dice": scores}
        print(f"{arm:42s} " + "  ".join(f"{n}: {np.mean(s):.3f}±{np.std(s):.3f}" for n, s in scores.items()),
              flush=True)
    base_scores = results["arms"]["real"]["dice"]
    for record in results["arms"].values():
        record["gain_over_real"] = {n: float(np.mean(np.subtract(s, base_scores[n]))) for n, s in
                                    record["dice"].items()}
    results["seconds"] = {"generation": generated_s, "total": time.perf_counter() - started}

    print(f"\n== nuclei segmenter from {args.real} labelled real tiles, {args.seeds} seeds x {args.steps} steps; "
          f"{args.synthetic} generated pairs per source ({args.sample_steps} sampling steps)")
    names = list(tests)
    print(f"{'training data':42s} " + " ".join(f"{n + ' Dice':>22s} {'gain':>7s}" for n in names))
    for arm, record in results["arms"].items():
        cells = [f"{np.mean(record['dice'][n]):.3f} ± {np.std(record['dice'][n]):.3f}".rjust(22)
                 + f" {record['gain_over_real'][n]:+7.3f}" for n in names]
        print(f"{arm:42s} " + " ".join(cells))
    print(f"{'classical segmenter (no training)':42s} " + " ".join(
        f"{results['classical'][n]:22.3f} {'':>7s}" for n in names))
    print(f"mask adherence of the generated pairs (classical Dice vs mask): {results['adherence']}")
    print(f"generation {generated_s:.0f} s, total {results['seconds']['total']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
