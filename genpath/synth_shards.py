"""Run folders of ``genpath synth``: recorded settings, resume, shards of a run and their merge.

1. Run folder: ``OUT/run.json`` records what decides the samples before anything else is
   written (:func:`prepare_run_folder`); a rerun with the same settings resumes, one with other
   settings is refused unless ``overwrite``, which deletes only what a synth run writes
   (:func:`clear_run_outputs`).
2. Shards: ``shard="I/N"`` (0-based, ``0 <= I < N``) makes a run generate only part ``I`` of
   ``N`` of its samples (:func:`shard_samples`): contiguous ranges of whole batches, so every
   batch holds the same samples as in an unsharded run. Per-sample seeds (``seed + id``) and
   batch composition are then unchanged, and the images are bitwise those of an unsharded run
   on the same hardware and torch thread count (the UNet's floating-point result depends on the
   batch it runs in and, on CPU, on the thread count). A shard folder is an ordinary run folder
   holding only its part (zarr arrays keep their full length; ids, seeds and file names are
   global); its ``run.json`` adds ``shard``, ``shard_samples``, ``n_samples`` and
   ``batch_size``, so a rerun of another shard (or batch size) into it is refused.
3. Merge (:func:`merge_shards`, ``genpath synth-merge``): checks that the folders are the
   finished shards of one run, each once and all of them, then writes ``OUT`` exactly as an
   unsharded run would (same ``run.json``, manifest rows in id order, zarr arrays, PNG/npz
   files, ``embeddings.npy``).
4. Executors (:func:`run_sharded`): ``executor="dask"`` runs ``workers`` shards as dask tasks
   (a local process cluster, or ``scheduler``) into ``OUT/shards/I-of-N`` and merges them
   into ``OUT``; the shard folders are removed once merged, and an interrupted run resumes.
"""

from __future__ import annotations

import csv
import functools
import json
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from genpath.utils.atomic import atomic_path, atomic_write_csv, atomic_write_json
from genpath.utils.logging import get_logger
from genpath.utils.paths import require_output_folder

logger = get_logger(__name__)
RUN_FILE = "run.json"
RUN_CREATOR = "genpath synth"
RUN_FILES = ("manifest.csv", "embeddings.npy", RUN_FILE)
RUN_STORES = ("images.zarr", "pairs.zarr")
#: the per-sample arrays of those stores (one chunk per sample), merged shard by shard
SAMPLE_ARRAYS = ("images", "instances", "types")
#: file names a synth run writes in ``OUT/images`` and ``OUT/masks`` (and their hidden temporaries)
RUN_SAMPLES = {"images": r"(?:cond\d{5,}_\d{3,}|\d{6,})\.png", "masks": r"\d{6,}\.npz"}
_TEMPORARY = r"\.(?:{})\.[A-Za-z0-9_]+\.(?:png|npz|csv|npy|json)"
#: where ``executor="dask"`` puts its shard folders (``OUT/shards/I-of-N``) until they are merged
SHARDS = "shards"
SHARD_KEYS = ("shard", "shard_samples", "n_samples", "batch_size")
MAX_SHARDS = 100_000
EXECUTORS = ("local", "dask")
#: seconds to wait for a dask scheduler given by address
SCHEDULER_TIMEOUT = 10
#: held while a run loads its models: diffusers/accelerate loading patches torch globally (not thread-safe),
#: so shards in threads of one process (a threaded dask worker) must not load at the same time
LOAD_LOCK = threading.RLock()


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest CSV (none when the file does not exist yet)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def done_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Keep a manifest's sample rows (drop failed ones; a manifest without ``status`` has only samples)."""
    kept = [row for row in rows if row.get("status") != "failed"]
    for row in kept:
        row["status"], row["error"] = row.get("status") or "done", row.get("error") or ""
    return kept


def check_inputs_outside(out: Path, inputs: Iterable[str | Path], argument: str) -> None:
    """Refuse an input that is one of the files a synth run writes into ``out`` (or lies in its output folders)."""
    out = out.resolve()
    written = {out / name for name in RUN_FILES}
    folders = [out / name for name in (*RUN_SAMPLES, *RUN_STORES)]
    for item in inputs:
        path = Path(item).resolve()
        if path in written or any(path.is_relative_to(folder) for folder in folders):
            raise ValueError(f"{argument}: expected an input outside the outputs of {out}, got {item}")


