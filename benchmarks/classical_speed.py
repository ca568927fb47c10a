"""Classical normalization throughput: genpath (batched) vs torchstain (per tile) vs torch-staintools.

Run: ``python benchmarks/classical_speed.py [--threads 2] [--rounds 5] [--out out/bench/classical_speed.json]``

64 real 256×256 uint8 tissue tiles from ``samples/images``. In each round every method runs once
on all 64 tiles (genpath: one batched call; torchstain: its ``normalize`` tile by tile), in a
rotating order, so that the peers share the machine's state; the best wall time over rounds
counts (after one warm-up call each). Prints tiles/s and each genpath method's ratio to the
named peer, all from the same run:

* Macenko, batched, ÷ torchstain's torch Macenko loop (``normalize(tile, stains=False)``: only
  the normalized tile, as genpath returns; the default ``stains=True`` also renders H and E and
  is printed too). Goal ≥ 10.
* Reinhard ÷ torchstain's torch Reinhard loop; Vahadane ÷ the same Macenko loop (torchstain has
  no Vahadane; torch-staintools' Vahadane did not finish on these tiles within minutes).

Then agreement with torchstain on tissue pixels (mean |Δ| over tissue pixels, 0–255 scale, and the
share of tissue values within 2 levels): genpath in its torchstain-agreement settings
(Macenko ``percentile_pixels="all"``, Reinhard ``tissue_only=False``) and in its defaults; and
the fused uint8 path against the float path (max |Δ| in levels; the fused kernels are built to
stay within one). Results are also written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import target_image, tissue_tiles  # noqa: E402

from genpath.utils.atomic import atomic_write_json  # noqa: E402
from normalization import MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer  # noqa: E402
from normalization.functional import rgb_to_od, tissue_mask_od  # noqa: E402

TS_MACENKO = "torchstain macenko (torch, per tile, stains=False)"
TS_REINHARD = "torchstain reinhard (torch, per tile)"


def best_times(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall seconds of each method over ``rounds`` interleaved rounds (one warm-up call each)."""
    names = list(methods)
    for fn in methods.values():
        fn()
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            methods[name]()
            best[name] = min(best[name], time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return best


def agreement(ours: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean |Δ| over tissue pixels (channel-mean, as the tests) and the share of tissue values within 2 levels."""
    diff = (ours.float() - reference.float()).abs()
    return {"mean_abs_tissue": float(diff.mean(1)[mask].mean()),
            "share_within_2": float((diff.permute(1, 0, 2, 3)[:, mask] <= 2).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (best counts)")
    parser.add_argument("--skip-staintools", action="store_true", help="leave torch-staintools out")
    parser.add_argument("--out", type=Path, default=Path("out/bench/classical_speed.json"))
    args = parser.parse_args()

    import torchstain

    torch.set_num_threads(args.threads)
    tiles, target = tissue_tiles(64), target_image()
    n, float_tiles = tiles.shape[0], tiles.float() / 255
    ours = {name: cls().fit(target) for name, cls in
            (("macenko", MacenkoNormalizer), ("reinhard", ReinhardNormalizer), ("vahadane", VahadaneNormalizer))}
    ts_m = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts_m.fit(target)
    ts_r = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ts_r.fit(target)
    methods: dict[str, Callable[[], object]] = {
        "genpath macenko (batched, uint8)": lambda: ours["macenko"](tiles),
        "genpath macenko (batched, float)": lambda: ours["macenko"](float_tiles),
        "genpath reinhard (batched, uint8)": lambda: ours["reinhard"](tiles),
        "genpath vahadane (batched, uint8)": lambda: ours["vahadane"](tiles),
        TS_MACENKO: lambda: [ts_m.normalize(t, stains=False) for t in tiles],
        "torchstain macenko (torch, per tile, default stains=True)": lambda: [ts_m.normalize(t) for t in tiles],
        TS_REINHARD: lambda: [ts_r.normalize(t) for t in tiles],
    }
    if not args.skip_staintools:
        try:
            from torch_staintools.normalizer import NormalizerBuilder

            for method in ("macenko", "reinhard"):
                tst = NormalizerBuilder.build(method, concentration_solver="ls")
                tst.fit(target[None].float() / 255)
                methods[f"torch-staintools {method} (batched)"] = lambda tst=tst: tst(float_tiles)
        except Exception as error:  # noqa: BLE001 - an optional peer: report and go on
            print(f"torch-staintools unavailable: {type(error).__name__}: {error}")

    print(f"{n} tiles 256x256, {args.threads} threads, {args.rounds} interleaved rounds (best wall time)")
    seconds = best_times(methods, args.rounds)
    rate = {name: n / s for name, s in seconds.items()}
    print(f"\n{'method':58s} {'tiles/s':>9s}")
    for name, r in rate.items():
        print(f"{name:58s} {r:9.1f}")
    ratios = {
        "macenko_vs_torchstain_macenko": rate["genpath macenko (batched, uint8)"] / rate[TS_MACENKO],
        "macenko_vs_torchstain_macenko_default_stains": rate["genpath macenko (batched, uint8)"]
        / rate["torchstain macenko (torch, per tile, default stains=True)"],
        "reinhard_vs_torchstain_reinhard": rate["genpath reinhard (batched, uint8)"] / rate[TS_REINHARD],
        "vahadane_vs_torchstain_macenko": rate["genpath vahadane (batched, uint8)"] / rate[TS_MACENKO],
    }
    for name in ("macenko", "reinhard"):
        key = f"torch-staintools {name} (batched)"
        if key in rate:
            ratios[f"{name}_vs_torch_staintools_{name}"] = rate[f"genpath {name} (batched, uint8)"] / rate[key]
    print("\nratios (same run; > 1: genpath faster)")
    for name, value in ratios.items():
        print(f"  {name:52s} {value:7.2f}")

    mask = tissue_mask_od(rgb_to_od(float_tiles))
    ref_m = torch.stack([ts_m.normalize(t, stains=False)[0].permute(2, 0, 1) for t in tiles])
    ref_r = torch.stack([ts_r.normalize(t).permute(2, 0, 1) for t in tiles])
    agree = {
        "macenko (percentile_pixels='all') vs torchstain": agreement(
            MacenkoNormalizer(percentile_pixels="all").fit(target)(tiles), ref_m, mask),
        "macenko (defaults) vs torchstain": agreement(ours["macenko"](tiles), ref_m, mask),
        "reinhard (tissue_only=False) vs torchstain": agreement(
            ReinhardNormalizer(tissue_only=False).fit(target)(tiles), ref_r, mask),
        "reinhard (defaults) vs torchstain": agreement(ours["reinhard"](tiles), ref_r, mask),
    }
    print("\nagreement with torchstain on tissue pixels (0-255 scale)")
    for name, values in agree.items():
        print(f"  {name:52s} mean |d| {values['mean_abs_tissue']:5.2f}   within 2: {values['share_within_2']:.3f}")
    fused = {}
    for name, norm in ours.items():
        fast = norm(tiles).int()
        eager = (norm(float_tiles) * 255).round().int()
        fused[name] = {"max_abs": int((fast - eager).abs().max()),
                       "share_differing": float((fast != eager).float().mean())}
    print("\nfused uint8 path vs float path (levels)")
    for name, values in fused.items():
        print(f"  {name:10s} max |d| {values['max_abs']}   share differing {values['share_differing']:.4f}")
    atomic_write_json(args.out, {"threads": args.threads, "rounds": args.rounds, "tiles": n, "tiles_per_s": rate,
                                 "ratios": ratios, "agreement": agree, "fused_vs_float": fused})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
