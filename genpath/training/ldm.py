"""Training of the embedding-conditioned latent diffusion model (UNet + projector; VAE and encoder frozen).

Each step: encode tiles to latents with the frozen VAE (posterior mean × scaling factor) and to
embeddings with the frozen registered encoder; add DDPM noise at random timesteps; predict the
noise with the UNet cross-attending to projected embedding tokens. A share ``cond_dropout`` of
rows uses the learned null tokens, which is what classifier-free guidance needs at sampling time.
The result is saved as an :class:`~genpath.pipelines.EmbeddingToImagePipeline` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genpath.encoders.reference import save_encoder_reference  # noqa: F401 - re-exported
from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.task import TrainingTask

SMALL_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 128,
    "attention_head_dim": 16,
    "norm_num_groups": 16,
}


def train_ldm(config: TrainConfig) -> Path:
    """Train the LDM and return the saved pipeline folder (``output_dir/pipeline``).

    Options: ``vae`` (folder), ``encoder`` (registry name), ``encoder_kwargs``, ``num_tokens``,
    ``projector_hidden``, ``cond_dropout``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    from genpath.encoders import create_encoder
    from genpath.models.conditioning import EmbeddingProjector
    from genpath.models.vae import downsampling_factor, encode_tiled, load_vae
    from genpath.pipelines import EmbeddingToImagePipeline
    from genpath.training.vae import save_grid

    options = config.options
    for key in ("vae", "encoder"):
        if key not in options:
            raise ValueError(f"options.{key}: expected a value (VAE folder / encoder registry name), got none")
    torch.manual_seed(config.train.seed)
    vae = load_vae(options["vae"]).eval().requires_grad_(False)
    encoder = create_encoder(options["encoder"], **options.get("encoder_kwargs", {}))
    f = downsampling_factor(vae)
    if config.data.size % f:
        raise ValueError(f"data.size: expected a multiple of the VAE factor {f}, got {config.data.size}")
    unet_cfg = {**SMALL_UNET, "sample_size": config.data.size // f, "in_channels": vae.config.latent_channels,
                "out_channels": vae.config.latent_channels, **config.model}
    unet = UNet2DConditionModel(**unet_cfg)
    projector = EmbeddingProjector(encoder.embed_dim, unet.config.cross_attention_dim,
                                   int(options.get("num_tokens", 4)), int(options.get("projector_hidden", 256)))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                    beta_start=0.00085, beta_end=0.012)
    dropout = float(options.get("cond_dropout", 0.1))
    dataset = config.data.dataset(config.train.seed)
    items = [dataset[i] for i in range(min(4, len(dataset)))]
    preview = torch.stack([i if isinstance(i, torch.Tensor) else i[0] for i in items])
    preview_embeddings = None if isinstance(items[0], torch.Tensor) else torch.stack([i[1] for i in items]).float()
    if preview_embeddings is not None and preview_embeddings.shape[1] != encoder.embed_dim:
        raise ValueError(f"data.embeddings: expected {encoder.embed_dim}-dimensional embeddings of "
                         f"{options['encoder']}, got {preview_embeddings.shape[1]}")

    def loss_fn(task: TrainingTask, batch: torch.Tensor | list[torch.Tensor], draws: StepDraws
                ) -> dict[str, torch.Tensor]:
        tiles, precomputed = (batch, None) if isinstance(batch, torch.Tensor) else batch
        frozen = task.frozen
        with torch.no_grad():
            x = batch_flip(tiles.float() / 255, draws)
            latents = encode_tiled(frozen["vae"], x.to(task.frozen_dtype)).float()
            embeddings = (precomputed if precomputed is not None else frozen["encoder"](x)).float()
        noise = draws.normal(tuple(latents.shape[1:]), latents.device)
        t = draws.integers(noise_scheduler.config.num_train_timesteps, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        drop = draws.uniform(device=latents.device, stream="cond_dropout") < dropout
        tokens = task.extras["projector"](embeddings, drop)
        pred = task.model(noisy, t, encoder_hidden_states=tokens).sample
        return {"loss": F.mse_loss(pred.float(), noise)}

    def pipeline_from(unet_model: torch.nn.Module) -> EmbeddingToImagePipeline:
        return EmbeddingToImagePipeline(vae=vae, unet=unet_model, projector=projector,
                                        scheduler=DDIMScheduler.from_config(noise_scheduler.config))

    def sample_fn(unet_model: torch.nn.Module, path: Path) -> None:
        pipe = pipeline_from(unet_model)
        pipe.set_progress_bar_config(disable=True)
        device = unet_model.device
        tiles = preview.to(device)
        conditions = encoder(tiles).float() if preview_embeddings is None else preview_embeddings.to(device)
        images = pipe(conditions, num_inference_steps=20, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0)).images
        save_grid(torch.cat([tiles.float().cpu() / 255, images.cpu()]), path, columns=len(preview))

    def export(unet_model: torch.nn.Module, folder: Path) -> None:
        pipeline_from(unet_model).to("cpu").save_pretrained(str(folder))
        save_encoder_reference(folder, options["encoder"], options.get("encoder_kwargs", {}))

    task = TrainingTask(unet, loss_fn, extras={"projector": projector}, frozen={"vae": vae, "encoder": encoder})
    return train_loop(config.train, task, dataset, sample_fn, export, export_folder="pipeline", run_config=config)


def batch_flip(x: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    """Flip horizontally half of the samples (drawn per sample)."""
    flip = (draws.uniform(stream="hflip") < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)
