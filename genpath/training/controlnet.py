"""Training of the mask ControlNet on top of a frozen embedding-conditioned LDM.

Each step: random crops of images with nuclei masks (:mod:`genpath.training.mask_data`), one
dihedral draw shared by image and masks; the frozen VAE and encoder give latents and style
embeddings (dropped to the null tokens for a share ``cond_dropout``, so the ControlNet also works
without embeddings); the ControlNet reads the mask's conditioning image and its residuals are
added to the frozen UNet, which predicts the noise. Only the ControlNet trains. The result is a
:class:`~genpath.pipelines.mask_to_image.MaskToImagePipeline` folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.task import TrainingTask


def train_controlnet(config: TrainConfig) -> Path:
    """Train the ControlNet; returns the MaskToImagePipeline folder (``output_dir/pipeline``).

    Options: ``pipeline`` (an EmbeddingToImagePipeline folder with ``encoder.json``, required),
    ``num_types`` (nucleus classes in the type maps), ``cond_dropout``.
    """
    from diffusers import ControlNetModel, DDPMScheduler

    from genpath.encoders.reference import copy_encoder_reference, load_encoder_reference
    from genpath.masks import masks_to_conditioning
    from genpath.models.vae import encode_tiled
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
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    dropout = float(options.get("cond_dropout", 0.1))
    dataset = config.data.dataset(config.train.seed)
    preview = [torch.stack(x) for x in zip(*(dataset[i * dataset.crops] for i in range(min(4, len(dataset.entries)))),
                                           strict=True)]

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
        return {"loss": F.mse_loss(pred.float(), noise)}

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
