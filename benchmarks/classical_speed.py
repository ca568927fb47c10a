"""Classical normalization throughput: genpath (batched) vs torchstain (per tile) vs torch-staintools.

Run: ``python benchmarks/classical_speed.py`` (2 threads, 64 real 256×256 tissue tiles).
Prints tiles/s for each and the ratio of genpath's batched Macenko to each peer, all measured
in the same run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import target_image, tissue_tiles  # noqa: E402

from normalization import MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer  # noqa: E402


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.set_num_threads(2)
    tiles, target = tissue_tiles(64), target_image()
    n = tiles.shape[0]
    results: dict[str, float] = {}

    for name, cls in [("genpath macenko", MacenkoNormalizer), ("genpath reinhard", ReinhardNormalizer),
                      ("genpath vahadane", VahadaneNormalizer)]:
        norm = cls().fit(target)
        results[name] = n / timed(lambda norm=norm: norm(tiles))
        print(f"  measured {name}: {results[name]:.1f} tiles/s", flush=True)
    float_tiles = tiles.float() / 255
    norm = MacenkoNormalizer().fit(target)
    results["genpath macenko (float input)"] = n / timed(lambda: norm(float_tiles))

    import torchstain

    for backend in ("torch", "numpy"):
        for method in ("macenko", "reinhard"):
            ts = getattr(torchstain.normalizers, f"{method.capitalize()}Normalizer")(backend=backend)
            data = [t if backend == "torch" else t.permute(1, 2, 0).numpy() for t in tiles]
            ts.fit(target if backend == "torch" else target.permute(1, 2, 0).numpy())
            key = f"torchstain {method} ({backend}, per tile)"
            results[key] = n / timed(lambda ts=ts, data=data: [ts.normalize(x) for x in data], repeats=1)
            print(f"  measured {key}: {results[key]:.1f} tiles/s", flush=True)
    try:
        from torch_staintools.normalizer import NormalizerBuilder

        # torch-staintools' vahadane is left out: it ran for minutes on these 64 tiles without finishing.
        for method in ("macenko", "reinhard"):
            tst = NormalizerBuilder.build(method, concentration_solver="ls")
            tst.fit(target[None].float() / 255)
            key = f"torch-staintools {method} (batched)"
            results[key] = n / timed(lambda tst=tst: tst(float_tiles), repeats=1)
            print(f"  measured {key}: {results[key]:.1f} tiles/s", flush=True)
    except Exception as error:  # noqa: BLE001 - an optional peer; report and go on
        print(f"torch-staintools unavailable: {error}")

    ours = results["genpath macenko"]
    print(f"{'method':45s} {'tiles/s':>10s} {'genpath macenko / this':>24s}")
    for name, rate in results.items():
        print(f"{name:45s} {rate:10.1f} {ours / rate:24.2f}")


if __name__ == "__main__":
    main()
