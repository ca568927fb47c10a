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
from genpath.training.loop import train_loop

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
    preview = torch.stack([dataset[i] for i in range(min(4, len(dataset)))])

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            x = batch.float() / 255
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            latents = encode_tiled(vae, x)
            embeddings = encoder(x)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        drop = torch.rand(latents.shape[0], device=latents.device) < dropout
        tokens = projector(embeddings, drop)
        pred = model(noisy, t, encoder_hidden_states=tokens).sample
        return {"loss": F.mse_loss(pred, noise)}

    def pipeline_from(unet_model: torch.nn.Module) -> EmbeddingToImagePipeline:
        return EmbeddingToImagePipeline(vae=vae, unet=unet_model, projector=projector,
                                        scheduler=DDIMScheduler.from_config(noise_scheduler.config))

    def sample_fn(unet_model: torch.nn.Module, path: Path) -> None:
        pipe = pipeline_from(unet_model)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(encoder(preview), num_inference_steps=20, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0)).images
        save_grid(torch.cat([preview.float() / 255, images]), path, columns=len(preview))

    final = train_loop(config.train, unet, dataset, loss_fn, sample_fn, extra_modules=[projector])
    trained = UNet2DConditionModel.from_pretrained(final)
    out = Path(config.train.output_dir) / "pipeline"
    pipeline_from(trained).save_pretrained(str(out))
    save_encoder_reference(out, options["encoder"], options.get("encoder_kwargs", {}))
    return out
