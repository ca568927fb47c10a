"""Initial noise that does not depend on the batch a tile is in.

The few-step pipelines that restain or translate tiles (pixel-aligned content, deterministic
sampler) start every tile from the *same* ``(1,C,h,w)`` draw, broadcast over the batch, so a
tile's output is the same alone or among others (batch invariance, which whole-slide
processing relies on). With a list of generators each tile gets its own draw from its own
generator, which is batch-invariant as well.

Example:
    >>> noise = shared_noise((3, 4, 8, 8), torch.Generator().manual_seed(0), "cpu", torch.float32)
    >>> bool((noise[0] == noise[2]).all())
    True
"""

from __future__ import annotations

from typing import Any

import torch

GeneratorLike = torch.Generator | list[torch.Generator] | None


def check_generator(generator: GeneratorLike, batch: int) -> None:
    """Raise a one-line ``ValueError`` unless ``generator`` is None, a generator or one generator per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list) or not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}")
    if len(generator) != batch:
        raise ValueError(f"generator: expected one generator per image ({batch}), got {len(generator)}")


def shared_noise(shape: tuple[int, ...], generator: GeneratorLike, device: torch.device | str,
                 dtype: torch.dtype) -> torch.Tensor:
    """Noise of ``shape`` ``(B,C,h,w)`` from one ``(1,C,h,w)`` draw (or one draw per generator in a list).

    Args:
        shape: the batch's latent shape.
        generator: a generator (one shared draw), a list of ``B`` generators (one draw each), or
            None (``torch.Generator().manual_seed(0)``: deterministic by default).
        device: where the noise goes.
        dtype: its dtype (drawn in float32 on the generator's device, then cast).

    Returns:
        ``(B,C,h,w)`` noise (an expanded view when shared: do not write into it).
    """
    check_generator(generator, shape[0])
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    one = (1, *shape[1:])
    if isinstance(generator, list):
        noise = torch.cat([torch.randn(one, generator=g, device=g.device) for g in generator])
    else:
        noise = torch.randn(one, generator=generator, device=generator.device).expand(shape)
    return noise.to(device, dtype)


def initial_latents(scheduler: Any, num_inference_steps: int, shape: tuple[int, ...],  # noqa: ANN401
                    latents: torch.Tensor | None, generator: GeneratorLike, device: torch.device | str,
                    dtype: torch.dtype, keep_dtype: bool = False) -> torch.Tensor:
    """Set the scheduler's timesteps; return the starting latents scaled by its ``init_noise_sigma``.

    Args:
        scheduler: a diffusers scheduler (its ``set_timesteps`` is called on ``device``).
        num_inference_steps: scheduler steps.
        shape: the latent shape ``(B,C,h,w)``.
        latents: given starting noise of ``shape`` (moved to ``device`` and ``dtype``), or None to draw it.
        generator: seeds the draw (a list: one per image), as diffusers' ``randn_tensor``.
        device: where the latents go.
        dtype: the drawn noise's dtype (and the given latents', unless ``keep_dtype``).
        keep_dtype: leave the given latents' dtype as it is.

    Raises:
        ValueError: ``latents`` is not of ``shape`` (one line).
    """
    from diffusers.utils.torch_utils import randn_tensor

    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    return latents.to(device, None if keep_dtype else dtype) * scheduler.init_noise_sigma
