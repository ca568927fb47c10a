"""``genpath convert graikos-ldm``: Graikos et al.'s latent diffusion checkpoint → a folder ``genpath synth`` runs.

:func:`convert_graikos_ldm` reads the Lightning checkpoint (weights-only) and the project YAML
(``yaml.safe_load``) with :func:`genpath.pipelines.convert_graikos.load_graikos_ldm` and writes
an :class:`~genpath.pipelines.EmbeddingToImagePipeline` folder (``unet/`` UNet2DConditionModel,
``vae/`` VQModel, ``projector/`` LinearEmbeddingProjector, ``scheduler/`` PNDM, safetensors),
plus ``OUT/conversion.json`` (the source files, their SHA-256, the architecture, the guidance
convention). The folder is written atomically (complete or absent); an existing non-empty
``out`` is refused unless ``overwrite``.

Example:
    >>> record = convert_graikos_ldm("last.ckpt", "project.yaml", "graikos_crc")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genpath import __version__
from genpath.pipelines.convert_graikos import load_graikos_ldm
from genpath.utils.conversion import file_sha256, save_converted
from genpath.utils.logging import get_logger
from genpath.utils.paths import require_output_folder

logger = get_logger(__name__)


def _check_out(inputs: dict[str, Path], out: Path, overwrite: bool) -> Path:
    out = require_output_folder(out, "out")
    for name, path in inputs.items():
        if path.exists() and path.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"out: expected a folder that does not hold {name}, got {out} (it holds {path})")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out: expected a new or empty folder, got {out} holding files "
                         "(pass --overwrite to replace it)")
    return out


def convert_graikos_ldm(src: str | Path, config: str | Path, out: str | Path, overwrite: bool = False
                        ) -> dict[str, Any]:
    """Convert a Graikos et al. LDM (``last.ckpt`` + project YAML) into an EmbeddingToImagePipeline folder.

    Args:
        src: their Lightning checkpoint (``checkpoints/last.ckpt``).
        config: their project YAML (``configs/*-project.yaml``).
        out: the folder to write.
        overwrite: replace an existing non-empty ``out``.

    Returns:
        The record written to ``out/conversion.json``.

    Raises:
        FileNotFoundError: ``src`` or ``config`` is missing.
        ValueError: one line naming the argument: ``out`` unusable, a file genpath refuses to
            read (code in the pickle, another architecture), or weights that do not fit.
    """
    src, config = Path(src), Path(config)
    out = _check_out({"src": src, "--config": config}, Path(out), overwrite)
    pipe, record = load_graikos_ldm(src, config)
    record = {"family": "graikos-ldm", "source": src.name, "sha256": file_sha256(src), "config": config.name,
              "config_sha256": file_sha256(config), **record, "genpath_version": __version__}
    save_converted(pipe, out, record)
    logger.info("converted %s into %s", src, out)
    return record
