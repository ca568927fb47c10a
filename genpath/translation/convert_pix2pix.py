"""Read a published pix2pix / CycleGAN / CUT / ASP / BCI generator checkpoint into a :class:`ResnetGenerator`.

The published repositories save ``<epoch>_net_G.pth`` (``latest_net_G.pth``) as a plain
``state_dict`` of their ``ResnetGenerator`` (``net.module.state_dict()`` on GPU, so without a
``module.`` prefix). :func:`load_pix2pix_generator`:

1. reads the file with ``torch.load(weights_only=True)`` (or safetensors): a pickle that needs
   code to load is refused, never run; a ``{"state_dict": ...}`` wrapper and ``module.``
   prefixes (other training scripts) are undone;
2. reads the architecture from the keys and shapes (:func:`infer_layout`): ``ngf`` from the
   stem, ``n_blocks`` from the ``model.K.conv_block.*`` blocks, the norm (batch norm has
   ``weight``/``running_mean``, instance norm leaves only the convolution biases), dropout
   (the second block convolution at index 6 instead of 5), CUT's anti-aliasing (``filt``
   buffers), spectral norm (``weight_orig``/``weight_u``/``weight_v``);
3. checks every value the caller or a preset gave against the file: a mismatch is a one-line
   error naming the flag (``--n-blocks: expected 2 (...), got 9 (from --preset bci)``);
4. folds spectral norm into plain weights as ``torch.nn.utils.spectral_norm`` computes them
   in eval mode: ``W = weight_orig / sigma``, ``sigma = u · (W_mat v)`` (``W_mat`` the weight
   reshaped to rows along dim 0, dim 1 for transposed convolutions);
5. drops InstanceNorm running statistics of pre-0.4 checkpoints, as the published
   ``load_networks`` does; every other missing or unexpected key is an error that lists them;
6. refuses non-finite weights, and loads strictly in float32.

Presets carry the published architectures: ``bci`` (BCI PyramidPix2pix: ``resnet_9blocks``,
batch norm, dropout, test in train mode so ``batch_stats``), ``asp`` (ASP: ``resnet_6blocks``,
instance norm, anti-aliased, spectral norm).

Example:
    >>> layout = infer_layout(ResnetGenerator(ngf=4, n_blocks=2).state_dict())
    >>> layout.ngf, layout.n_blocks, layout.norm, layout.dropout, layout.spectral_norm
    (4, 2, 'instance', False, False)
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genpath.translation.resnet_generator import NORMS, ResnetGenerator
from genpath.utils.logging import get_logger
from genpath.utils.state_dict import as_state_dict

logger = get_logger(__name__)

#: Command-line flag of each layout field (errors name the flag).
FLAGS = {"ngf": "--ngf", "n_blocks": "--n-blocks", "norm": "--norm", "dropout": "--dropout",
         "antialias": "--antialias", "spectral_norm": "--spectral-norm", "batch_stats": "--batch-stats"}


@dataclass(frozen=True)
class Pix2PixLayout:
    """A published ResnetGenerator's architecture (None: not given / not known).

    Attributes:
        ngf: stem width (``--ngf``).
        n_blocks: residual blocks (``--netG resnet_9blocks`` = 9).
        norm: ``batch``, ``instance`` or ``none`` (``--norm`` / ``--normG``).
        dropout: ``Dropout(0.5)`` in the blocks (pix2pix/BCI train without ``--no_dropout``).
        antialias: CUT's blurred down- and upsampling (CUT/ASP default).
        spectral_norm: ``nn.utils.spectral_norm`` on every convolution (ASP ``--weight_norm spectral``).
        batch_stats: batch norm with each image's statistics at inference (BCI's test mode).
        antialias_up: anti-aliased upsampling alone (CUT's ``--no_antialias_up`` turns it off);
            None: the same as ``antialias``.
        n_downsampling: stride-2 stages (2 in every published model).
    """

    ngf: int | None = None
    n_blocks: int | None = None
    norm: str | None = None
    dropout: bool | None = None
    antialias: bool | None = None
    spectral_norm: bool | None = None
    batch_stats: bool | None = None
    antialias_up: bool | None = None
    n_downsampling: int | None = None

    def generator_config(self) -> dict[str, Any]:
        """Return the :class:`ResnetGenerator` keyword arguments (a resolved layout)."""
        up = self.antialias if self.antialias_up is None else self.antialias_up
        return {"ngf": self.ngf, "n_blocks": self.n_blocks, "n_downsampling": self.n_downsampling or 2,
                "norm": self.norm, "use_dropout": bool(self.dropout), "antialias_down": bool(self.antialias),
                "antialias_up": bool(up), "batch_stats": bool(self.batch_stats)}


#: Published architectures: ``--preset NAME`` (explicit flags override a preset's values).
PRESETS: dict[str, Pix2PixLayout] = {
    # bupt-ai-cz/BCI PyramidPix2pix: options/base_options.py defaults (resnet_9blocks, norm batch,
    # dropout on); test.py runs without --eval at batch size 1, so batch norms use each image's statistics
    "bci": Pix2PixLayout(ngf=64, n_blocks=9, norm="batch", dropout=True, antialias=False, spectral_norm=False,
                         batch_stats=True),
    # lifangda01/AdaptiveSupervisedPatchNCE experiments/mist_launcher.py: resnet_6blocks, normG instance,
    # weight_norm spectral, CUT's anti-aliasing (no --no_antialias / --no_antialias_up), no dropout
    "asp": Pix2PixLayout(ngf=64, n_blocks=6, norm="instance", dropout=False, antialias=True, spectral_norm=True,
                         batch_stats=False),
}


def read_state_dict(path: str | Path, argument: str = "src") -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` state dict.

    A ``{"state_dict": {...}}`` wrapper is unwrapped and a ``module.`` prefix (DataParallel) on
    every key is removed.

    Raises:
        FileNotFoundError: ``path`` is missing or a folder.
        ValueError: the file is not a weights-only state dict (a code-executing pickle is refused
            without running it), or holds something other than tensors.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise FileNotFoundError(f"{argument}: expected a generator checkpoint file (.pth), got {path} ({what})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, TypeError) as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(f"{argument}: expected a weights-only PyTorch state dict in {path}, got a file torch.load("
                         f"weights_only=True) refuses ({type(error).__name__}: {first}); genpath never unpickles "
                         "code") from None
    data = as_state_dict(data, path, argument)
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def _weight(sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor | None:
    return sd.get(f"{prefix}.weight", sd.get(f"{prefix}.weight_orig"))


def infer_layout(sd: dict[str, torch.Tensor], argument: str = "src") -> Pix2PixLayout:
    """Read a ResnetGenerator's architecture from its state dict's keys and shapes.

    Raises:
        ValueError: the keys are not a ResnetGenerator's (a UnetGenerator, another model, an RGB
            mismatch), one line naming what was found.
    """
    keys = list(sd)
    if any(k.startswith("model.model.") for k in keys):
        raise ValueError(f"{argument}: expected a ResnetGenerator state dict (netG resnet_9blocks/resnet_6blocks), "
                         "got a UnetGenerator (netG unet_256/unet_128; keys model.model.*), which genpath does not "
                         "convert")
    top: dict[int, torch.Tensor] = {}
    blocks: set[int] = set()
    for key in keys:
        match = re.fullmatch(r"model\.(\d+)\.(weight|weight_orig)", key)
        if match and sd[key].ndim == 4:
            top[int(match.group(1))] = sd[key]
        match = re.fullmatch(r"model\.(\d+)\.conv_block\..+", key)
        if match:
            blocks.add(int(match.group(1)))
    convs = sorted(top)
    if len(convs) < 2 or convs[0] != 1:
        raise ValueError(f"{argument}: expected a ResnetGenerator state dict (keys model.N.*, the stem convolution "
                         f"model.1.weight), got keys like {keys[:4]}")
    stem, head = top[convs[0]], top[convs[-1]]
    if stem.shape[1] != 3 or head.shape[0] != 3:
        raise ValueError(f"{argument}: expected an RGB -> RGB generator (input_nc = output_nc = 3), got "
                         f"{stem.shape[1]} input and {head.shape[0]} output channels")
    middle = convs[1:-1]
    if len(middle) % 2:
        raise ValueError(f"{argument}: expected as many upsampling as downsampling convolutions, got "
                         f"{len(middle)} between the stem and the head (indices {middle})")
    n_down = len(middle) // 2
    downs, ups = middle[:n_down], middle[n_down:]
    if "model.2.weight" in sd:
        norm = "batch"
    else:
        norm = "instance" if "model.1.bias" in sd else "none"
    first = min(blocks) if blocks else None
    dropout = None if first is None else not any(k.startswith(f"model.{first}.conv_block.5.") for k in keys)
    antialias = any(f"model.{d + 3}.filt" in sd for d in downs) if downs else None
    antialias_up = any(f"model.{u - 1}.filt" in sd for u in ups) if ups else None
    return Pix2PixLayout(ngf=int(stem.shape[0]), n_blocks=len(blocks), norm=norm, dropout=dropout,
                         antialias=antialias, spectral_norm=any(k.endswith(".weight_orig") for k in keys),
                         batch_stats=None, antialias_up=antialias_up, n_downsampling=n_down)


def _describe(field: str, value: Any) -> str:
    """Say what the file holds for ``field``, in words, with the evidence."""
    return {
        "ngf": f"{value} (the stem convolution model.1 has {value} output channels)",
        "n_blocks": f"{value} (the file holds {value} resnet blocks, model.K.conv_block.*)",
        "norm": {"batch": "'batch' (batch-norm weights and running statistics)",
                 "instance": "'instance' (no norm weights, convolutions with biases)",
                 "none": "'none' (no norm weights, convolutions without biases)"}.get(value, repr(value)),
        "dropout": "dropout (the second block convolution at conv_block.6)" if value else
                   "no dropout (the second block convolution at conv_block.5)",
        "antialias": "anti-aliasing (filt buffers)" if value else "no anti-aliasing (strided convolutions, no filt)",
        "spectral_norm": "spectral norm (weight_orig/weight_u/weight_v)" if value else
                         "no spectral norm (plain weights)",
    }[field]


def _flag_value(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return FLAGS[field] if value else "--no-" + FLAGS[field][2:]
    return f"{FLAGS[field]} {value}"


def resolve_layout(found: Pix2PixLayout, preset: str | None = None, given: Pix2PixLayout | None = None,
                   source: str = "src") -> Pix2PixLayout:
    """Check the preset's and the caller's values against the file's layout; return the resolved layout.

    Raises:
        ValueError: an unknown preset, or a value that contradicts the file (naming its flag).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    given = given or Pix2PixLayout()
    if given.norm is not None and given.norm not in NORMS:
        raise ValueError(f"--norm: expected one of {NORMS}, got {given.norm!r}")
    base = PRESETS[preset] if preset else Pix2PixLayout()
    resolved = dataclasses.asdict(found)
    for field in ("ngf", "n_blocks", "norm", "dropout", "antialias", "spectral_norm"):
        wanted, origin = getattr(given, field), ""
        if wanted is None:
            wanted, origin = getattr(base, field), f" (from --preset {preset})"
        have = getattr(found, field)
        if wanted is None:
            continue
        if have is None:  # not visible in the file (dropout without blocks): the given value stands
            resolved[field] = wanted
            continue
        if field == "antialias" and found.antialias_up is not None and found.antialias_up != found.antialias:
            raise ValueError(f"--antialias: expected neither flag for {source} (anti-aliased downsampling "
                             f"{found.antialias}, upsampling {found.antialias_up}: CUT's --no_antialias_up), got "
                             f"{_flag_value(field, wanted)}{origin}")
        if wanted != have:
            raise ValueError(f"{FLAGS[field]}: expected {_describe(field, have)} for {source}, got "
                             f"{_flag_value(field, wanted)}{origin}")
    batch_stats = given.batch_stats if given.batch_stats is not None else bool(base.batch_stats)
    if batch_stats and found.norm != "batch":
        origin = "" if given.batch_stats is not None else f" (from --preset {preset})"
        raise ValueError(f"--batch-stats: expected a batch-norm generator, got norm {found.norm!r} in {source}{origin}")
    resolved["batch_stats"] = batch_stats
    if resolved["dropout"] is None:
        resolved["dropout"] = False
    return Pix2PixLayout(**resolved)


