"""Training of the mask ControlNet on top of a frozen embedding-conditioned LDM.

Each step: random crops of images with nuclei masks (:mod:`genpath.training.mask_data`), one
dihedral draw shared by image and masks; the frozen VAE and encoder give latents and style
embeddings (dropped to the null tokens for a share ``cond_dropout``, so the ControlNet also works
without embeddings); the ControlNet reads the mask's conditioning image and its residuals are
added to the frozen UNet, which predicts the noise. Only the ControlNet trains. The result is a
:class:`~genpath.pipelines.mask_to_image.MaskToImagePipeline` folder.

Optional segmentation-consistency term (``consistency_weight`` > 0): the clean latents implied by
the predicted noise are decoded by the frozen VAE, their haematoxylin density (the ``rgb2hed``
deconvolution, differentiable) is turned into a soft nuclei map around the real tile's Otsu
threshold, and ``1 - soft Dice`` against the mask's foreground is added, weighted per sample by
``alphas_cumprod[t]`` (clean-image estimates at high noise say little). It rewards exactly what
``benchmarks/mask_adherence.py`` measures: nuclei where the mask has them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.task import TrainingTask


def train_controlnet(config: TrainConfig) -> Path:
    """Train the ControlNet; returns the MaskToImagePipeline folder (``output_dir/pipeline``).

    Options: ``pipeline`` (an EmbeddingToImagePipeline folder with ``encoder.json``, required),
    ``num_types`` (nucleus classes in the type maps), ``cond_dropout``, ``init`` (start from the
    ControlNet of a MaskToImagePipeline folder or of a shipped ControlNet folder, same base and
    ``num_types``), ``consistency_weight`` (the segmentation-consistency term above; 0: off).
    """
    from diffusers import ControlNetModel, DDPMScheduler

    from genpath.encoders.reference import copy_encoder_reference, load_encoder_reference
    from genpath.masks import masks_to_conditioning
    from genpath.models.vae import decode_tiled, encode_tiled
    from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline
    from genpath.pipelines.loading import check_pretrained_folder
    from genpath.pipelines.mask_to_image import MaskToImagePipeline, controlnet_from_unet
    from genpath.training.vae import save_grid

    options = config.options
    if "pipeline" not in options:
        raise ValueError("options.pipeline: expected an EmbeddingToImagePipeline folder, got none")
    if not config.data.masks:
        raise ValueError("data.masks: expected image + nuclei-mask sources, got none")
    torch.manual_seed(config.train.seed)
    base = EmbeddingToImagePipeline.from_pretrained(
        check_pretrained_folder(options["pipeline"], "options.pipeline", "EmbeddingToImagePipeline folder"))
    vae, unet, projector = (m.eval().requires_grad_(False) for m in (base.vae, base.unet, base.projector))
    encoder = load_encoder_reference(options["pipeline"])
    num_types = int(options.get("num_types", 0))
    f = base.vae_scale_factor
    if config.data.size % f:
        raise ValueError(f"data.size: expected a multiple of the VAE factor {f}, got {config.data.size}")
    controlnet = controlnet_from_unet(unet, f, num_types)
    if options.get("init"):
        controlnet = _init_controlnet(options["init"], controlnet)
    consistency = float(options.get("consistency_weight", 0.0))
    if not consistency >= 0:
        raise ValueError(f"options.consistency_weight: expected a number >= 0, got {consistency}")
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    dropout = float(options.get("cond_dropout", 0.1))
    dataset = config.data.dataset(config.train.seed)
    firsts = [dataset[dataset.first_item(i)] for i in range(min(4, len(dataset.entries)))]
    preview = [torch.stack(x) for x in zip(*firsts, strict=True)]

    def loss_fn(task: TrainingTask, batch: list[torch.Tensor], draws: StepDraws) -> dict[str, torch.Tensor]:
        images, inst, types = draws.dihedral(list(batch))
        frozen, dtype = task.frozen, task.frozen_dtype
        with torch.no_grad():
            x = images.float() / 255
            latents = encode_tiled(frozen["vae"], x.to(dtype)).float()
            drop = draws.uniform(device=x.device, stream="cond_dropout") < dropout
            tokens = frozen["projector"](frozen["encoder"](x).to(dtype), drop)
            cond = masks_to_conditioning(inst, types if num_types else None, num_types)
        noise = draws.normal(tuple(latents.shape[1:]), latents.device)
        t = draws.integers(noise_scheduler.config.num_train_timesteps, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        down, mid = task.model(noisy, t, encoder_hidden_states=tokens, controlnet_cond=cond, return_dict=False)
        pred = frozen["unet"](noisy.to(dtype), t, encoder_hidden_states=tokens,
                              down_block_additional_residuals=[d.to(dtype) for d in down],
                              mid_block_additional_residual=mid.to(dtype)).sample
        mse = F.mse_loss(pred.float(), noise)
        if not consistency:
            return {"loss": mse}
        alpha = noise_scheduler.alphas_cumprod.to(latents.device)[t].float().view(-1, 1, 1, 1)
        clean = (noisy - (1 - alpha).sqrt() * pred.float()) / alpha.sqrt()
        decoded = decode_tiled(frozen["vae"], clean.clamp(-10, 10)).float()
        seg = consistency_loss(decoded, x, (inst > 0).float(), alpha.flatten())
        return {"loss": mse + consistency * seg, "mse": mse.detach(), "consistency": seg.detach()}

    def pipeline_from(net: ControlNetModel) -> MaskToImagePipeline:
        pipe = MaskToImagePipeline(vae=vae, unet=unet, projector=projector, controlnet=net, scheduler=base.scheduler,
                                   num_types=num_types)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_fn(net: torch.nn.Module, path: Path) -> None:
        images, inst, types = (t.to(net.device) for t in preview)
        x = images.float() / 255
        out = pipeline_from(net)(inst, types if num_types else None, embeddings=encoder(x), num_inference_steps=20,
                                 generator=torch.Generator().manual_seed(0)).images
        fg = (inst > 0).float()[:, None].expand(-1, 3, -1, -1)
        save_grid(torch.cat([x, fg, out]).float().cpu(), path, columns=len(x))

    def export(net: torch.nn.Module, folder: Path) -> None:
        pipeline_from(net).to("cpu").save_pretrained(str(folder))
        copy_encoder_reference(options["pipeline"], folder)

    task = TrainingTask(controlnet, loss_fn, frozen={"vae": vae, "unet": unet, "projector": projector,
                                                     "encoder": encoder})
    return train_loop(config.train, task, dataset, sample_fn, export, export_folder="pipeline", run_config=config)


def _init_controlnet(folder: str | Path, fresh: torch.nn.Module) -> torch.nn.Module:
    """Load the starting ControlNet (a pipeline's ``controlnet/`` or a ControlNet folder) in float32."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    source = folder / "controlnet" if (folder / "controlnet" / "config.json").is_file() else folder
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"options.init: expected a MaskToImagePipeline or ControlNet folder, got {folder}")
    net = ControlNetModel.from_pretrained(str(source), torch_dtype=torch.float32)
    if net.config.conditioning_channels != fresh.config.conditioning_channels:
        raise ValueError(f"options.init: expected a ControlNet with {fresh.config.conditioning_channels} conditioning "
                         f"channels (num_types), got {net.config.conditioning_channels}")
    return net


