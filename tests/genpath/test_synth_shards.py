"""Sharded synthesis (issue 20, part 4): ``genpath synth --shard I/N``, ``synth-merge``, ``--executor dask``.

Known answer: an unsharded run of the shipped ``ldm_small`` (2 steps). Shards cover whole batches
and keep per-sample seeds, so the merged shards (and the dask executor) must write the same bytes:
run.json, manifest.csv (rows in id order, failed inputs last), embeddings.npy, every zarr chunk
and PNG.
"""

import csv
import json
import random
import shutil

import numpy as np
import pytest
import torch
from distributed import LocalCluster
from typer.testing import CliRunner

from genpath.cli import app
from genpath.encoders.reference import save_encoder_reference
from genpath.synth import SynthConfig, run_synth
from genpath.synth_masks import MaskSynthConfig, run_mask_synth
from genpath.synth_shards import SHARDS, merge_shards, parse_shard, shard_samples
from tests.conftest import SAMPLES
from tests.genpath.test_mask_pipeline import ldm_dir, mask_pipe, masks  # noqa: F401 - fixtures

runner = CliRunner()
LDM = SAMPLES / "checkpoints" / "ldm_small"
REGISTER_PARAMETER = torch.nn.Module.register_parameter  # accelerate patches it while loading


def tree(root):
    """Every output file under ``root`` by relative path, with its bytes.

    The extras (dataset card, contact sheet, report.html and its thumbnails) are left out: the card
    records the command line, which differs between a merge and a single run; the samples,
    manifest, run.json and embeddings must match byte for byte.
    """
    from genpath.report.synth import EXTRA_FILES

    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in EXTRA_FILES and p.relative_to(root).parts[0] != "report"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: fast on a busy shared CPU (every run here, dask workers included, uses the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two real tiles and one unreadable image (a failed manifest row in every run)."""
    folder = tmp_path_factory.mktemp("shard_inputs")
    for tile in sorted((SAMPLES / "tiles" / "pcam").glob("*.jpg"))[:2]:
        shutil.copy(tile, folder / tile.name)
    (folder / "zz_broken.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def synth_args(images):
    """``genpath synth`` arguments of the test run (2 conditions x 5 = 10 samples, 5 batches of 2) for a format."""
    def args(fmt, out, *extra):
        return ["synth", "--model", LDM, "--from-images", images, "--n-per-condition", 5, "--steps", 2,
                "--batch-size", 2, "--format", fmt, "--out", out, *extra]
    return args


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_args):
    """Unsharded reference runs and 4-shard runs (CLI), made once per format."""
    root, made = tmp_path_factory.mktemp("shard_runs"), {}

    def get(fmt, shard=None):
        key = (fmt, shard)
        if key not in made:
            out = root / fmt / (shard.replace("/", "-of-") if shard else "full")
            result = invoke(*synth_args(fmt, out, *(["--shard", shard] if shard else [])))
            assert result.exit_code == 1 and "zz_broken.png" in result.output, result.output  # the failed row
            made[key] = out
        return made[key]
    return get


@pytest.fixture(scope="module")
def threads_cluster():
    """An in-process dask cluster (threads: no worker start-up cost), reached by its address."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_shard_samples_are_disjoint_runs_of_whole_batches():
    assert [shard_samples(10, 2, f"{i}/4") for i in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 10)]
    assert shard_samples(10, 2, None) == range(10) and shard_samples(10, 2, "0/1") == range(10)
    for n_total, batch, count in [(1, 1, 1), (7, 3, 2), (100, 8, 7), (5, 4, 9), (1000, 1, 1000), (33, 32, 3)]:
        parts = [shard_samples(n_total, batch, f"{i}/{count}") for i in range(count)]
        assert [i for part in parts for i in part] == list(range(n_total))  # disjoint, in order, complete
        assert all(part.start % batch == 0 for part in parts if part)  # boundaries on batch boundaries
        assert max(map(len, parts)) - min(map(len, parts)) <= batch  # balanced to one batch
    assert parse_shard(" 3/4 ") == (3, 4)