def fold_spectral_norm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Replace ``weight_orig``/``weight_u``/``weight_v`` by the eval-mode weight ``weight_orig / sigma``.

    ``sigma = u · (W_mat v)`` with ``W_mat`` the weight moved to rows along dim 0 (dim 1 for
    ``ConvTranspose2d``, as ``torch.nn.utils.spectral_norm`` chooses) and flattened; prefixes that
    are not a convolution of ``model`` are left as they are (reported as unexpected later).

    Raises:
        ValueError: ``weight_u``/``weight_v`` missing or of the wrong size, or a non-positive sigma.
    """
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".weight_orig")]:
        prefix = key[: -len(".weight_orig")]
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        if not isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            continue
        if f"{prefix}.weight_u" not in sd or f"{prefix}.weight_v" not in sd:
            raise ValueError(f"src: expected {prefix}.weight_u and {prefix}.weight_v next to {key} (spectral norm), "
                             "got them missing")
        dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
        weight = sd[key].double()
        mat = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)
        u, v = sd[f"{prefix}.weight_u"].double(), sd[f"{prefix}.weight_v"].double()
        if u.shape != (mat.shape[0],) or v.shape != (mat.shape[1],):
            raise ValueError(f"src: expected {prefix}.weight_u/_v of sizes {mat.shape[0]}/{mat.shape[1]}, got "
                             f"{tuple(u.shape)}/{tuple(v.shape)}")
        sigma = torch.dot(u, mat @ v)
        if not torch.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"src: expected a positive spectral norm for {prefix}, got sigma = {float(sigma)}")
        out[f"{prefix}.weight"] = (weight / sigma).float()
        for suffix in ("weight_orig", "weight_u", "weight_v"):
            del out[f"{prefix}.{suffix}"]
    return out


def _some(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def convert_pix2pix_state_dict(sd: dict[str, torch.Tensor], preset: str | None = None,
                               given: Pix2PixLayout | None = None,
                               source: str = "src") -> tuple[ResnetGenerator, Pix2PixLayout]:
    """Build the :class:`ResnetGenerator` a published state dict describes and load it strictly.

    Returns:
        ``(generator, layout)``: the generator in eval mode (float32) and its resolved layout.

    Raises:
        ValueError: a value contradicts the file (naming the flag), keys are missing or
            unexpected (listed), shapes differ, or a weight is not finite.
    """
    found = infer_layout(sd, "src")
    layout = resolve_layout(found, preset, given, source)
    generator = ResnetGenerator(**layout.generator_config())
    sd = fold_spectral_norm(sd, generator)
    expected = generator.state_dict()
    for key in [k for k in sd if k not in expected]:  # pre-0.4 InstanceNorm statistics (published load_networks)
        prefix, _, name = key.rpartition(".")
        try:
            stale = isinstance(generator.get_submodule(prefix), nn.InstanceNorm2d)
        except AttributeError:
            stale = False
        if stale and name in ("running_mean", "running_var", "num_batches_tracked"):
            logger.info("dropping %s (InstanceNorm statistics of a pre-0.4 checkpoint, as the published loader)", key)
            del sd[key]
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"src: expected the keys of a ResnetGenerator({_summary(layout)}) in {source}, got "
                         f"{len(missing)} missing [{_some(missing)}] and {len(unexpected)} unexpected "
                         f"[{_some(unexpected)}]")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"src: expected the shapes of a ResnetGenerator({_summary(layout)}) in {source}, got "
                         f"{len(wrong)} different [{_some(wrong, 4)}]")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"src: expected finite weights in {source}, got NaN or infinite values in [{_some(bad)}]")
    negative = [k for k, v in sd.items() if k.endswith("running_var") and (v < 0).any()]
    if negative:
        raise ValueError(f"src: expected non-negative batch-norm running variances in {source}, "
                         f"got [{_some(negative)}]")
    generator.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    return generator.eval(), layout


def _summary(layout: Pix2PixLayout) -> str:
    c = layout.generator_config()
    return ", ".join(f"{k}={v!r}" for k, v in c.items())


def load_pix2pix_generator(src: str | Path, preset: str | None = None,
                           given: Pix2PixLayout | None = None) -> tuple[ResnetGenerator, Pix2PixLayout]:
    """Read a published ``latest_net_G.pth`` into a :class:`ResnetGenerator` (see the module doc).

    Args:
        src: the checkpoint (``.pth``/``.pt``/``.bin`` read weights-only, or ``.safetensors``).
        preset: ``"bci"`` or ``"asp"`` (their published architecture and test behaviour).
        given: values to check against the file (explicit flags; they override the preset's).

    Returns:
        ``(generator, layout)``.

    Example:
        >>> generator, layout = load_pix2pix_generator("latest_net_G.pth", preset="asp")  # doctest: +SKIP
    """
    sd = read_state_dict(src, "src")
    return convert_pix2pix_state_dict(sd, preset, given, source=Path(src).name)
