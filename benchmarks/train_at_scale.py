"""Slides → tiles → embeddings → training, timed on this machine: tiles/s, embeddings/s, samples/s at 1 and 2 processes.

``python benchmarks/train_at_scale.py [--steps 12] [--batch-size 8] [--out out/bench_scale]``:

1. ``genpath tiles samples/slides --mpp 1.0 --tile-size 128`` (wall clock, start-up included, and
   the command's own tiles/s);
2. ``genpath embed ... --encoder genpath-small.samples``;
3. ``genpath train KIND`` (``vae`` and ``ldm`` from ``configs/tiny.yaml``, 32-px tiles) on 1 process
   with batch ``2b`` and on 2 processes (``torchrun``, gloo) with batch ``b`` each: samples/s of the
   last log window (the same global batch, so the same work per step).

Results go to ``OUT/results.json`` and one line each to stdout. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GENPATH = str(Path(sys.executable).parent / "genpath")


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(kind: str, out: Path, processes: int, batch_size: int, steps: int) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())[kind]
    raw["train"].update({"output_dir": str(out), "max_steps": steps, "batch_size": batch_size,
                         "log_every": steps // 2, "checkpoint_every": steps, "sample_every": 10 * steps})
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({kind: raw}))
    command = [GENPATH, "train", kind, "--config", str(config)]
    env = {"CUDA_VISIBLE_DEVICES": ""}
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *command]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
    seconds, _ = run(command, env)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"kind": kind, "processes": processes, "batch_per_process": batch_size, "steps": steps,
            "samples_per_s": log[-1]["samples_per_s"], "wall_s": round(seconds, 1)}


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="per process on 2 processes (2x on 1)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_scale"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)  # this script's own earlier results
    args.out.mkdir(parents=True)
    results: dict = {"cpus": os.cpu_count()}
    dataset = args.out / "ds.zarr"
    seconds, output = run([GENPATH, "tiles", str(ROOT / "samples" / "slides"), "--out", str(dataset),
                           "--mpp", "1.0", "--tile-size", "128"])
    import zarr

    n = zarr.open_group(str(dataset), mode="r")["images"].shape[0]
    results["tiles"] = {"tiles": n, "wall_s": round(seconds, 2), "tiles_per_s_wall": round(n / seconds, 2),
                        "summary": output.strip().splitlines()[-1]}
    seconds, output = run([GENPATH, "embed", str(dataset), "--encoder", "genpath-small.samples"])
    results["embed"] = {"tiles": n, "wall_s": round(seconds, 2), "tiles_per_s_wall": round(n / seconds, 2),
                        "summary": output.strip().splitlines()[-1]}
    print(f"tiles: {n} tiles in {results['tiles']['wall_s']} s wall ({results['tiles']['summary']})")
    print(f"embed: {n} tiles in {results['embed']['wall_s']} s wall ({results['embed']['summary']})")
    results["train"] = []
    for kind in ("vae", "ldm"):
        for processes in (1, 2):
            row = train(kind, args.out / f"{kind}_{processes}p", processes, args.batch_size * 2 // processes,
                        args.steps)
            results["train"].append(row)
            print(f"train {kind}: {processes} process(es) x batch {row['batch_per_process']}: "
                  f"{row['samples_per_s']} samples/s ({row['wall_s']} s wall)")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