@pytest.mark.parametrize("fmt", ["zarr", "png"])
def test_four_shards_merged_equal_the_unsharded_run_bitwise(tmp_path, runs, synth_args, fmt):
    full = runs(fmt)
    shards = [runs(fmt, f"{i}/4") for i in range(4)]
    for shard in shards:  # each shard holds only its part
        rows = list(csv.DictReader(open(shard / "manifest.csv", newline="")))
        ids = [int(r["id"]) for r in rows if r["status"] == "done"]
        assert ids == list(shard_samples(10, 2, json.loads((shard / "run.json").read_text())["settings"]["shard"]))
    random.Random(0).shuffle(shards)  # any order
    result = invoke("synth-merge", *shards, "--out", tmp_path / "merged")
    assert result.exit_code == 1 and "zz_broken.png" in result.output, result.output  # failed input reported once
    assert tree(tmp_path / "merged") == tree(full)
    rows = list(csv.DictReader(open(tmp_path / "merged" / "manifest.csv", newline="")))
    assert [r["id"] for r in rows] == [str(i) for i in range(10)] + [""] and rows[-1]["status"] == "failed"
    assert invoke(*synth_args(fmt, tmp_path / "merged")).exit_code == 1  # a finished run like any other: resumes
    assert tree(tmp_path / "merged") == tree(full)


def test_one_shard_and_a_merge_of_it_equal_the_unsharded_run(tmp_path, runs, synth_args):
    assert invoke(*synth_args("zarr", tmp_path / "one", "--shard", "0/1")).exit_code == 1
    assert invoke("synth-merge", tmp_path / "one", "--out", tmp_path / "merged").exit_code == 1
    assert tree(tmp_path / "merged") == tree(runs("zarr"))


def test_shard_resumes_and_refuses_another_shard_or_batch_size(tmp_path, runs, synth_args):
    out = tmp_path / "s3"
    shutil.copytree(runs("png", "3/4"), out)  # shard 3/4: samples 6..9, two batches
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    with open(out / "manifest.csv", "w", newline="") as handle:  # interrupted after its first batch
        writer = csv.DictWriter(handle, fieldnames=rows[0].keys())
        writer.writeheader()
        writer.writerows(rows[:2])
    for name in ("cond00001_003.png", "cond00001_004.png"):
        (out / "images" / name).unlink()
    assert invoke(*synth_args("png", out, "--shard", "3/4")).exit_code == 1
    assert tree(out) == tree(runs("png", "3/4"))
    assert "different shard, shard_samples" in error_line(invoke(*synth_args("png", out, "--shard", "2/4")))
    assert "different batch_size, shard_samples" in error_line(
        invoke(*synth_args("png", out, "--shard", "3/4", "--batch-size", "3")))
    assert "different batch_size, n_samples, shard, shard_samples" in error_line(invoke(*synth_args("png", out)))
    assert tree(out) == tree(runs("png", "3/4"))  # refusals touch nothing


def test_merge_refuses_missing_overlapping_mismatched_and_unfinished_shards(tmp_path, runs):
    shards = [runs("zarr", f"{i}/4") for i in range(4)]
    merged = tmp_path / "merged"

    def refused(*folders, out=merged):
        line = error_line(invoke("synth-merge", *folders, "--out", out))
        assert not merged.exists()
        return line

    assert "none for shard 2/4" in refused(*shards[:2], shards[3])
    assert "shard 1/4 twice" in refused(*shards, shards[1])
    other_seed = tmp_path / "other_seed"
    shutil.copytree(shards[2], other_seed)
    record = json.loads((other_seed / "run.json").read_text())
    record["settings"]["seed"] = 1
    (other_seed / "run.json").write_text(json.dumps(record))
    line = refused(*shards[:2], other_seed, shards[3])
    assert f"{other_seed} with different seed" in line
    other_split = tmp_path / "other_split"
    shutil.copytree(shards[2], other_split)
    record["settings"].update(seed=0, shard="1/3", shard_samples=[2, 6])
    (other_split / "run.json").write_text(json.dumps(record))
    assert f"{other_split} (shard 1/3)" in refused(*shards[:2], other_split, shards[3])
    record["settings"].update(shard="2/4", shard_samples=[3, 6])  # a run.json that lies about its part
    (other_split / "run.json").write_text(json.dumps(record))
    assert "shard_samples [3, 6] are not those of shard 2/4" in refused(*shards[:2], other_split, shards[3])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(shards[1], unfinished)
    rows = (unfinished / "manifest.csv").read_text().splitlines()
    (unfinished / "manifest.csv").write_text("\n".join(rows[:2]) + "\n")  # header and one sample
    line = refused(shards[0], unfinished, *shards[2:])
    assert "shard 1/4 finished with samples 2..3, got 1 of 2" in line and str(unfinished) in line
    assert f"got {runs('zarr')} (an unsharded run)" in refused(*shards, runs("zarr"))
    assert "(missing)" in refused(*shards, tmp_path / "nowhere")
    assert "(no run.json)" in refused(tmp_path)
    assert "other than the shards" in refused(*shards, out=shards[0])
    assert tree(shards[0]) == tree(runs("zarr", "0/4"))


