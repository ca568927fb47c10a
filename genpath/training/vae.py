"""Training of the small histology VAE: L1 + SSIM reconstruction loss and a small KL term."""

from __future__ import annotations

from pathlib import Path

import torch

from genpath.models.vae import build_vae
from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.task import TrainingTask


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """Write a float ``(N,3,H,W)`` batch in [0, 1] as one PNG grid (atomic)."""
    from torchvision.utils import make_grid

    from genpath.io.images import write_image

    return write_image(make_grid(images.clamp(0, 1), nrow=columns, padding=2, pad_value=1.0), path)


def train_vae(config: TrainConfig) -> Path:
    """Train the VAE; returns its ``save_pretrained`` folder."""
    from genpath.utils.quiet_imports import import_kornia

    import_kornia()
    from kornia.losses import ssim_loss

    torch.manual_seed(config.train.seed)
    vae = build_vae(**{"sample_size": config.data.size, **config.model})
    kl_weight = float(config.options.get("kl_weight", 1e-6))
    ssim_weight = float(config.options.get("ssim_weight", 0.2))
    dataset = config.data.dataset(config.train.seed)
    preview = torch.stack([dataset[i] for i in range(min(8, len(dataset)))]).float() / 255

    def loss_fn(task: TrainingTask, batch: torch.Tensor, draws: StepDraws) -> dict[str, torch.Tensor]:
        model = task.model
        x = draws.flip(batch.float() / 255)  # cheap geometric augmentation, drawn per sample
        posterior = model.encode(x * 2 - 1).latent_dist
        eps = draws.normal(tuple(posterior.mean.shape[1:]), posterior.mean.device, posterior.mean.dtype)
        recon = ((model.decode(posterior.mean + posterior.std * eps).sample + 1) / 2).clamp(0, 1)
        l1 = (recon - x).abs().mean()
        ssim = ssim_loss(recon, x, 7)
        kl = posterior.kl().mean() / x[0].numel()
        return {"loss": l1 + ssim_weight * ssim + kl_weight * kl, "l1": l1, "ssim_loss": ssim, "kl": kl}

    def sample_fn(model: torch.nn.Module, path: Path) -> None:
        x = preview.to(model.device)
        recon = ((model.decode(model.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
        save_grid(torch.cat([x, recon]), path)

    return train_loop(config.train, TrainingTask(vae, loss_fn), dataset, sample_fn, run_config=config)
