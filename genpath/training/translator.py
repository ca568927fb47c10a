"""Training of the H&E→IHC translators on registered pairs (``genpath train translator``).

``options.kind`` picks the translator:

* ``"diffusion"``: :class:`~genpath.pipelines.image_translation.LatentTranslationPipeline`.
  With the VAE frozen, H&E and IHC crops are encoded to posterior-mean latents; the UNet sees
  the noised IHC latents concatenated with the H&E latents and predicts the clean IHC latents
  (x0 prediction, what few-step deterministic sampling needs).
* ``"gan"``: :class:`~genpath.pipelines.image_translation.GeneratorTranslationPipeline`, the
  one-step baseline of ASP (Li et al., 2023): LSGAN with a PatchGAN critic, PatchNCE between the
  H&E input and the output (content), adaptive supervised PatchNCE between the output and the
  real IHC, and a Gaussian-pyramid L1 to the real IHC. Generator and critic are updated
  simultaneously by one optimizer: the generator's adversarial term evaluates the critic with
  detached weights (``torch.func.functional_call``), so it never moves the critic, and the
  critic's term sees a detached output, so it never moves the generator.

Options (``gan``): ``generator`` / ``discriminator`` (config overrides), ``lambda_gan`` (1),
``lambda_nce`` (1), ``lambda_asp`` (1), ``lambda_pyramid`` (10), ``pyramid_levels`` (4),
``num_patches`` (64), ``asp_schedule`` (lambda), ``asp_lookup`` (linear), ``nce_temperature`` (0.07).
Options (``diffusion``): ``vae`` (folder, required).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.task import TrainingTask

TRANSLATION_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "attention_head_dim": 16,
}
GAN_DEFAULTS: dict[str, Any] = {
    "lambda_gan": 1.0, "lambda_nce": 1.0, "lambda_asp": 1.0, "lambda_pyramid": 10.0, "pyramid_levels": 4,
    "num_patches": 64, "asp_schedule": "lambda", "asp_lookup": "linear", "nce_temperature": 0.07,
}


def _preview(dataset, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    items = [dataset[i * max(1, len(dataset) // n)] for i in range(min(n, len(dataset)))]
    return (torch.stack([a for a, _ in items]).float() / 255, torch.stack([b for _, b in items]).float() / 255)


def train_translator(config: TrainConfig) -> Path:
    """Train a translator; returns the pipeline folder (``output_dir/pipeline``)."""
    kind = config.options.get("kind", "gan")
    if kind not in ("gan", "diffusion"):
        raise ValueError(f"options.kind: expected 'gan' or 'diffusion', got {kind!r}")
    if not config.data.pairs:
        raise ValueError("data.pairs: expected registered H&E/IHC pairs (root, layout, split), got none")
    torch.manual_seed(config.train.seed)
    return (_train_gan if kind == "gan" else _train_diffusion)(config)


def _train_gan(config: TrainConfig) -> Path:
    from genpath.pipelines.image_translation import GeneratorTranslationPipeline
    from genpath.training.vae import save_grid
    from genpath.translation.losses import (
        adaptive_supervised_patch_nce,
        gaussian_pyramid_l1,
        lsgan_loss,
        patch_nce_loss,
    )
    from genpath.translation.networks import PatchDiscriminator, PatchSampler, ResnetTranslator

    options = {**GAN_DEFAULTS, **{k: v for k, v in config.options.items() if k != "kind"}}
    unknown = sorted(set(options) - set(GAN_DEFAULTS) - {"generator", "discriminator"})
    if unknown:
        raise ValueError(f"options: unknown keys {unknown} for kind 'gan'; expected {sorted(GAN_DEFAULTS)}, "
                         "generator, discriminator")
    generator = ResnetTranslator(**{**config.model, **options.get("generator", {})})
    if config.data.size % generator.factor:
        raise ValueError(f"data.size: expected a multiple of the generator's factor {generator.factor}, "
                         f"got {config.data.size}")
    critic = PatchDiscriminator(**options.get("discriminator", {}))
    with torch.no_grad():
        channels = tuple(f.shape[1] for f in generator.nce_features(torch.zeros(1, 3, 32, 32)))
    sampler = PatchSampler(in_channels=channels)
    dataset = config.data.dataset(config.train.seed)
    preview_he, preview_ihc = _preview(dataset)
    max_steps = config.train.max_steps

    def loss_fn(task: TrainingTask, batch: tuple[torch.Tensor, torch.Tensor], draws: StepDraws
                ) -> dict[str, torch.Tensor]:
        model, critic, sampler = task.model, task.extras["critic"], task.extras["sampler"]
        step = draws.step
        he, ihc = (x.float() / 255 for x in batch)
        fake = model(he)
        # critic (simultaneous update; sees a detached output)
        d_loss = 0.5 * (lsgan_loss(critic(ihc), True) + lsgan_loss(critic(fake.detach()), False))
        # generator: adversarial through a frozen copy of the critic's weights
        frozen = {k: v.detach() for k, v in critic.named_parameters()}
        g_gan = lsgan_loss(torch.func.functional_call(critic, frozen, (fake,)), True)
        # PatchNCE (content: output vs input) and ASP (output vs real IHC), same locations
        feat_fake = model.nce_features(fake)
        q, ids = sampler(feat_fake, options["num_patches"])
        k_he, _ = sampler(model.nce_features(he), patch_ids=ids)
        k_ihc, _ = sampler(model.nce_features(ihc), patch_ids=ids)
        tau, progress = options["nce_temperature"], step / max_steps
        nce = torch.stack([patch_nce_loss(a, b, tau).mean() for a, b in zip(q, k_he, strict=True)]).mean()
        asp = torch.stack([adaptive_supervised_patch_nce(a, b, progress, options["asp_schedule"],
                                                         options["asp_lookup"], tau)
                           for a, b in zip(q, k_ihc, strict=True)]).mean()
        pyramid = gaussian_pyramid_l1(fake, ihc, options["pyramid_levels"])
        g_loss = (options["lambda_gan"] * g_gan + options["lambda_nce"] * nce + options["lambda_asp"] * asp
                  + options["lambda_pyramid"] * pyramid)
        return {"loss": g_loss + d_loss, "d": d_loss.detach(), "g_gan": g_gan.detach(), "nce": nce.detach(),
                "asp": asp.detach(), "pyramid": pyramid.detach()}

    def sample_fn(model: torch.nn.Module, path: Path) -> None:
        fake = model(preview_he.to(model.device)).float().cpu()
        save_grid(torch.cat([preview_he, preview_ihc, fake]), path, columns=len(preview_he))

    def export(model: torch.nn.Module, folder: Path) -> None:
        GeneratorTranslationPipeline(translator=model).to("cpu").save_pretrained(str(folder))

    task = TrainingTask(generator, loss_fn, extras={"critic": critic, "sampler": sampler})
    return train_loop(config.train, task, dataset, sample_fn, export, export_folder="pipeline", run_config=config)


def _train_diffusion(config: TrainConfig) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    from genpath.models.vae import downsampling_factor, encode_tiled, load_vae
    from genpath.pipelines.image_translation import LatentTranslationPipeline
    from genpath.pipelines.stain_transfer import stain_transfer_scheduler
    from genpath.training.vae import save_grid

    options = config.options
    if "vae" not in options:
        raise ValueError("options.vae: expected a VAE folder (e.g. samples/checkpoints/vae_small), got none")
    vae = load_vae(options["vae"]).eval().requires_grad_(False)
    f, c = downsampling_factor(vae), vae.config.latent_channels
    unet = UNet2DModel(**{**TRANSLATION_UNET, "sample_size": config.data.size // f, "in_channels": 2 * c,
                          "out_channels": c, **config.model})
    multiple = f * 2 ** (len(unet.config.block_out_channels) - 1)
    if config.data.size % multiple:
        raise ValueError(f"data.size: expected a multiple of {multiple} (VAE factor x UNet downsampling), "
                         f"got {config.data.size}")
    sampler = stain_transfer_scheduler()
    noise_scheduler = DDPMScheduler.from_config(sampler.config)
    dataset = config.data.dataset(config.train.seed)
    preview_he, preview_ihc = _preview(dataset)

    def loss_fn(task: TrainingTask, batch: tuple[torch.Tensor, torch.Tensor], draws: StepDraws
                ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            he, ihc = draws.dihedral([x.float() / 255 for x in batch])
            source, target = (encode_tiled(task.frozen["vae"], x.to(task.frozen_dtype)).float() for x in (he, ihc))
        noise = draws.normal(tuple(target.shape[1:]), target.device)
        t = draws.integers(noise_scheduler.config.num_train_timesteps, device=target.device)
        pred = task.model(torch.cat([noise_scheduler.add_noise(target, noise, t), source], 1), t).sample
        return {"loss": F.mse_loss(pred.float(), target)}

    def pipeline_from(model: torch.nn.Module) -> LatentTranslationPipeline:
        return LatentTranslationPipeline(vae=vae, unet=model, scheduler=sampler)

    def sample_fn(model: torch.nn.Module, path: Path) -> None:
        pipe = pipeline_from(model)
        pipe.set_progress_bar_config(disable=True)
        fake = pipe(preview_he.to(model.device), num_inference_steps=4).images.float().cpu()
        save_grid(torch.cat([preview_he, preview_ihc, fake]), path, columns=len(preview_he))

    def export(model: torch.nn.Module, folder: Path) -> None:
        pipeline_from(model).to("cpu").save_pretrained(str(folder))

    task = TrainingTask(unet, loss_fn, frozen={"vae": vae})
    return train_loop(config.train, task, dataset, sample_fn, export, export_folder="pipeline", run_config=config)
