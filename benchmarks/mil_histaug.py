"""Attention MIL in the low-data regime, trained with and without HistAug on bags of real-tile embeddings.

Run: ``python benchmarks/mil_histaug.py [--model samples/checkpoints/histaug_small] [--train-bags 16]``

Bags are built from PatchCamelyon tiles (``../shared/data/pcam``, labelled normal/tumour)
embedded with the HistAug model's encoder. A bag holds ``--bag-size`` tiles; it is positive
when it contains tumour tiles (``--witnesses`` of them, the rest normal) and negative when all
its tiles are normal. Training bags draw tiles from the files HistAug and the encoder were
trained on (labels were never used there); test bags draw only from the held-out 30%.

A gated-attention MIL model (Ilse et al. 2018) is trained for a fixed number of epochs on
``--train-bags`` bags, with and without :class:`augment.feature.HistAugTransform` (p=0.5,
one draw per bag), over several seeds; balanced accuracy and AUC on the test bags are printed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn

from augment.feature import HistAugTransform
from augment.histaug import HistAugModel
from genpath.data import shared_data_root
from genpath.encoders.reference import load_encoder_reference
from genpath.io.images import read_image
from genpath.training.data import in_holdout

ROOT = Path(__file__).resolve().parents[1]


class GatedAttentionMIL(nn.Module):
    """Ilse et al.'s gated attention pooling and a linear bag classifier."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v, self.attn_u = nn.Linear(hidden, 64), nn.Linear(hidden, 64)
        self.attn_w = nn.Linear(64, 1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        h = self.embed(bag)
        a = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).softmax(0)
        return self.classifier((a * h).sum(0)).squeeze(-1)


def make_bags(normal: torch.Tensor, tumour: torch.Tensor, n: int, size: int, witnesses: int,
              g: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    bags, labels = [], []
    for i in range(n):
        label = i % 2
        k = witnesses if label else 0
        picks = [normal[torch.randint(0, len(normal), (size - k,), generator=g)]]
        if k:
            picks.append(tumour[torch.randint(0, len(tumour), (k,), generator=g)])
        bag = torch.cat(picks)
        bags.append(bag[torch.randperm(len(bag), generator=g)])
        labels.append(label)
    return bags, torch.tensor(labels)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def run(train: tuple[list[torch.Tensor], torch.Tensor], test: tuple[list[torch.Tensor], torch.Tensor],
        seed: int, augment: HistAugTransform | None, epochs: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = GatedAttentionMIL(train[0][0].shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)
    bags, labels = train
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(bags)).tolist():
            bag = bags[i] if augment is None else augment(bags[i])
            loss = nn.functional.binary_cross_entropy_with_logits(model(bag), labels[i].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        scores = torch.stack([model(b) for b in test[0]]).numpy()
    y = test[1].numpy()
    pred = scores > 0
    balanced = 0.5 * ((pred[y == 1]).mean() + (~pred[y == 0]).mean())
    return float(balanced), auc(scores, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "checkpoints" / "histaug_small")
    parser.add_argument("--train-bags", type=int, default=16)
    parser.add_argument("--test-bags", type=int, default=200)
    parser.add_argument("--bag-size", type=int, default=32)
    parser.add_argument("--witnesses", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    root = shared_data_root()
    if root is None:
        raise SystemExit("shared data not present (set GENPATH_SHARED_DATA)")
    histaug = HistAugModel.from_pretrained(str(args.model), dtype=torch.float32).eval()
    encoder = load_encoder_reference(args.model).eval()
    with open(root / "pcam" / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    feats = {}
    for part in ("train", "holdout"):
        chosen = [r for r in rows if in_holdout(r["path"], 0.3) == (part == "holdout")]
        tiles = torch.stack([read_image(root / "pcam" / r["path"]) for r in chosen])
        with torch.no_grad():
            emb = torch.cat([encoder(b) for b in tiles.split(256)]).float()
        labels = torch.tensor([int(r["label"]) for r in chosen])
        feats[part] = (emb[labels == 0], emb[labels == 1])
    print(f"bags of {args.bag_size} tiles, positive = {args.witnesses} tumour tiles; {args.train_bags} training "
          f"bags, {args.test_bags} test bags (held-out tiles); {args.epochs} epochs; encoder {encoder.name}")
    results: dict[str, list[tuple[float, float]]] = {"no augmentation": [], "HistAug p=0.5 (wsi)": []}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        train = make_bags(*feats["train"], args.train_bags, args.bag_size, args.witnesses, g)
        test = make_bags(*feats["holdout"], args.test_bags, args.bag_size, args.witnesses, g)
        results["no augmentation"].append(run(train, test, seed, None, args.epochs))
        aug = HistAugTransform(histaug, p=0.5, mode="wsi")
        results["HistAug p=0.5 (wsi)"].append(run(train, test, seed, aug, args.epochs))
    for name, values in results.items():
        acc, au = np.array(values).T
        per_seed = ", ".join(f"{v:.3f}" for v in au)
        print(f"  {name:22s} balanced accuracy {acc.mean():.3f} ± {acc.std():.3f}   "
              f"AUC {au.mean():.3f} ± {au.std():.3f}   (per seed AUC {per_seed})")


if __name__ == "__main__":
    main()
