"""Checks of the pipelines' numeric arguments: NaN, infinity and absurd magnitudes never pass.

Every comparison is written so that NaN fails it (``not lo <= x <= hi``, never ``x < lo``), and
every error is one line naming the argument, what was expected and what was got.

Bounds (beyond them the sampler overflows float32 and decodes black images):

* ``guidance_scale`` in [0, :data:`MAX_GUIDANCE`] (1 = no guidance, 0 = only the unconditional branch);
* ``controlnet_conditioning_scale`` in [0, :data:`MAX_CONDITIONING_SCALE`] (0 ignores the mask);
* embeddings and style tokens finite with ``|x| <=`` :data:`MAX_CONDITIONING_VALUE`;
* ``num_inference_steps`` an integer >= 1 (not a bool, not a float).

Example:
    >>> check_number(2.0, "guidance_scale", 0.0, MAX_GUIDANCE)
    2.0
    >>> check_number(float("nan"), "guidance_scale", 0.0, MAX_GUIDANCE)
    Traceback (most recent call last):
    ...
    ValueError: guidance_scale: expected a finite number in [0, 100], got nan
"""

from __future__ import annotations

import math
import numbers

import torch

from genpath.image_tensor import to_float_batch
from genpath.pipelines.noise import check_generator

MAX_GUIDANCE = 100.0
MAX_CONDITIONING_SCALE = 100.0
MAX_CONDITIONING_VALUE = 1e4


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(value: object, name: str, low: float, high: float, note: str = "") -> float:
    """Return ``value`` as a float when it is a real number in ``[low, high]``; else a one-line ``ValueError``.

    Args:
        value: the argument.
        name: its name, for the message.
        low: smallest allowed value.
        high: largest allowed value.
        note: what the range means, appended to the message (e.g. ``"1 = no guidance"``).
    """
    expected = f"a finite number in [{low:g}, {high:g}]" + (f" ({note})" if note else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return number


def check_steps(value: object, name: str = "num_inference_steps") -> int:
    """Return ``value`` when it is an integer >= 1; else a one-line ``ValueError``."""
    if not _is_integer(value) or not value >= 1:  # type: ignore[operator]
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r} ({type(value).__name__})")
    return int(value)  # type: ignore[call-overload]


def check_size(value: object, name: str, multiple: int, what: str = "the VAE factor") -> int:
    """Return ``value`` when it is a positive integer multiple of ``multiple`` (``what``); else a ``ValueError``."""
    if not _is_integer(value) or not value > 0 or value % multiple:  # type: ignore[operator]
        raise ValueError(f"{name}: expected a positive integer multiple of {what} {multiple}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_conditioning(tensor: torch.Tensor, name: str, bound: float = MAX_CONDITIONING_VALUE) -> None:
    """Raise a one-line ``ValueError`` unless ``tensor`` is finite with every ``|x| <= bound``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.numel() == 0:
        return
    values = tensor.detach()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    peak = float(values.abs().max())
    if not peak <= bound:
        raise ValueError(f"{name}: expected values with |x| <= {bound:g}, got max |x| = {peak:.4g}")


def check_images(images: torch.Tensor, name: str, factor: int) -> torch.Tensor:
    """Return ``images`` as a float ``(B,3,H,W)`` batch in [0, 1] whose sides are multiples of the VAE ``factor``.

    Raises:
        ValueError: not an image batch (see :func:`genpath.image_tensor.to_float_batch`), or a side
            that the VAE factor does not divide (one line naming ``name``).
    """
    rgb, _ = to_float_batch(images, name)
    if rgb.shape[-2] % factor or rgb.shape[-1] % factor:
        raise ValueError(f"{name}: expected height and width divisible by the VAE factor {factor}, "
                         f"got {rgb.shape[-2]}x{rgb.shape[-1]}")
    return rgb


def check_mask_sampling(embeddings: torch.Tensor | None, batch: int, num_inference_steps: object,
                        guidance_scale: object, scale: object, output_type: str, generator: object) -> None:
    """Check a mask-conditioned pipeline's call arguments (after its own mask and embedding checks).

    One embedding per mask (when given), the steps, guidance and ControlNet scale in range, a
    ``"pt"`` or ``"latent"`` output, and no generator or one (or ``batch``) of them.

    Raises:
        ValueError: the first bad argument (one line naming it).
    """
    if embeddings is not None and embeddings.shape[0] != batch:
        raise ValueError(f"embeddings: expected one per mask ({batch}), got {embeddings.shape[0]}")
    check_steps(num_inference_steps)
    check_number(guidance_scale, "guidance_scale", 0.0, MAX_GUIDANCE, "1 = no guidance")
    check_number(scale, "controlnet_conditioning_scale", 0.0, MAX_CONDITIONING_SCALE, "0 ignores the mask")
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type: expected 'pt' or 'latent', got {output_type!r}")
    check_generator(generator, batch)
