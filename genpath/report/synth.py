"""What ``genpath synth`` leaves beside its samples for a person: a dataset card, a contact sheet and a report.

* :func:`write_dataset_card`: ``OUT/dataset_card.md``: the model, its provenance and licence as
  far as the checkpoint folder records them, the parameters, seeds, counts and command line.
* :func:`write_contact_sheet`: a PNG grid of the first samples (``OUT/contact_sheet.png``).
* :func:`write_synth_report`: ``OUT/report.html`` with one row per sample (thumbnail, mask,
  condition, seed) and the failed inputs in red, built from the manifest.
* :func:`write_synth_extras`: all three from a finished run folder (what ``genpath synth``
  calls at the end of a run); :func:`remove_synth_extras` deletes them (``--overwrite``).
"""

from __future__ import annotations

import datetime
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpath.report.grid import labelled_grid, save_grid
from genpath.report.html import BatchReport, ReportHeader, ReportRow
from genpath.utils.atomic import atomic_write_text
from genpath.utils.logging import get_logger

logger = get_logger(__name__)
__all__ = ["EXTRA_FILES", "colour_labels", "model_provenance", "remove_synth_extras", "write_contact_sheet",
           "write_dataset_card", "write_synth_extras", "write_synth_report"]
CARD = "dataset_card.md"
CONTACT_SHEET = "contact_sheet.png"
#: what :func:`write_synth_extras` writes beside the samples (plus the ``report/`` thumbnails)
EXTRA_FILES = (CARD, CONTACT_SHEET, "report.html")
_LICENCE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "LICENCE.txt", "COPYING")
_CARD_FILES = ("README.md", "MODEL_CARD.md", "model_card.md")


def colour_labels(labels: Any) -> np.ndarray:
    """Colour an instance label map ``(H,W)`` as uint8 ``(H,W,3)``: background black, each label a fixed colour."""
    array = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    palette = np.stack([(array * 67 + 80) % 200 + 55, (array * 151 + 30) % 200 + 55, (array * 37 + 140) % 200 + 55],
                       axis=-1)
    return np.where(array[..., None] > 0, palette, 0).astype(np.uint8)


def write_contact_sheet(images: Sequence[Any] | torch.Tensor, path: str | Path, labels: Sequence[str] | None = None,
                        columns: int = 8, cell_size: int | None = None) -> Path:
    """Write a grid of ``images`` (uint8/float ``(N,3,H,W)`` or a list of images) as a PNG; returns ``path``.

    ``cell_size`` defaults to the images' size, at most 128 pixels.

    Raises:
        ValueError: no images, or a path that is not an image file name.
    """
    cells = list(images)
    if not cells:
        raise ValueError("images: expected at least one image for the contact sheet, got none")
    if cell_size is None:
        cell_size = min(128, max(max(np.shape(c)[-2:]) if isinstance(c, torch.Tensor) else 128 for c in cells))
    grid = labelled_grid(cells, labels, columns=min(columns, len(cells)), cell_size=cell_size, padding=2)
    return save_grid(grid, path)


def _front_matter_licence(text: str) -> str | None:
    match = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if match:
        found = re.search(r"^licen[cs]e:\s*(.+)$", match.group(1), re.M | re.I)
        if found:
            return found.group(1).strip().strip("'\"")
    return None


