"""Training of HistAug: on-the-fly ``(embed(x), params, embed(T(x, params)))`` triplets from real tiles.

1. A frozen registered encoder embeds every clean tile once; the embeddings are cached in a zarr
   array (``output_dir/clean_embeddings.zarr``) keyed by the encoder and the dataset, so resumed
   and repeated runs skip this pass.
2. Each step draws per-patch params (:meth:`augment.histaug.HistAugModel.sample_params`, torch's
   RNG, restored on resume), transforms the batch in pixel space
   (:func:`augment.functional.apply_augmentation_params`: the project's colour/HED transforms,
   kornia morphology, blur, flips/rotations, crops) and embeds it with the frozen encoder.
3. Loss: MSE in standardized embedding space plus ``cosine_weight · (1 - cos)``.

Options: ``encoder`` (registry name), ``encoder_kwargs``, ``transforms``, ``ranges``,
``max_radius``, ``p_each`` (the sampler, stored in the model's config), ``cosine_weight``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.task import TrainingTask
from genpath.utils.atomic import atomic_directory


def cache_clean_embeddings(encoder: torch.nn.Module, dataset: Dataset, path: str | Path, key: str,
                           batch_size: int = 64) -> torch.Tensor:
    """Embed every tile of ``dataset`` once, stored as zarr at ``path``; reused while ``key`` matches.

    The array is written to a temporary folder and renamed, so an interrupted pass leaves no
    half-written cache.

    Shape:
        returns ``(len(dataset), D)`` float32.
    """
    import zarr

    path = Path(path)
    if path.exists():
        group = zarr.open_group(str(path), mode="r")
        if group.attrs.get("key") == key and group["embeddings"].shape[0] == len(dataset):
            return torch.from_numpy(np.asarray(group["embeddings"][:]))
    feats = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            tiles = torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            feats.append(encoder(tiles).float())
    clean = torch.cat(feats)
    with atomic_directory(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        array = group.create_array("embeddings", shape=tuple(clean.shape), chunks=(4096, clean.shape[1]),
                                   dtype="float32")
        array[:] = clean.numpy()
        group.attrs["key"] = key
    return clean


def histaug_loss(pred: torch.Tensor, target: torch.Tensor, std: torch.Tensor,
                 cosine_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """MSE in standardized units (per-dimension ``std``) plus ``cosine_weight · (1 - cos)``."""
    mse = ((pred - target) / std).pow(2).mean()
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=1).mean()
    return {"loss": mse + cosine_weight * (1 - cos), "mse": mse, "cosine": cos}


def train_histaug(config: TrainConfig) -> Path:
    """Train HistAug for a frozen registered encoder; returns the ``save_pretrained`` folder."""
    from augment.functional import apply_augmentation_params
    from augment.histaug import HistAugModel
    from genpath.encoders import create_encoder
    from genpath.encoders.reference import save_encoder_reference

    options = config.options
    if "encoder" not in options:
        raise ValueError("options.encoder: expected a registered encoder name (e.g. genpath-small), got none")
    encoder = create_encoder(options["encoder"], **options.get("encoder_kwargs", {})).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    sampler_cfg = {k: options[k] for k in ("transforms", "ranges", "max_radius", "p_each") if k in options}
    model = HistAugModel(embed_dim=encoder.embed_dim, **config.model, **sampler_cfg)
    tiles = config.data.dataset(config.train.seed)
    out = Path(config.train.output_dir)
    first = tiles[0]
    if isinstance(first, torch.Tensor):  # tiles only: embed every clean tile once (cached)
        spec = {"encoder": options["encoder"], "kwargs": options.get("encoder_kwargs", {}), "n": len(tiles),
                "data": [config.data.roots, config.data.zarr, config.data.size, config.data.holdout,
                         config.train.seed]}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        from genpath.training.loop import process_state

        state = process_state()
        with state.main_process_first():  # the main process writes the cache, the others read it
            if state.is_main_process:
                out.mkdir(parents=True, exist_ok=True)
            clean = cache_clean_embeddings(encoder, tiles, out / "clean_embeddings.zarr", key)
    else:  # (tile, embedding) items: the dataset's precomputed embeddings (``genpath embed``)
        clean = torch.stack([torch.as_tensor(tiles[i][1]) for i in range(len(tiles))]).float()
        if clean.shape[1] != encoder.embed_dim:
            raise ValueError(f"data.embeddings: expected {encoder.embed_dim}-dimensional embeddings of "
                             f"{options['encoder']}, got {clean.shape[1]}")
    model.fit_statistics(clean)  # a resumed run restores the same buffers from its checkpoint
    cosine_weight = float(options.get("cosine_weight", 1.0))

    def loss_fn(task: TrainingTask, batch: torch.Tensor | list[torch.Tensor], draws: StepDraws
                ) -> dict[str, torch.Tensor]:
        m = task.model
        images = batch if isinstance(batch, torch.Tensor) else batch[0]
        # the transform sampler uses the global RNG, which the loop seeds per process and step
        params = m.sample_params(len(images), mode="patch")
        with torch.no_grad():
            with task.full_precision(images.device):
                augmented = apply_augmentation_params(images.float() / 255, params)
            target = task.frozen["encoder"](augmented).float()
        pred = m(clean[draws.ids.cpu()].to(target.device), params)
        return histaug_loss(pred, target, m.embed_std, cosine_weight)

    def export(model: torch.nn.Module, folder: Path) -> None:
        model.save_pretrained(str(folder))
        save_encoder_reference(folder, options["encoder"], options.get("encoder_kwargs", {}))

    task = TrainingTask(model, loss_fn, frozen={"encoder": encoder})
    return train_loop(config.train, task, tiles, export_fn=export, run_config=config)
