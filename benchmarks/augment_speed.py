"""Augmentation speed: genpath's transforms against torchvision v2 ``ColorJitter`` (and Albumentations' ``HEStain``).

Run: ``python benchmarks/augment_speed.py [--rounds 15] [--epoch-tiles 256] [--out out/bench/augment_speed.json]``

1. Per image, one thread, 256×256 uint8 tissue tiles (``samples/``): every transform is timed on
   the same 16 tiles per round, the transforms in a rotating order within each round, CPU time
   of the process (``time.process_time``: machine load that preempts the process is not counted),
   median over rounds. Ratios are against ``ColorJitter`` measured in the same rounds (> 1: the
   genpath transform is faster per image).
2. DataLoader epoch: ``DataLoader(num_workers=2, batch_size=32)`` over tiles stored as JPEG files
   (decoded with PIL in ``__getitem__``, what a plain tile dataset does), without and with each
   transform, persistent workers, the best of ``--epochs`` timed epochs after a warm-up one.
   Prints each transform's added share of the plain epoch (goal: ≤ 20%), ``ColorJitter``'s too.

Albumentations' ``HEStain`` is measured when ``albumentations`` is importable; otherwise the
script says so and goes on. Results are written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import tissue_tiles  # noqa: E402

from genpath.utils.atomic import atomic_write_json  # noqa: E402

PEER = "torchvision ColorJitter"


def transforms(tiles: torch.Tensor) -> dict[str, Callable[[torch.Tensor], object]]:
    """The transforms compared, by display name; each takes one uint8 ``(3,H,W)`` tile."""
    import torchvision.transforms.v2 as T

    from augment import RandomHEDJitter, RandomHistologyTransform, RandomStainJitter, RandomStainNA, StainNAStatistics

    found: dict[str, Callable[[torch.Tensor], object]] = {
        # the same strengths as RandomHistologyTransform's default colour ranges
        PEER: T.ColorJitter(brightness=0.25, contrast=0.3, saturation=0.3, hue=0.05),
    }
    try:
        import albumentations as A

        he_stain = A.HEStain(p=1.0)
        found["albumentations HEStain"] = lambda x: he_stain(image=x.permute(1, 2, 0).numpy())["image"]
    except Exception as error:  # noqa: BLE001 - an optional peer: report and go on
        print(f"albumentations HEStain skipped: {type(error).__name__}: {error}")
    found.update({
        "genpath RandomHEDJitter": RandomHEDJitter(p=1.0),
        "genpath RandomStainJitter": RandomStainJitter(p=1.0),
        "genpath RandomStainNA": RandomStainNA(StainNAStatistics.fit(tiles[:16]), p=1.0),
        "genpath RandomHistologyTransform (p=1)": RandomHistologyTransform(p=1.0),
        "genpath RandomHistologyTransform (default p=0.5)": RandomHistologyTransform(),
    })
    return found


def per_image(tiles: torch.Tensor, named: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Median CPU seconds per image of each transform, measured in interleaved rounds."""
    names = list(named)
    for fn in named.values():  # warm-up (lazy imports, tables)
        for tile in tiles[:2]:
            fn(tile)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        batch = tiles[(16 * r) % len(tiles) :][:16]
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = named[name]
            start = time.process_time()
            for tile in batch:
                fn(tile)
            times[name].append((time.process_time() - start) / len(batch))
    return {name: statistics.median(values) for name, values in times.items()}


class JpegTiles(torch.utils.data.Dataset):
    """Tiles stored as JPEG files, decoded per item, optionally transformed (a plain tile dataset)."""

    def __init__(self, files: list[Path], transform: Callable | None = None) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        tile = torch.from_numpy(np.array(Image.open(self.files[i]).convert("RGB"))).permute(2, 0, 1).contiguous()
        out = tile if self.transform is None else self.transform(tile)
        return out if isinstance(out, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def epoch_seconds(files: list[Path], transform: Callable | None, epochs: int) -> float:
    """Best wall time of ``epochs`` DataLoader(num_workers=2) epochs, after a warm-up epoch."""
    loader = torch.utils.data.DataLoader(JpegTiles(files, transform), batch_size=32, num_workers=2,
                                         persistent_workers=True)
    for _ in loader:
        pass
    best = float("inf")
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, time.perf_counter() - start)
    del loader
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of 16 tiles per transform")
    parser.add_argument("--epoch-tiles", type=int, default=256, help="JPEG tiles in the DataLoader dataset")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per transform (best is kept)")
    parser.add_argument("--skip-dataloader", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("out/bench/augment_speed.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    tiles = tissue_tiles(64)
    named = transforms(tiles)
    seconds = per_image(tiles, named, args.rounds)
    peer = seconds[PEER]
    print(f"\nPer image, one thread, 256x256 uint8 ({args.rounds} interleaved rounds of 16 tiles, median CPU time)")
    print(f"{'transform':52s} {'images/s':>9s} {'÷ ' + PEER:>28s}")
    rows = {}
    for name, s in seconds.items():
        rows[name] = {"images_per_s": 1.0 / s, "speed_vs_colorjitter": peer / s}
        print(f"{name:52s} {1.0 / s:9.1f} {peer / s:28.2f}")
    results: dict[str, object] = {"per_image": rows, "rounds": args.rounds, "peer": PEER}

    if not args.skip_dataloader:
        with tempfile.TemporaryDirectory() as folder:
            files = []
            for i in range(args.epoch_tiles):
                path = Path(folder) / f"tile_{i:04d}.jpg"
                Image.fromarray(tiles[i % len(tiles)].permute(1, 2, 0).numpy()).save(path, quality=90)
                files.append(path)
            plain = epoch_seconds(files, None, args.epochs)
            print(f"\nDataLoader(num_workers=2, batch_size=32), {len(files)} JPEG tiles: plain epoch {plain:.3f} s")
            print(f"{'transform':52s} {'epoch s':>9s} {'added':>8s}")
            epochs = {"plain_s": plain, "tiles": len(files), "with": {}}
            for name, fn in named.items():
                seconds_with = epoch_seconds(files, fn, args.epochs)
                added = seconds_with / plain - 1.0
                epochs["with"][name] = {"epoch_s": seconds_with, "added_share": added}
                print(f"{name:52s} {seconds_with:9.3f} {100 * added:7.0f}%")
            results["dataloader"] = epochs
    atomic_write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