def _sample_files(out: Path) -> list[Path]:
    """Sample files and temporaries of sample files a synth run wrote in ``out/images`` and ``out/masks``."""
    found = []
    for sub, names in RUN_SAMPLES.items():
        pattern = re.compile(f"{names}|{_TEMPORARY.format(names)}")
        if (out / sub).is_dir():
            found.extend(p for p in (out / sub).iterdir() if p.is_file() and pattern.fullmatch(p.name))
    return found


def _stale_temporaries(out: Path) -> list[Path]:
    pattern = re.compile(_TEMPORARY.format("|".join(re.escape(n) for n in RUN_FILES)))
    top = [p for p in out.iterdir() if p.is_file() and pattern.fullmatch(p.name)] if out.is_dir() else []
    return top + [p for p in _sample_files(out) if p.name.startswith(".")]


def _remove_shard_folders(out: Path) -> None:
    """Delete the shard runs ``out/shards/I-of-N`` a dask run left (only folders whose run.json is a shard's)."""
    shards = out / SHARDS
    if not shards.is_dir():
        return
    for folder in shards.iterdir():
        if folder.is_dir() and re.fullmatch(r"\d+-of-\d+", folder.name) and \
                "shard" in (recorded_settings(folder / RUN_FILE) or {}):
            clear_run_outputs(folder)
            if not any(folder.iterdir()):
                folder.rmdir()
    if not any(shards.iterdir()):
        shards.rmdir()