def model_provenance(model_dir: str | Path) -> dict[str, str]:
    """Read what a checkpoint folder records about itself: class, origin, base model, encoder and licence.

    The licence comes from a licence file, a model card's front matter (``license:``) or a
    ``license`` key in the folder's JSON files; "" when none records it.
    """
    folder = Path(model_dir)
    info: dict[str, str] = {"folder": str(folder)}
    for name in ("model_index.json", "config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            info.setdefault("class", str(data.get("_class_name", "")))
            info.setdefault("origin", str(data.get("_name_or_path", "")))
            info.setdefault("diffusers", str(data.get("_diffusers_version", "")))
            for key in ("license", "licence"):
                if data.get(key):
                    info.setdefault("licence", str(data[key]))
                    info.setdefault("licence_source", name)
    for name, key in (("base.json", "pipeline"), ("encoder.json", "name")):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get(key):
                info["base" if name == "base.json" else "encoder"] = str(data[key])
        except (OSError, ValueError):
            pass
    for name in _LICENCE_FILES:
        if "licence" not in info and (folder / name).is_file():
            first = next((line.strip() for line in (folder / name).read_text(errors="replace").splitlines()
                          if line.strip()), "")
            info.update(licence=first[:120], licence_source=name)
    for name in _CARD_FILES:
        if (folder / name).is_file():
            info.setdefault("card", name)
            licence = _front_matter_licence((folder / name).read_text(errors="replace"))
            if licence and "licence" not in info:
                info.update(licence=licence, licence_source=name)
    return {k: v for k, v in info.items() if v}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_dataset_card(out_dir: str | Path, model_dir: str | Path, settings: dict[str, Any], counts: dict[str, Any],
                       command_line: str | Sequence[str] | None = None) -> Path:
    """Write ``out_dir/dataset_card.md`` (Markdown, atomically); returns its path.

    Args:
        out_dir: the synth run folder.
        model_dir: the checkpoint folder the samples came from.
        settings: what decided the samples (``run.json``'s settings).
        counts: e.g. ``{"samples": 32, "failed inputs": 0, "conditions": 16}``.
        command_line: the command that made the dataset (a string or argv; default ``sys.argv``).
    """
    from genpath import __version__

    out = Path(out_dir)
    if command_line is None:
        command_line = sys.argv
    command = command_line if isinstance(command_line, str) else shlex.join(str(a) for a in command_line)
    info = model_provenance(model_dir)
    licence = info.get("licence")
    licence_line = (f"{licence} (from `{info['licence_source']}`)" if licence else
                    "not recorded in the model folder: check the model's terms before sharing these images")
    seed = settings.get("seed")
    seeds = (f"Sample `i` (column `id` of `manifest.csv`) was drawn with its own generator seeded `{seed} + i`, so "
             "any sample can be regenerated alone" if isinstance(seed, int) else "See `manifest.csv` (column `seed`)")
    masks = str(settings.get("command", "")).endswith("--masks")
    store = "pairs.zarr" if masks else "images.zarr"
    layout = (f"`{store}`" if settings.get("output_format") == "zarr" else
              "`images/*.png`" + (" + `masks/*.npz`" if masks else "")) + ", `manifest.csv`, `run.json`"
    lines = [
        f"# Synthetic dataset: {out.resolve().name}", "",
        f"Generated by genpath {__version__} on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.", "",
        "```bash", command, "```", "",
        "## Model", "",
        "| | |", "|---|---|",
        *(f"| {k} | {_cell(v)} |" for k, v in info.items() if k not in ("licence", "licence_source")),
        f"| licence | {_cell(licence_line)} |", "",
        "## Parameters", "",
        "| setting | value |", "|---|---|",
        *(f"| {k} | {_cell(v)} |" for k, v in settings.items()), "",
        "## Seeds", "", seeds + ".", "",
        "## Counts", "",
        *(f"- {k}: {v}" for k, v in counts.items()), "",
        "## Files", "",
        f"{layout}. Load them with:", "",
        "```python", "from torch.utils.data import DataLoader", "from genpath.data import SyntheticDataset", "",
        f'loader = DataLoader(SyntheticDataset("{out}"), batch_size=32, shuffle=True)', "```", "",
    ]
    if (out / CONTACT_SHEET).is_file():
        lines += ["## First samples", "", f"![contact sheet]({CONTACT_SHEET})", ""]
    return atomic_write_text(out / CARD, "\n".join(lines))


def _dataset(out: Path) -> Any:
    from genpath.data import SyntheticDataset

    return SyntheticDataset(out)


def write_synth_report(out_dir: str | Path, max_rows: int = 2000, thumbnail_size: int = 128) -> Path:
    """Write ``out_dir/report.html`` from a synth run's manifest: one row per sample, failed inputs in red.

    Raises:
        FileNotFoundError / ValueError: ``out_dir`` is not a synth output folder.
    """
    from genpath import __version__

    out = Path(out_dir)
    dataset = _dataset(out)
    settings = dataset.settings
    masks = dataset.masks
    header = ReportHeader(
        title=f"genpath {settings.get('command', 'synth')}: {out.resolve().name}",
        fields={"model": settings.get("model", ""), "steps": settings.get("steps", ""),
                "guidance": settings.get("guidance", ""), "seed": settings.get("seed", ""),
                "format": settings.get("output_format", ""), "version": __version__},
        images={"contact sheet": CONTACT_SHEET} if (out / CONTACT_SHEET).is_file() else {},
        image_columns=(("image", "image"), ("mask", "instances")) if masks else (("image", "image"),),
        value_columns=(("id", "id"), ("seed", "seed"), ("condition", "condition"), ("reference", "reference")),
        swatch_title="")
    report = BatchReport(out, header, max_rows=max_rows, keep_previous=False)
    for index, row in enumerate(dataset.rows):
        key = f"{row['id']}"
        images: dict[str, str] = {}
        if index < max_rows:
            item = dataset[index]
            images["image"] = report.thumbnail(key, "image", item["image"], thumbnail_size)
            if masks:
                images["mask"] = report.thumbnail(key, "mask", colour_labels(item["instances"]), thumbnail_size)
        reference = row.get("mask_source") if masks else row.get("source")
        report.update(ReportRow(key=key, name=row["file"], status=row.get("status") or "done",
                                images={k: v for k, v in images.items() if v},
                                values={"id": int(row["id"]), "seed": int(row["seed"]),
                                        "condition": int(row.get("mask" if masks else "condition") or 0),
                                        "reference": reference or ""}))
    for row in dataset.failed:
        name = row.get("source") or row.get("mask_source") or row.get("style") or "input"
        report.update(ReportRow(key=f"failed:{name}", name=name, status="failed", error=row.get("error", "")))
    return report.write()


def write_synth_extras(out_dir: str | Path, command_line: str | Sequence[str] | None = None,
                       contact_sheet_samples: int = 64) -> dict[str, Path]:
    """Write the contact sheet, ``report.html`` and ``dataset_card.md`` of a finished synth run folder.

    Never raises: a problem is logged and the samples stay as they are.

    Returns:
        ``{"contact_sheet": path, "report": path, "card": path}`` for what was written.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    try:
        dataset = _dataset(out)
        first = [dataset[i] for i in range(min(contact_sheet_samples, len(dataset)))]
        written["contact_sheet"] = write_contact_sheet([item["image"] for item in first], out / CONTACT_SHEET,
                                                       [f"#{item['id']} seed {item['seed']}" for item in first])
        written["report"] = write_synth_report(out)
        conditions = len({r.get("mask" if dataset.masks else "condition") for r in dataset.rows})
        counts = {"samples": len(dataset), "failed inputs": len(dataset.failed),
                  ("masks" if dataset.masks else "conditions"): conditions}
        model = dataset.settings.get("model", "")
        written["card"] = write_dataset_card(out, model, dataset.settings, counts, command_line)
    except Exception as error:  # noqa: BLE001 - the extras must never fail a finished run
        logger.warning("synth: could not write the dataset card/report in %s: %s", out, error)
    return written


def remove_synth_extras(out_dir: str | Path) -> None:
    """Delete what :func:`write_synth_extras` wrote in ``out_dir`` (card, contact sheet, report and its thumbnails)."""
    out = Path(out_dir)
    for name in EXTRA_FILES:
        (out / name).unlink(missing_ok=True)
    assets = out / "report"
    if assets.is_dir():
        for path in assets.iterdir():
            if path.is_file() and (path.name == "rows.json" or re.fullmatch(r".+-[0-9a-f]{10}-(image|mask)\.jpg",
                                                                            path.name)):
                path.unlink()
        if not any(assets.iterdir()):
            assets.rmdir()