#: Haematoxylin column of scikit-image's ``hed_from_rgb`` (Ruifrok & Johnston).
_HAEMATOXYLIN = (1.87798274, -0.06590806, -0.60190736)


def haematoxylin_density(images: torch.Tensor) -> torch.Tensor:
    """``skimage.color.rgb2hed(...)[..., 0]`` in torch (differentiable): float ``(B,3,H,W)`` in [0,1] -> ``(B,H,W)``."""
    od = torch.log(images.clamp_min(1e-6)) / math.log(1e-6)
    weights = torch.tensor(_HAEMATOXYLIN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (od * weights).sum(1).clamp_min(0)


def consistency_loss(generated: torch.Tensor, real: torch.Tensor, foreground: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``1 - soft Dice`` between generated nuclei and the mask foreground.

    The soft nuclei map is ``sigmoid((h - t) / s)``: ``h`` the generated haematoxylin density,
    ``t`` the midpoint of the mean densities of the real tile's two Otsu classes and ``s`` an
    eighth of their difference (both fixed, from the real tile): a pixel as dark as the real
    tile's nuclei on average counts 0.98, one as light as its background 0.02.

    Shape:
        generated, real ``(B,3,H,W)`` in [0,1]; foreground ``(B,H,W)`` in {0,1}; weights ``(B,)``.
    """
    from skimage.filters import threshold_otsu

    with torch.no_grad():
        centres, scales = [], []
        for h in haematoxylin_density(real.float()).cpu().numpy():
            split = h > threshold_otsu(h) if np.ptp(h) > 1e-6 else np.zeros(h.shape, bool)
            low = float(h[~split].mean()) if (~split).any() else float(h.mean())
            high = float(h[split].mean()) if split.any() else low
            centres.append((low + high) / 2)
            scales.append(max((high - low) / 8, 1e-3))
        t = torch.tensor(centres, device=real.device).view(-1, 1, 1)
        s = torch.tensor(scales, device=real.device).view(-1, 1, 1)
    soft = torch.sigmoid((haematoxylin_density(generated) - t) / s)
    inter = (soft * foreground).sum((1, 2))
    dice = (2 * inter + 1) / (soft.sum((1, 2)) + foreground.sum((1, 2)) + 1)
    return ((1 - dice) * weights).sum() / weights.sum().clamp_min(1e-8)
