"""``genpath normalize``: stain-normalize image tiles or whole slides, as one call each.

* :func:`resolve_normalize_config`: a YAML run config (optional) with command-line overrides
  on top, validated into a :class:`~normalization.config.NormalizeConfig` for one mode.
* :func:`run_normalize_tiles`: fit (or load) once, normalize image files in batches
  (:func:`normalization.tiles.normalize_tiles`).
* :func:`run_normalize_slides`: the whole-slide batch (:func:`normalization.batch.run_batch`:
  per-slide fit, pyramids, manifest, resume, executors).
* :func:`detect_mode`: the old automatic choice between the two (slides if any input is one).

Example:
    >>> cfg = resolve_normalize_config(None, "tiles", method="reinhard", target=["t.png"])
    >>> cfg.method, cfg.output_format
    ('reinhard', 'png')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from genpath.config import check_types, load_config
from genpath.io.images import expand_inputs, plan_outputs
from genpath.utils.logging import get_logger
from genpath.utils.paths import require_output_folder
from genpath.utils.runs import check_run_settings, previous_manifest_outputs
from genpath.wsi import inputs_hold_slides
from normalization.batch import config_hash, file_digest, normalizer_for, run_batch, target_files
from normalization.config import NormalizeConfig, load_or_fit_normalizer
from normalization.tiles import normalize_tiles, refuse_output_collisions

logger = get_logger(__name__)
Mode = Literal["tiles", "slides"]
SLIDE_KEYS = ("tile_size", "overlap", "level", "compression")
OPTION_KEYS = ("on_invalid", "model", "colour_anchor")


def detect_mode(inputs: Sequence[str | Path], output_format: str | None = None,
                config_file: str | Path | None = None) -> Mode:
    """``slides`` when ``output_format`` (given, or the config file's) is a slide format or any input is a slide."""
    if output_format is None and config_file is not None:
        output_format = load_config(config_file, NormalizeConfig, section="normalize").output_format
    if output_format in ("tiff", "ome-zarr"):
        return "slides"
    return "slides" if inputs_hold_slides(inputs) else "tiles"


def resolve_normalize_config(config_file: str | Path | None, mode: Mode, **overrides: Any) -> NormalizeConfig:
    """Merge a YAML config (its ``normalize`` section) with overrides (None = not given) for one mode.

    Overrides are :class:`NormalizeConfig` fields, or slide keys (``tile_size``, ``overlap``,
    ``level``, ``compression``) that go to the ``slide`` block, or normalizer options
    (``on_invalid``, ``model``, ``colour_anchor``) that go to ``options``. A tile-dependent method (``stainfuser``)
    gets a 32-pixel feathered overlap on slides unless one is set.

    Raises:
        ValueError: a bad value or a format that does not fit the mode (one line, naming it).
        FileNotFoundError: the config file is missing.
    """
    base = load_config(config_file, NormalizeConfig, section="normalize") if config_file else NormalizeConfig()
    given = {k: v for k, v in overrides.items() if v is not None}
    slide = {**base.slide, **{k: given.pop(k) for k in SLIDE_KEYS if k in given}}
    options = {**base.options, **{k: str(given.pop(k)) if k == "model" else given.pop(k)
                                  for k in OPTION_KEYS if k in given}}
    if "state" in given:
        given["state"] = str(given["state"])
    merged = {**base.__dict__, **given, "slide": slide, "options": options}
    if merged["method"] == "stainfuser":
        # registers the plugin even where package metadata is missing (a source checkout on PYTHONPATH)
        import genpath.pipelines.stainfuser_normalizer  # noqa: F401
    if merged["method"] == "stainfuser" and "overlap" not in slide and mode == "slides":
        merged["slide"]["overlap"] = 32  # a tile-wise model: feather-blend overlapping windows
    formats = {"tiles": ("png", "jpg", "tif", "same"), "slides": ("tiff", "ome-zarr")}[mode]
    if merged["output_format"] is None:
        merged["output_format"] = formats[0]
    if merged["output_format"] not in formats:
        raise ValueError(f"format: expected one of {formats} for {mode}, got {merged['output_format']!r}")
    checked = check_types(NormalizeConfig, given, "command-line options")
    return NormalizeConfig(**{**merged, **checked})


def _check_state_destination(save_state: str | Path | None, inputs: Sequence[str | Path],
                             config: NormalizeConfig) -> None:
    if save_state is None:
        return
    destination = Path(save_state).resolve()
    protected = [Path(p).resolve() for p in [*inputs, *config.target] + ([config.state] if config.state else [])]
    if destination in protected:
        raise ValueError(f"save_state: expected a new file, got {save_state} (an input, target or state)")
    if destination.suffix != ".safetensors":
        raise ValueError(f"save_state: expected a .safetensors file name, got {save_state}")
    if destination.exists() and not _is_normalizer_state(destination):
        raise ValueError(f"save_state: expected a new file or a saved normalizer to replace, got {save_state} "
                         "(an existing file genpath did not write)")


def _is_normalizer_state(path: Path) -> bool:
    """Whether ``path`` is a state file written by ``StainNormalizer.save`` (safe to replace)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return "genpath_normalizer" in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def tile_settings(config: NormalizeConfig) -> dict[str, Any]:
    """Fingerprint of what decides tile outputs: method, options, target/state file contents, format, version."""
    from genpath import __version__

    targets = [file_digest(p) for p, _ in target_files(config.target)] if config.target and not config.state else []
    return {"method": None if config.state else config.method, "options": config.options, "targets": targets,
            "state": file_digest(config.state) if config.state and Path(config.state).is_file() else None,
            "format": config.output_format or "png", "version": __version__}


def run_normalize_tiles(
    inputs: Sequence[str | Path],
    out: str | Path,
    config: NormalizeConfig,
    save_state: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Fit (or load) the normalizer once and normalize image tiles into ``out`` (see :func:`normalize_tiles`).

    A rerun into ``out`` with other settings (method, options, target or state contents, format)
    is refused unless ``overwrite``, which first removes the previous run's outputs: one folder
    never mixes tiles normalized two ways.
    """
    config.require_source()
    require_output_folder(out)
    _check_state_destination(save_state, inputs, config)
    # every output name checked before the normalizer is fitted or a state written
    refuse_output_collisions(plan_outputs(expand_inputs(inputs), out, config.output_format or "png"))
    check_run_settings(out, "normalize tiles", tile_settings(config), overwrite, previous_manifest_outputs(out))
    normalizer = load_or_fit_normalizer(config.method, config.target, config.state, config.options, config.device)
    if save_state:
        normalizer.save(save_state)
    logger.info("normalizing tiles with %s", normalizer.method)
    return normalize_tiles(inputs, out, normalizer, config.output_format or "png", config.batch_size, config.device,
                           progress=progress, target=None if config.state else config.target)


def run_normalize_slides(
    inputs: Sequence[str | Path],
    out: str | Path,
    config: NormalizeConfig,
    save_state: str | Path | None = None,
    on_slide: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
    tile_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Normalize whole slides into ``out`` (see :func:`normalization.batch.run_batch`)."""
    config.require_source()
    require_output_folder(out)
    _check_state_destination(save_state, inputs, config)
    if save_state:
        normalizer_for(config, config_hash(config)).save(save_state)
    return run_batch(inputs, out, config, overwrite=config.resume is False, on_slide=on_slide, on_start=on_start,
                     tile_progress=tile_progress)
