"""``genpath convert``: published weights -> genpath folders that the other commands load.

* :func:`convert_pix2pix_checkpoint`: a pix2pix / CycleGAN / CUT / ASP / BCI generator
  (``latest_net_G.pth``, read weights-only) -> a translator folder
  (:class:`~genpath.pipelines.image_translation.GeneratorTranslationPipeline` with a
  :class:`~genpath.translation.resnet_generator.ResnetGenerator`, safetensors) that
  ``genpath translate tiles|slides --model OUT`` and ``Translator(OUT)`` run, plus
  ``OUT/conversion.json`` (the source file, its SHA-256, the preset and the architecture).
* :func:`convert_stainfuser_checkpoint`: the published StainFuser checkpoint (one flat
  ``encoder.* / conditioner.* / noise_predictor.*`` state dict, ``.safetensors`` or ``.pth``
  read weights-only) -> a :class:`~genpath.pipelines.stainfuser_published.StainFuserPipeline`
  folder (``vae/``, ``unet/``, ``controlnet/``, PNDM ``scheduler/``) that
  ``genpath normalize tiles|slides --method stainfuser --model OUT`` runs, plus ``OUT/conversion.json``.

The folder is written atomically (complete or absent); an existing non-empty ``out`` is
refused unless ``overwrite``.

Example:
    >>> options = Pix2PixConvertOptions(preset="asp", target_stain="HER2 IHC")
    >>> record = convert_pix2pix_checkpoint("latest_net_G.pth", "asp_her2", options)  # doctest: +SKIP
    >>> record = convert_stainfuser_checkpoint("checkpoint.safetensors", "stainfuser")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genpath import __version__
from genpath.pipelines.image_translation import GeneratorTranslationPipeline
from genpath.translation.convert_pix2pix import Pix2PixLayout, load_pix2pix_generator
from genpath.utils.conversion import file_sha256, save_converted
from genpath.utils.logging import get_logger
from genpath.utils.paths import require_output_folder

logger = get_logger(__name__)


@dataclass
class Pix2PixConvertOptions:
    """``genpath convert pix2pix`` options (None: read from the file, or from the preset).

    Attributes:
        preset: ``bci`` or ``asp`` (their published architecture and test behaviour).
        ngf, n_blocks, norm, dropout, antialias, spectral_norm: checked against the file.
        batch_stats: batch norms use each image's statistics at inference (BCI's test mode).
        source_stain, target_stain: recorded in the translator folder's config.
    """

    preset: str | None = None
    ngf: int | None = None
    n_blocks: int | None = None
    norm: str | None = None
    dropout: bool | None = None
    antialias: bool | None = None
    spectral_norm: bool | None = None
    batch_stats: bool | None = None
    source_stain: str = "H&E"
    target_stain: str = "IHC"

    def given(self) -> Pix2PixLayout:
        """Return the explicitly given architecture values."""
        return Pix2PixLayout(ngf=self.ngf, n_blocks=self.n_blocks, norm=self.norm, dropout=self.dropout,
                             antialias=self.antialias, spectral_norm=self.spectral_norm, batch_stats=self.batch_stats)


def _check_out(src: Path, out: Path, overwrite: bool) -> Path:
    out = require_output_folder(out, "out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"out: expected a new or empty folder, got {out} holding files "
                             "(pass --overwrite to replace it)")
        if src.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"out: expected a folder that does not hold src, got {out} (it holds {src})")
    return out


def convert_pix2pix_checkpoint(src: str | Path, out: str | Path, options: Pix2PixConvertOptions | None = None,
                               overwrite: bool = False) -> dict[str, Any]:
    """Convert a published ResnetGenerator checkpoint into a genpath translator folder.

    Args:
        src: ``latest_net_G.pth`` (or ``.safetensors``) of a pix2pix / CycleGAN / CUT / ASP / BCI generator.
        out: the translator folder to write.
        options: preset and values to check (see :class:`Pix2PixConvertOptions`).
        overwrite: replace an existing non-empty ``out``.

    Returns:
        The record written to ``out/conversion.json``.

    Raises:
        FileNotFoundError: ``src`` is missing.
        ValueError: ``out`` is a file or a non-empty folder (without ``overwrite``), ``src`` is
            not a weights-only state dict, or its layout contradicts the options (naming the flag).
    """
    options = options or Pix2PixConvertOptions()
    src, out = Path(src), Path(out)
    out = _check_out(src, out, overwrite)
    generator, layout = load_pix2pix_generator(src, options.preset, options.given())
    pipe = GeneratorTranslationPipeline(translator=generator, source_stain=options.source_stain,
                                        target_stain=options.target_stain)
    config = {k: v for k, v in generator.config.items() if not k.startswith("_")}
    record = {"family": "pix2pix", "source": src.name, "sha256": file_sha256(src), "preset": options.preset,
              "layout": dataclasses.asdict(layout), "generator": config, "genpath_version": __version__}
    save_converted(pipe, out, record)
    logger.info("converted %s into %s (%s)", src, out, record["generator"])
    return record


def convert_stainfuser_checkpoint(src: str | Path, out: str | Path, unet_config: str | Path | None = None,
                                  vae_config: str | Path | None = None, scheduler_config: str | Path | None = None,
                                  overwrite: bool = False) -> dict[str, Any]:
    """Convert the published StainFuser checkpoint into a genpath ``StainFuserPipeline`` folder.

    Args:
        src: the released ``.safetensors`` (or ``.pth``, read weights-only; ``module.`` prefixes removed).
        out: the folder to write.
        unet_config: a UNet JSON config replacing the shipped SD-2.1-base one (the ControlNet follows it).
        vae_config: an AutoencoderKL JSON config replacing the shipped one.
        scheduler_config: a PNDMScheduler JSON config replacing the shipped one.
        overwrite: replace an existing non-empty ``out``.

    Returns:
        The record written to ``out/conversion.json``.

    Raises:
        FileNotFoundError: ``src`` or a config is missing.
        ValueError: ``out`` is a file or a non-empty folder (without ``overwrite``), a config is bad, or
            ``src`` is not a weights-only state dict in StainFuser's layout (missing / unexpected keys listed).
    """
    from genpath.pipelines.convert_stainfuser import build_stainfuser_pipeline

    src, out = Path(src), Path(out)
    out = _check_out(src, out, overwrite)
    pipe, summary = build_stainfuser_pipeline(src, unet_config, vae_config, scheduler_config)
    record = {"family": "stainfuser", "source": src.name, "sha256": file_sha256(src), **summary,
              "genpath_version": __version__}
    save_converted(pipe, out, record)
    logger.info("converted %s into %s (%s)", src, out, record["keys"])
    return record