def test_dask_executor_runs_the_shards_and_merges_them(tmp_path, runs, images, synth_args, threads_cluster):
    out = tmp_path / "dask"
    (out / SHARDS / "notes").mkdir(parents=True)  # not a shard run: never deleted
    cfg = SynthConfig(model=str(LDM), out=str(out), from_images=[str(images)], n_per_condition=5, steps=2,
                      batch_size=2, output_format="png", executor="dask", workers=3, scheduler=threads_cluster)
    # an interrupted dask run left shard 0 of 3 finished: it is resumed, not redone
    run_synth(SynthConfig(**{**cfg.__dict__, "executor": "local", "workers": 1, "scheduler": None,
                             "shard": "0/3", "out": str(out / SHARDS / "0-of-3")}))
    progress = []
    rows = run_synth(cfg, progress=lambda done, total: progress.append((done, total)))
    assert [r["id"] for r in rows] == [str(i) for i in range(10)] + [""]
    assert sorted(progress)[-1] == (10, 10)
    assert not (out / SHARDS / "0-of-3").exists() and (out / SHARDS / "notes").is_dir()
    shutil.rmtree(out / SHARDS)
    assert tree(out) == tree(runs("png"))
    assert torch.nn.Module.register_parameter is REGISTER_PARAMETER  # threads never loaded at the same time
    assert run_synth(cfg) == rows and not (out / SHARDS).exists()  # finished: nothing to do
    result = invoke(*synth_args("zarr", tmp_path / "cli", "--executor", "dask", "--workers", 2, "--scheduler",
                                threads_cluster))
    assert result.exit_code == 1 and "zz_broken.png" in result.output, result.output
    assert tree(tmp_path / "cli") == tree(runs("zarr"))


def test_dask_run_inside_the_model_folder(tmp_path, runs, images, synth_args, threads_cluster):
    """Run folders inside the model folder (OUT, its shards) never count in the model's fingerprint."""
    model = tmp_path / "ldm"
    shutil.copytree(LDM, model)
    out = model / "synthetic"
    args = ["--model", model, "--executor", "dask", "--workers", 2, "--scheduler", threads_cluster]
    assert invoke(*synth_args("zarr", out), *args).exit_code == 1
    assert tree(out / "images.zarr") == tree(runs("zarr") / "images.zarr")
    assert json.loads((out / "run.json").read_text())["settings"]["model"] == str(model.resolve())
    before = tree(out)
    assert invoke(*synth_args("zarr", out), "--model", model).exit_code == 1  # an unsharded rerun: finished
    assert tree(out) == before


def test_unreachable_scheduler_is_one_line(tmp_path, synth_args, monkeypatch):
    monkeypatch.setattr("genpath.synth_shards.SCHEDULER_TIMEOUT", 0.5)
    result = invoke(*synth_args("zarr", tmp_path / "o", "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"))
    assert "scheduler: expected a reachable dask scheduler, got tcp://127.0.0.1:9" in error_line(result)


