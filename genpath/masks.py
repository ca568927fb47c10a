"""Nuclei masks: validation, ControlNet conditioning images and layout edits for augmentation.

Masks are integer maps ``(B,H,W)`` (or ``(H,W)``): an *instance* map (0 background, 1..N one id
per nucleus) and an optional *type* map (0 background, 1..K nucleus class, e.g. neoplastic,
inflammatory, connective). Every function returns new tensors; inputs are never changed.

1. :func:`check_masks` validates dtype, shape and type ids, naming the argument.
2. :func:`masks_to_conditioning` renders the ControlNet conditioning image: foreground,
   instance boundaries and one channel per nucleus type.
3. Edits (DiffMix-style layout augmentation), all seeded by a torch generator:
   :func:`drop_nuclei`, :func:`duplicate_nuclei`, :func:`move_nuclei`, :func:`change_nuclei_types`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_masks(
    instances: torch.Tensor, types: torch.Tensor | None = None, num_types: int = 0, name: str = "masks"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate instance (and type) maps and return them as int64 ``(B,H,W)``.

    Raises:
        ValueError: not a tensor, a float/bool map, a wrong rank, negative ids, a type map of
            another size, or type ids outside ``0..num_types``.
    """
    def one(x: torch.Tensor, label: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{label}: expected an integer tensor (B,H,W) or (H,W), got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{label}: expected an integer label map, got dtype {x.dtype}")
        if x.ndim not in (2, 3):
            raise ValueError(f"{label}: expected (B,H,W) or (H,W), got shape {tuple(x.shape)}")
        if x.numel() and int(x.min()) < 0:
            raise ValueError(f"{label}: expected non-negative ids (0 = background), got {int(x.min())}")
        return (x[None] if x.ndim == 2 else x).long()

    inst = one(instances, name)
    if types is None:
        return inst, None
    typ = one(types, f"{name} types")
    if typ.shape != inst.shape:
        raise ValueError(f"{name} types: expected shape {tuple(inst.shape)} like the instances, got {tuple(typ.shape)}")
    if num_types and typ.numel() and int(typ.max()) > num_types:
        raise ValueError(f"{name} types: expected type ids in 0..{num_types}, got {int(typ.max())}")
    return inst, typ


def instance_boundaries(instances: torch.Tensor) -> torch.Tensor:
    """Pixels of a nucleus whose 4-neighbourhood holds another id (background or another nucleus).

    Shape:
        ``(B,H,W)`` int -> ``(B,H,W)`` bool.
    """
    x = F.pad(instances[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    centre = x[:, 1:-1, 1:-1]
    differs = ((x[:, :-2, 1:-1] != centre) | (x[:, 2:, 1:-1] != centre)
               | (x[:, 1:-1, :-2] != centre) | (x[:, 1:-1, 2:] != centre))
    return differs & (instances > 0)


def conditioning_channels(num_types: int) -> int:
    """Channels of :func:`masks_to_conditioning`: foreground, boundaries, then one per type."""
    return 2 + int(num_types)


def masks_to_conditioning(
    instances: torch.Tensor, types: torch.Tensor | None = None, num_types: int = 0
) -> torch.Tensor:
    """Render the ControlNet conditioning image of nuclei masks.

    Channels: foreground, instance boundaries (separates touching nuclei), and a one-hot map per
    nucleus type ``1..num_types`` (all zero where ``types`` is None).

    Shape:
        instances ``(B,H,W)``/``(H,W)`` int -> ``(B, 2 + num_types, H, W)`` float in {0, 1}.

    Example:
        >>> m = torch.zeros(1, 8, 8, dtype=torch.long); m[0, 2:5, 2:5] = 1
        >>> masks_to_conditioning(m, num_types=2).shape
        torch.Size([1, 4, 8, 8])
    """
    inst, typ = check_masks(instances, types, num_types)
    channels = [(inst > 0).float(), instance_boundaries(inst).float()]
    if num_types:
        if typ is None:
            channels.append(torch.zeros(inst.shape[0], num_types, *inst.shape[-2:]))
        else:
            onehot = F.one_hot(typ, num_types + 1)[..., 1:].permute(0, 3, 1, 2).float()
            channels.append(onehot * (inst > 0)[:, None])
    return torch.cat([c[:, None] if c.ndim == 3 else c for c in channels], 1)


def _ids(instances: torch.Tensor) -> torch.Tensor:
    ids = torch.unique(instances)
    return ids[ids > 0]


def _pick(ids: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a share in [0, 1], got {fraction}")
    n = round(fraction * len(ids))
    return ids[torch.randperm(len(ids), generator=generator)[:n]]


def drop_nuclei(
    instances: torch.Tensor, types: torch.Tensor | None = None, fraction: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Remove a random share of nuclei (per image) from the instance and type maps."""
    inst, typ = check_masks(instances, types)
    inst, typ = inst.clone(), None if typ is None else typ.clone()
    for b in range(inst.shape[0]):
        gone = torch.isin(inst[b], _pick(_ids(inst[b]), fraction, generator))
        inst[b][gone] = 0
        if typ is not None:
            typ[b][gone] = 0
    return inst, typ


def _paste(inst: torch.Tensor, typ: torch.Tensor | None, b: int, nucleus: int, new_id: int, dy: int, dx: int) -> bool:
    """Copy nucleus ``nucleus`` of image ``b`` shifted by (dy, dx) as ``new_id`` if it lands on background."""
    ys, xs = torch.nonzero(inst[b] == nucleus, as_tuple=True)
    ty, tx = ys + dy, xs + dx
    h, w = inst.shape[-2:]
    if len(ys) == 0 or ty.min() < 0 or tx.min() < 0 or ty.max() >= h or tx.max() >= w:
        return False
    if bool((inst[b][ty, tx] > 0).any()):
        return False
    inst[b][ty, tx] = new_id
    if typ is not None:
        typ[b][ty, tx] = typ[b][ys, xs]
    return True


def duplicate_nuclei(
    instances: torch.Tensor, types: torch.Tensor | None = None, fraction: float = 0.2,
    generator: torch.Generator | None = None, attempts: int = 20,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copy a random share of nuclei to random free (background) places, as new instances with the same type."""
    inst, typ = check_masks(instances, types)
    inst, typ = inst.clone(), None if typ is None else typ.clone()
    h, w = inst.shape[-2:]
    for b in range(inst.shape[0]):
        next_id = int(inst[b].max()) + 1
        for nucleus in _pick(_ids(inst[b]), fraction, generator).tolist():
            for _ in range(attempts):
                dy = int(torch.randint(-h + 1, h, (1,), generator=generator))
                dx = int(torch.randint(-w + 1, w, (1,), generator=generator))
                if _paste(inst, typ, b, nucleus, next_id, dy, dx):
                    next_id += 1
                    break
    return inst, typ


def move_nuclei(
    instances: torch.Tensor, types: torch.Tensor | None = None, fraction: float = 0.2, max_shift: int = 16,
    generator: torch.Generator | None = None, attempts: int = 20,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shift a random share of nuclei by up to ``max_shift`` pixels onto free background (ids kept)."""
    inst, typ = check_masks(instances, types)
    inst, typ = inst.clone(), None if typ is None else typ.clone()
    for b in range(inst.shape[0]):
        for nucleus in _pick(_ids(inst[b]), fraction, generator).tolist():
            here = inst[b] == nucleus
            saved_type = None if typ is None else typ[b][here].clone()
            inst[b][here] = 0  # free its own pixels so that small moves are possible
            if typ is not None:
                typ[b][here] = 0
            for _ in range(attempts):
                dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
                if _move(inst, typ, b, here, nucleus, saved_type, dy, dx):
                    break
            else:  # no free place found: put it back
                inst[b][here] = nucleus
                if typ is not None:
                    typ[b][here] = saved_type
    return inst, typ


def _move(inst: torch.Tensor, typ: torch.Tensor | None, b: int, here: torch.Tensor, nucleus: int,
          saved_type: torch.Tensor | None, dy: int, dx: int) -> bool:
    """Place the (already cleared) pixels ``here`` shifted by (dy, dx) if they land on background."""
    ys, xs = torch.nonzero(here, as_tuple=True)
    ty, tx = ys + dy, xs + dx
    h, w = inst.shape[-2:]
    if ty.min() < 0 or tx.min() < 0 or ty.max() >= h or tx.max() >= w or bool((inst[b][ty, tx] > 0).any()):
        return False
    inst[b][ty, tx] = nucleus
    if typ is not None:
        typ[b][ty, tx] = saved_type
    return True


def change_nuclei_types(
    instances: torch.Tensor, types: torch.Tensor, to_type: int, fraction: float = 0.2,
    from_types: list[int] | None = None, num_types: int = 0, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Relabel a random share of nuclei (optionally only ``from_types``) as ``to_type``, to rebalance rare classes.

    Returns:
        The new type map ``(B,H,W)``.
    """
    inst, typ = check_masks(instances, types, num_types)
    if to_type < 1 or (num_types and to_type > num_types):
        raise ValueError(f"to_type: expected a nucleus type in 1..{num_types or 'K'}, got {to_type}")
    typ = typ.clone()
    for b in range(inst.shape[0]):
        ids = _ids(inst[b])
        if from_types is not None:
            keep = [int(i) for i in ids.tolist() if int(typ[b][inst[b] == i].mode().values) in from_types]
            ids = torch.tensor(keep, dtype=torch.long)
        chosen = torch.isin(inst[b], _pick(ids, fraction, generator))
        typ[b][chosen] = to_type
    return typ
