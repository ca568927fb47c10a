"""Training of the diffusion stain normalizer (StainTransferPipeline) on restaining-simulator triplets.

Each step draws triplets from real tiles (:class:`~normalization.restain.RestainingSimulator`):
the source (tissue X, style A), a reference (other tissue Y, style B) and the ground truth
(tissue X, style B). With the VAE frozen, all three are encoded to posterior-mean latents; the
UNet sees the noised ground-truth latents concatenated with the source latents, cross-attends to
the reference's style tokens and predicts the clean ground-truth latents (x0 prediction, which
is what few-step deterministic sampling needs). Only the UNet and the style tokenizer train.
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

STAINFUSER_UNET: dict[str, Any] = {
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 128,
    "attention_head_dim": 16,
    "norm_num_groups": 16,
}


def random_dihedral(x: torch.Tensor) -> torch.Tensor:
    """One random flip/90° rotation for the whole batch (torch RNG)."""
    k, flip = torch.randint(0, 4, ()).item(), bool(torch.rand(()) < 0.5)
    x = torch.rot90(x, int(k), (-2, -1))
    return x.flip(-1) if flip else x


class _SameDihedral:
    """One dihedral draw applied to several tensors (source and target must move together)."""

    def __init__(self) -> None:
        self.k, self.flip = 0, False

    def draw(self) -> None:
        self.k, self.flip = int(torch.randint(0, 4, ()).item()), bool(torch.rand(()) < 0.5)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.rot90(x, self.k, (-2, -1))
        return x.flip(-1) if self.flip else x


def real_pairs(spec: dict[str, Any] | None, size: int, batch_size: int, seed: int):  # noqa: ANN201
    """Build an endless iterator of ``(source, target, reference)`` uint8 batches from registered pairs."""
    if not spec:
        return None, 0.0
    from torch.utils.data import DataLoader

    from genpath.training.data import PairedTileDataset

    spec = dict(spec)
    if "csv" not in spec:
        raise ValueError("options.pairs.csv: expected a CSV listing registered pairs, got none")
    share = float(spec.pop("share", 0.5))
    if not 0.0 < share <= 1.0:
        raise ValueError(f"options.pairs.share: expected a share in (0, 1], got {share}")
    from genpath.training.loop import process_state

    dataset = PairedTileDataset(spec.pop("csv"), size, seed=seed, **spec)
    rank = process_state().process_index  # each process draws its own pairs
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
                        generator=torch.Generator().manual_seed(seed * 1_009 + rank))

    def forever():  # noqa: ANN202
        while True:
            yield from loader

    return forever(), share


def train_stainfuser(config: TrainConfig) -> Path:
    """Train the stain-transfer UNet + style tokenizer; returns the pipeline folder (``output_dir/pipeline``).

    Options: ``vae`` (folder, required), ``init`` (a pipeline folder to fine-tune), ``max_tokens``,
    ``simulator`` (kwargs of :class:`~normalization.restain.RestainingSimulator`), ``pairs`` (optional real registered
    pairs for fine-tuning: ``csv``, ``groups`` (the training slides), ``share`` of steps that use
    them, ``crops_per_pair`` and the column names of :class:`~genpath.training.data.PairedTileDataset`).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from genpath.models.style import StyleTokenizer, latent_cells
    from genpath.models.vae import downsampling_factor, encode_tiled, load_vae
    from genpath.pipelines.stain_transfer import StainTransferPipeline, stain_transfer_scheduler, tissue_weights
    from genpath.training.vae import save_grid
    from normalization.restain import RestainingSimulator, RestainTriplet

    options = config.options
    if "vae" not in options:
        raise ValueError("options.vae: expected a VAE folder (e.g. samples/checkpoints/vae_small), got none")
    torch.manual_seed(config.train.seed)
    vae = load_vae(options["vae"]).eval().requires_grad_(False)
    f, c = downsampling_factor(vae), vae.config.latent_channels
    if config.data.size % f:
        raise ValueError(f"data.size: expected a multiple of the VAE factor {f}, got {config.data.size}")
    if options.get("init"):  # fine-tune a trained pipeline (e.g. on real scanner pairs)
        init = Path(options["init"])
        unet = UNet2DConditionModel.from_pretrained(str(init / "unet"), dtype=torch.float32)
        tokenizer = StyleTokenizer.from_pretrained(str(init / "style_tokenizer"), dtype=torch.float32)
        if unet.config.in_channels != 2 * c:
            raise ValueError(f"options.init: expected a UNet with {2 * c} input channels for this VAE, "
                             f"got {unet.config.in_channels} in {init}")
    else:
        unet = UNet2DConditionModel(**{**STAINFUSER_UNET, "sample_size": config.data.size // f,
                                       "in_channels": 2 * c, "out_channels": c, **config.model})
        tokenizer = StyleTokenizer(latent_channels=c, cross_attention_dim=unet.config.cross_attention_dim,
                                   max_tokens=int(options.get("max_tokens", 256)))
    simulator = RestainingSimulator(**options.get("simulator", {}))
    sampler = stain_transfer_scheduler()
    noise_scheduler = DDPMScheduler.from_config(sampler.config)
    dataset = config.data.dataset(config.train.seed)
    preview_tiles = torch.stack([dataset[i] for i in range(min(4, len(dataset)))]).float() / 255
    preview = simulator(preview_tiles, generator=torch.Generator().manual_seed(0))

    pairs, share = real_pairs(options.get("pairs"), config.data.size, config.train.batch_size, config.train.seed)

    def loss_fn(task: TrainingTask, batch: torch.Tensor, draws: StepDraws) -> dict[str, torch.Tensor]:
        # the simulator pairs tiles within the batch, so its draws use the global RNG, which the
        # loop seeds per process and step; noise and timesteps are drawn per sample
        step = draws.step

        def encode(x: torch.Tensor) -> torch.Tensor:
            return encode_tiled(task.frozen["vae"], x.to(task.frozen_dtype)).float()

        with torch.no_grad(), task.full_precision(batch.device):
            if pairs is not None and int((step + 1) * share) > int(step * share):  # evenly spread, resumable
                same = _SameDihedral()
                same.draw()
                src, tgt, ref = (same(x.to(batch.device).float() / 255) for x in next(pairs))
                triplet = RestainTriplet(source=src, reference=ref, target=tgt)
            else:
                triplet = simulator(random_dihedral(batch.float() / 255))
        with torch.no_grad():
            source, target = encode(triplet.source), encode(triplet.target)
            cells = latent_cells(encode(triplet.reference), tissue_weights(triplet.reference, f))
        tokens = task.extras["tokenizer"](*cells)
        if len(target) == len(draws):
            noise = draws.normal(tuple(target.shape[1:]), target.device)
            t = draws.integers(noise_scheduler.config.num_train_timesteps, device=target.device)
        else:  # a batch of real pairs (its own size)
            noise = torch.randn_like(target)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(target),), device=target.device)
        noisy = noise_scheduler.add_noise(target, noise, t)
        pred = task.model(torch.cat([noisy, source], 1), t, encoder_hidden_states=tokens).sample
        return {"loss": F.mse_loss(pred.float(), target)}

    def pipeline_from(unet_model: torch.nn.Module) -> StainTransferPipeline:
        return StainTransferPipeline(vae=vae, unet=unet_model, style_tokenizer=tokenizer, scheduler=sampler)

    def sample_fn(unet_model: torch.nn.Module, path: Path) -> None:
        pipe = pipeline_from(unet_model)
        pipe.set_progress_bar_config(disable=True)
        device = unet_model.device
        rows = [preview.source, preview.reference, preview.target]
        for i in range(len(preview.source)):
            tokens = pipe.encode_style(preview.reference[i : i + 1].to(device))
            rows.append(pipe(preview.source[i : i + 1].to(device), style_tokens=tokens,
                             num_inference_steps=4).images.float().cpu())
        grid = torch.cat(rows[:3] + [torch.cat(rows[3:])])
        save_grid(grid, path, columns=len(preview.source))

    def export(unet_model: torch.nn.Module, folder: Path) -> None:
        pipeline_from(unet_model).to("cpu").save_pretrained(str(folder))

    task = TrainingTask(unet, loss_fn, extras={"tokenizer": tokenizer}, frozen={"vae": vae})
    return train_loop(config.train, task, dataset, sample_fn, export, export_folder="pipeline", run_config=config)