@pytest.fixture(scope="module")
def mask_model(tmp_path_factory, mask_pipe, ldm_dir):  # noqa: F811
    folder = tmp_path_factory.mktemp("mask_shards") / "model"
    mask_pipe.save_pretrained(folder)
    save_encoder_reference(folder, "genpath-small", {"path": ldm_dir.parent / "encoder"})
    inst, types = masks()
    np.savez(folder.parent / "m.npz", instances=inst.numpy(), types=types.numpy())
    return folder


@pytest.mark.parametrize("fmt", ["zarr", "png"])
def test_mask_synth_shards_merge_to_the_unsharded_run(tmp_path, mask_model, threads_cluster, fmt):
    kw = {"model": str(mask_model), "masks": str(mask_model.parent / "m.npz"), "n_per_mask": 3, "steps": 2,
          "batch_size": 2, "output_format": fmt}
    run_mask_synth(MaskSynthConfig(out=str(tmp_path / "full"), **kw))
    for i in range(2):
        run_mask_synth(MaskSynthConfig(out=str(tmp_path / f"s{i}"), shard=f"{i}/2", **kw))
    rows = merge_shards([tmp_path / "s1", tmp_path / "s0"], tmp_path / "merged")
    assert [r["id"] for r in rows] == [str(i) for i in range(6)]
    assert tree(tmp_path / "merged") == tree(tmp_path / "full")
    run_mask_synth(MaskSynthConfig(out=str(tmp_path / "dask"), executor="dask", workers=3, scheduler=threads_cluster,
                                   **kw))
    assert tree(tmp_path / "dask") == tree(tmp_path / "full")


@pytest.mark.parametrize("args", [
    ["--shard", "0/0"], ["--shard", "3/2"], ["--shard", "-1/2"], ["--shard", "a/b"], ["--shard", "1/0"],
    ["--shard", "2/2"], ["--shard", ""], ["--shard", "1/2/3"], ["--shard", "1"], ["--shard", "1.0/2"],
    ["--shard", "0/100001"], ["--shard", "1/2" * 50],
])
def test_hostile_shard_is_one_line_and_writes_nothing(tmp_path, images, args):
    result = invoke("synth", "--model", LDM, "--from-images", images, "--out", tmp_path / "o", *args)
    assert "shard: expected I/N with 0 <= I < N" in error_line(result)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--executor", "spark"], "executor: expected 'local' or 'dask', got 'spark'"),
    (["--workers", "2"], "workers: expected --executor dask with it"),
    (["--scheduler", "tcp://x:1"], "scheduler: expected --executor dask with it"),
    (["--executor", "dask", "--workers", "0"], "workers: expected an integer in [1, 1024], got 0"),
    (["--executor", "dask", "--shard", "0/2"], "shard: expected no --shard with --executor dask"),
])
def test_bad_executor_options_are_one_line(tmp_path, images, args, message):
    result = invoke("synth", "--model", LDM, "--from-images", images, "--out", tmp_path / "o", *args)
    assert message in error_line(result)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="shard: expected I/N"):
        SynthConfig(model="m", out="o", embeddings="e.npy", shard="3/2")
    with pytest.raises(ValueError, match="shard: expected I/N"):
        MaskSynthConfig(model="m", out="o", masks="x.npz", shard="-1/2")


@pytest.mark.slow
def test_dask_local_process_cluster_from_the_cli(tmp_path, runs, synth_args):
    """The CLI default: a local cluster of worker processes (each imports torch: tens of seconds)."""
    result = invoke(*synth_args("zarr", tmp_path / "dask", "--executor", "dask", "--workers", 2))
    assert result.exit_code == 1 and "zz_broken.png" in result.output, result.output
    assert tree(tmp_path / "dask") == tree(runs("zarr"))


def test_merge_writes_the_extras_of_a_finished_run(tmp_path, runs):
    from genpath.report.synth import EXTRA_FILES

    parts = [runs("zarr", f"{i}/4") for i in range(4)]
    assert invoke("synth-merge", *parts, "--out", tmp_path / "merged").exit_code in (0, 1)
    assert all((tmp_path / "merged" / name).is_file() for name in EXTRA_FILES)
    assert all((runs("zarr") / name).is_file() for name in EXTRA_FILES)  # an unsharded run writes them too
    assert not any((part / name).exists() for part in parts for name in EXTRA_FILES)  # shards leave them to the merge