def clear_run_outputs(out: str | Path) -> None:
    """Delete what a synth run writes in ``out``, nothing else.

    That is ``run.json``, ``manifest.csv``, ``embeddings.npy``, ``images.zarr``/``pairs.zarr``,
    the sample files (by their names) in ``images/`` and ``masks/``, removed when empty, and the
    shard runs a dask run left in ``shards/``.
    """
    out = Path(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_STORES:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for path in _sample_files(out) + _stale_temporaries(out):
        path.unlink(missing_ok=True)
    for sub in RUN_SAMPLES:
        if (out / sub).is_dir() and not any((out / sub).iterdir()):
            (out / sub).rmdir()
    _remove_shard_folders(out)
    from genpath.report.synth import remove_synth_extras

    remove_synth_extras(out)


def _has_outputs(out: Path) -> bool:
    return any((out / name).exists() for name in (*RUN_FILES, *RUN_STORES)) or any(
        not p.name.startswith(".") for p in _sample_files(out))


def recorded_settings(record: Path) -> dict | None:
    """Read the settings in ``run.json`` (None when absent, ``{}`` when unreadable or not written by genpath synth)."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError, IsADirectoryError, NotADirectoryError):
        return {}
    ok = isinstance(data, dict) and data.get("created_by") == RUN_CREATOR
    return data["settings"] if ok and isinstance(data.get("settings"), dict) else {}


def prepare_run_folder(out: str | Path, settings: dict, overwrite: bool = False) -> bool:
    """Make ``out`` ready for a run with ``settings``: record them in ``out/run.json`` (atomically).

    Args:
        out: the output folder (created).
        settings: what decides the samples (JSON-serializable; ``command`` tells synth from synth --masks).
        overwrite: start over: delete a previous run's outputs (:func:`clear_run_outputs`) first.

    Returns:
        Whether a previous run with the same settings is resumed.

    Raises:
        ValueError: ``out`` holds a run with other settings, or outputs without a readable
            ``run.json``, and ``overwrite`` is false (nothing is touched).
    """
    out = require_output_folder(out)
    settings = json.loads(json.dumps(settings, allow_nan=False))  # compare as recorded
    record = out / RUN_FILE
    previous = recorded_settings(record) if out.is_dir() else None
    expected = f"out: expected the settings of the run already in {out} (or --overwrite), got"
    if not overwrite:
        if previous == settings:
            for path in _stale_temporaries(out):
                path.unlink(missing_ok=True)
            return True
        if previous == {}:
            raise ValueError(f"{expected} an unreadable {record} or one genpath synth did not write")
        if previous is not None:
            keys = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
            raise ValueError(f"{expected} different {', '.join(keys)}")
        if _has_outputs(out):
            raise ValueError(f"{expected} outputs without {RUN_FILE} (an older genpath or another program)")
    elif previous is not None or _has_outputs(out):
        logger.info("--overwrite: deleting the previous run's outputs in %s", out)
    if out.is_dir():
        clear_run_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"created_by": RUN_CREATOR, "settings": settings})
    return False


def parse_shard(value: object) -> tuple[int, int]:
    """``"I/N"`` (0-based, ``0 <= I < N <=`` :data:`MAX_SHARDS`) as ``(I, N)``; else a one-line ``ValueError``."""
    found = re.fullmatch(r"(\d{1,9})/(\d{1,9})", value.strip()) if isinstance(value, str) else None
    if not found or not int(found[1]) < int(found[2]) <= MAX_SHARDS:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"shard: expected I/N with 0 <= I < N <= {MAX_SHARDS}, got {shown}")
    return int(found[1]), int(found[2])


def shard_samples(n_total: int, batch_size: int, shard: str | None) -> range:
    """Sample ids of ``shard`` (all ``n_total`` without one): a contiguous run of whole batches.

    The ``ceil(n_total / batch_size)`` batches are split into ``N`` contiguous groups whose sizes
    differ by at most one batch, so shard boundaries fall on batch boundaries (a shard may be empty
    when there are fewer batches than shards).
    """
    if shard is None:
        return range(n_total)
    index, count = parse_shard(shard)
    n_batches = -(-n_total // batch_size)
    first, last = index * n_batches // count, (index + 1) * n_batches // count
    return range(min(first * batch_size, n_total), min(last * batch_size, n_total))


def shard_settings(settings: dict, n_total: int, batch_size: int, shard: str | None) -> tuple[dict, range]:
    """Return the settings to record for ``shard`` (with :data:`SHARD_KEYS`; unchanged without one) and its ids."""
    ids = shard_samples(n_total, batch_size, shard)
    if shard is None:
        return settings, ids
    index, count = parse_shard(shard)
    return {**settings, "shard": f"{index}/{count}", "shard_samples": [ids.start, ids.stop], "n_samples": n_total,
            "batch_size": batch_size}, ids


def check_executor(executor: str, workers: int, shard: str | None, scheduler: str | None) -> None:
    """Refuse an unknown ``executor``, ``workers`` outside 1..1024, and options that need (or exclude) dask."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected 'local' or 'dask', got {executor!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 1024:
        raise ValueError(f"workers: expected an integer in [1, 1024], got {workers!r}")
    if executor == "local" and (workers != 1 or scheduler):
        raise ValueError(f"{'workers' if workers != 1 else 'scheduler'}: expected --executor dask with it, "
                         "got executor 'local'")
    if executor == "dask" and shard is not None:
        raise ValueError(f"shard: expected no --shard with --executor dask (it runs and merges every shard), "
                         f"got {shard!r}")
    if shard is not None:
        parse_shard(shard)


def _read_shard(folder: Path) -> tuple[dict, int, int, range]:
    """Read a shard folder's settings (without ``shard``, ``shard_samples``), its index, count and sample ids."""
    expected = "shards: expected the folder of a genpath synth --shard run, got"
    if not folder.is_dir():
        raise FileNotFoundError(f"{expected} {folder} (missing)")
    settings = recorded_settings(folder / RUN_FILE)
    if not settings:
        raise ValueError(f"{expected} {folder} ({'no' if settings is None else 'an unreadable'} {RUN_FILE})")
    try:
        index, count = parse_shard(settings.get("shard"))
        start, stop = settings["shard_samples"]
        ids, total, batch = range(int(start), int(stop)), int(settings["n_samples"]), int(settings["batch_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{expected} {folder} (an unsharded run)") from None
    if not (total >= 1 and batch >= 1 and ids == shard_samples(total, batch, f"{index}/{count}")):
        raise ValueError(f"{expected} {folder} (shard_samples {[start, stop]} are not those of shard {index}/{count})")
    base = {k: v for k, v in settings.items() if k not in SHARD_KEYS[:2]}
    return base, index, count, ids


def _shard_rows(folder: Path, name: str, ids: range) -> tuple[list[str], list[dict], list[dict]]:
    """Manifest columns, sample rows (checked to be exactly ``ids``) and failed rows of a finished shard."""
    path, fields = folder / "manifest.csv", []
    if path.is_file():
        with open(path, newline="") as handle:
            fields = next(csv.reader(handle), [])
    rows = read_manifest(path)
    done = done_rows(rows)
    found = {int(r["id"]) for r in done}
    if len(found) != len(done) or len(found) != len(ids) or (found and (min(found), max(found)) != (ids.start,
                                                                                                    ids.stop - 1)):
        held = sum(i in ids for i in found)
        raise ValueError(f"shards: expected shard {name} finished with samples {ids.start}..{ids.stop - 1}, got "
                         f"{held} of {len(ids)} in {folder} (rerun it to resume)")
    return fields, sorted(done, key=lambda r: int(r["id"])), [r for r in rows if r.get("status") == "failed"]


def _copy_file(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def merge_shards(folders: Iterable[str | Path], out: str | Path, overwrite: bool = False) -> list[dict]:
    """Merge the finished shards of one run into ``out``, as an unsharded run with the same settings writes it.

    Args:
        folders: every shard folder of the run (any order), each once.
        out: the merged run folder (resumes or is refused like any run folder, see :func:`prepare_run_folder`).
        overwrite: first delete a previous run's outputs in ``out``.

    Returns:
        The merged manifest rows (samples in id order, then the failed inputs).

    Raises:
        ValueError / FileNotFoundError: one line naming the shard: not a shard folder, shards of
            other runs, splits or batch sizes, a shard given twice, missing or unfinished.
    """
    folders, out = [Path(f) for f in folders], Path(out)
    if not folders:
        raise ValueError("shards: expected at least one shard folder, got none")
    shards = [(folder, *_read_shard(folder)) for folder in folders]
    first, base, _, count, _ = shards[0]
    seen: dict[int, Path] = {}
    for folder, settings, index, n, _ in shards:
        if settings != base:
            keys = sorted(k for k in settings.keys() | base.keys() if settings.get(k) != base.get(k))
            raise ValueError(f"shards: expected shards of one run, got {folder} with different {', '.join(keys)} "
                             f"than {first}")
        if n != count:
            raise ValueError(f"shards: expected shards of one split into {count}, got {folder} (shard {index}/{n})")
        if index in seen:
            raise ValueError(f"shards: expected each shard once, got shard {index}/{n} twice ({seen[index]}, {folder})")
        seen[index] = folder
    missing = [i for i in range(count) if i not in seen]
    if missing:
        raise ValueError(f"shards: expected all {count} shards, got none for shard "
                         f"{', '.join(f'{i}/{count}' for i in missing[:5])}{' ...' if len(missing) > 5 else ''}")
    shards.sort(key=lambda s: s[2])
    total, merged = base["n_samples"], {k: v for k, v in base.items() if k not in SHARD_KEYS}
    resumes = not overwrite and recorded_settings(out / RUN_FILE) == json.loads(json.dumps(merged))
    for folder in folders:
        if out.resolve() == folder.resolve():
            raise ValueError(f"out: expected a folder other than the shards, got {out}")
        if not resumes and folder.resolve().is_relative_to((out / SHARDS).resolve()):  # a new run clears it
            raise ValueError(f"shards: expected shard folders outside {out / SHARDS} unless {out} holds their "
                             f"run already, got {folder}")
    check_inputs_outside(out, folders, "shards")
    fields, parts, failed = [], [], []
    for folder, _, index, _, ids in shards:
        columns, done, bad = _shard_rows(folder, f"{index}/{count}", ids)
        fields, failed = fields or columns, failed or bad
        parts.append((folder, done))
    rows = [row for _, done in parts for row in done]
    embeddings = [folder / "embeddings.npy" for folder, *_ in shards if (folder / "embeddings.npy").is_file()]
    for other in embeddings[1:]:
        if other.read_bytes() != embeddings[0].read_bytes():
            logger.warning("shards: %s differs from %s (conditions embedded on other hardware?); keeping the first",
                           other, embeddings[0])
    prepare_run_folder(out, merged, overwrite)
    if embeddings:
        _copy_file(embeddings[0], out / "embeddings.npy")
    store = next((name for name in RUN_STORES if (first / name).is_dir()), None)
    if base.get("output_format") == "zarr" and store:
        _merge_zarr([(folder / store, ids) for folder, *_, ids in shards], out / store, total)
    else:
        for folder, row in ((folder, row) for folder, done in parts for row in done):
            for key, sub in (("file", "images"), ("mask_file", "masks")):
                if key not in row:
                    continue
                name = row[key] or ""
                if not re.fullmatch(f"{sub}/{RUN_SAMPLES[sub]}", name):
                    raise ValueError(f"shards: expected {sub}/ files in the manifest of {folder}, got {name!r}")
                _copy_file(folder / name, out / name)
    atomic_write_csv(out / "manifest.csv", rows + failed, fields)
    logger.info("merged %d shards (%d samples) into %s", count, len(rows), out)
    from genpath.report.synth import write_synth_extras

    write_synth_extras(out)  # dataset card, contact sheet and report.html, as an unsharded run writes them
    return rows + failed


def _merge_zarr(parts: list[tuple[Path, range]], target: Path, total: int, block: int = 64) -> None:
    """Copy each shard's range of the per-sample arrays (and the others whole) into one zarr group."""
    import zarr

    sources = [(zarr.open_group(str(path), mode="r"), ids) for path, ids in parts]
    group = zarr.open_group(str(target), mode="a")
    for name, array in sources[0][0].arrays():
        if name not in SAMPLE_ARRAYS:  # condition, seed, embeddings ((N,D) or (N,T,D)): the same in every shard
            group.create_array(name, data=array[...], overwrite=True)
            continue
        merged = group.create_array(name, shape=array.shape, chunks=array.chunks, dtype=array.dtype, overwrite=True)
        for (source, ids), (path, _) in zip(sources, parts, strict=True):
            if name not in source or source[name].shape != (total, *array.shape[1:]):
                raise ValueError(f"shards: expected {name} of shape {array.shape} in {path}, got "
                                 f"{source[name].shape if name in source else 'none'}")
            for start in range(ids.start, ids.stop, block):
                stop = min(start + block, ids.stop)
                merged[start:stop] = source[name][start:stop]


def _run_shard(run: Callable[[Any], list[dict]], threads: int, cfg: Any) -> int:
    """Run one shard with ``threads`` torch threads (the driver's: same float results); return its sample count."""
    import torch

    torch.set_num_threads(threads)
    return sum(row.get("status") != "failed" for row in run(cfg))


def run_sharded(cfg: Any, run: Callable[[Any], list[dict]], plan: Callable[[Any], tuple[dict, int]],
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Run ``cfg`` as ``cfg.workers`` shards on a dask cluster and merge them into ``cfg.out``.

    Args:
        cfg: a synth config (``out``, ``overwrite``, ``workers``, ``scheduler``, ``shard`` fields).
        run: the unsharded runner (a top-level function, pickled by reference), called per shard.
        plan: returns the run's settings and sample count (checks the inputs before any work).
        progress: called as ``(samples done, total)`` as shards finish.

    Returns:
        The merged manifest rows.
    """
    import torch

    settings, total = plan(cfg)
    out = Path(cfg.out)
    prepare_run_folder(out, settings, cfg.overwrite)
    rows = read_manifest(out / "manifest.csv")
    if len({int(r["id"]) for r in done_rows(list(rows))}) == total:  # finished (ids are 0..total-1)
        _remove_shard_folders(out)
        return rows
    count = cfg.workers
    shard_cfgs = [replace(cfg, out=str(out / SHARDS / f"{i}-of-{count}"), shard=f"{i}/{count}", executor="local",
                          workers=1, scheduler=None, overwrite=False) for i in range(count)]
    task = functools.partial(_run_shard, run, torch.get_num_threads())
    done = 0
    for finished in _dask_map(task, shard_cfgs, count, cfg.scheduler):
        done += finished
        if progress:
            progress(done, total)
    rows = merge_shards([c.out for c in shard_cfgs], out)
    _remove_shard_folders(out)
    return rows


def _dask_map(task: Callable[[Any], int], items: list, workers: int, scheduler: str | None) -> Iterable[int]:
    """Yield ``task(item)`` results as they finish, on a local dask cluster of ``workers`` (or at ``scheduler``)."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError("executor: 'dask' needs dask.distributed: pip install 'genpath[dask]'") from error
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError) as error:
            raise ValueError(f"scheduler: expected a reachable dask scheduler, got {scheduler} "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        for future in as_completed(client.map(task, items, pure=False)):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
