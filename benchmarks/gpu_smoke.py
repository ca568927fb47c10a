"""A few steps of every trainer on the accelerator, with bf16 and gradient checkpointing: samples/s and memory.

For a person with a GPU (CI has none): ``python benchmarks/gpu_smoke.py [--steps 6] [--batch-size 16]
[--size 64] [--out out/gpu_smoke] [--kinds vae ldm ...]``. Each trainer runs from the tiny configs
(``configs/tiny.yaml``) on the shipped samples, scaled to ``--size``/``--batch-size``, with
``mixed_precision: bf16`` and ``gradient_checkpointing`` where the model supports it; one line
per trainer gives samples/s (the last logged window), peak accelerator memory and whether
it finished. Results also go to ``OUT/results.json``. On a machine without CUDA it runs on the
CPU (bf16 autocast) so the script itself stays tested.

For two or more GPUs: ``accelerate launch --num_processes 2 benchmarks/gpu_smoke.py`` (each
trainer then runs data-parallel; the main process prints).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
#: Trainers whose model takes gradient checkpointing (diffusers models).
CHECKPOINTING = {"vae", "ldm", "stainfuser", "controlnet"}
KINDS = ("encoder", "vae", "ldm", "histaug", "stainfuser", "controlnet", "translator")


def config_for(kind: str, out: Path, steps: int, batch_size: int, size: int, precision: str) -> Path:
    """The tiny config's section for ``kind``, scaled, with mixed precision and checkpointing."""
    raw = yaml.safe_load(TINY.read_text())
    section = raw[kind]
    section["data"]["size"] = size
    section["train"].update({"output_dir": str(out / kind), "max_steps": steps, "batch_size": batch_size,
                             "log_every": max(1, steps // 2), "checkpoint_every": steps, "sample_every": steps,
                             "mixed_precision": precision, "gradient_checkpointing": kind in CHECKPOINTING})
    options = section.get("options", {})
    if kind == "stainfuser":
        options["vae"] = str(ROOT / "samples" / "checkpoints" / "vae_small")
    if kind == "controlnet":
        options["pipeline"] = str(out / "ldm" / "pipeline")  # the LDM trained just before
    path = out / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({kind: section}))
    return path


def peak_memory_mb() -> float:
    """Peak accelerator memory of this process (MB), or peak RSS on a CPU-only machine."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--out", type=Path, default=Path("out/gpu_smoke"))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    from genpath.training.loop import process_state
    from genpath.training.run import run_training

    state = process_state()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = []
    for kind in args.kinds:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        row = {"kind": kind, "device": device, "processes": state.num_processes, "precision": args.precision,
               "gradient_checkpointing": kind in CHECKPOINTING, "batch_size_per_process": args.batch_size,
               "size": args.size}
        try:
            if state.is_main_process and (args.out / kind).exists():
                shutil.rmtree(args.out / kind)  # this script's own earlier run: start over, do not resume
            state.wait_for_everyone()
            config = config_for(kind, args.out, args.steps, args.batch_size, args.size, args.precision)
            run_training(kind, config)
            log = [json.loads(line) for line in (args.out / kind / "log.jsonl").read_text().splitlines()]
            row.update(ok=True, samples_per_s=log[-1]["samples_per_s"], loss=log[-1]["loss"])
        except Exception as error:  # noqa: BLE001 - a smoke test reports every trainer
            row.update(ok=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
            if state.is_main_process:
                traceback.print_exc()
        row.update(seconds=round(time.perf_counter() - start, 1), peak_memory_mb=round(peak_memory_mb()))
        results.append(row)
        if state.is_main_process:
            speed = f"{row['samples_per_s']:8.1f} samples/s" if row.get("ok") else f"FAILED {row['error']}"
            print(f"{kind:11s} {speed}  peak {row['peak_memory_mb']} MB  {row['seconds']} s  ({device}, "
                  f"{args.precision}, checkpointing={row['gradient_checkpointing']})")
    if state.is_main_process:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not all(r.get("ok") for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
