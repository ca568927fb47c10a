"""Linear-probe check of encoders on held-out PatchCamelyon tiles (normal vs tumour).

Run: ``python benchmarks/encoder_probe.py [--encoder-path samples/checkpoints/encoder_small] [--limit 900]``

Tiles are the 30% of ``../shared/data/pcam`` held out from encoder training (stable name hash,
``genpath.training.data.in_holdout``). A logistic regression (torch, L2) is fitted on half of
them and scored on the other half (split by file-name order parity), for genpath's small SSL
encoder, the same architecture untrained, and the FID Inception network.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from genpath.data import shared_data_root
from genpath.encoders import SmallHistologyEncoder, create_encoder
from genpath.io.images import read_image
from genpath.metrics.distribution import embed_images
from genpath.training.data import in_holdout

ROOT = Path(__file__).resolve().parents[1]


def probe(train_x, train_y, test_x, test_y, steps: int = 500) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    model = torch.nn.Linear(a.shape[1], 2)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(a), train_y) + 1e-3 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float((model(b).argmax(1) == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-path", type=Path, default=ROOT / "samples" / "checkpoints" / "encoder_small")
    parser.add_argument("--limit", type=int, default=900)
    args = parser.parse_args()
    root = shared_data_root()
    if root is None:
        raise SystemExit("shared data not present (set GENPATH_SHARED_DATA)")
    with open(root / "pcam" / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if in_holdout(r["path"], 0.3)][: args.limit]
    images = torch.stack([read_image(root / "pcam" / r["path"]) for r in rows])
    labels = torch.tensor([int(r["label"]) for r in rows])
    even = torch.arange(len(rows)) % 2 == 0
    print(f"{len(rows)} held-out PCam tiles ({int(labels.sum())} tumour); probe trained on {int(even.sum())}")
    trained = create_encoder("genpath-small", path=args.encoder_path)
    untrained = create_encoder("genpath-small", model=SmallHistologyEncoder(**{
        k: v for k, v in trained.model.config.items() if not k.startswith("_")}))
    for name, encoder in (("genpath-small (SSL)", trained), ("genpath-small (untrained)", untrained),
                          ("inception.fid", create_encoder("inception.fid"))):
        start = time.perf_counter()
        feats = torch.from_numpy(embed_images(encoder, images)).float()
        acc = probe(feats[even], labels[even], feats[~even], labels[~even])
        print(f"{name:28s} D={feats.shape[1]:5d}  probe accuracy {acc:.3f}  ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
