"""Nuclei mask tools: checks, conditioning images and layout edits, on hand-built masks with known answers."""

import pytest
import torch

from genpath.masks import (
    change_nuclei_types,
    check_masks,
    drop_nuclei,
    duplicate_nuclei,
    instance_boundaries,
    masks_to_conditioning,
    move_nuclei,
)


def two_nuclei():
    """Two touching 3x3 nuclei (ids 1 and 2, types 1 and 3) and one apart (id 3, type 2) on 16x16."""
    inst = torch.zeros(1, 16, 16, dtype=torch.int32)
    inst[0, 2:5, 2:5] = 1
    inst[0, 2:5, 5:8] = 2
    inst[0, 10:13, 10:13] = 3
    types = torch.zeros_like(inst)
    types[inst == 1], types[inst == 2], types[inst == 3] = 1, 3, 2
    return inst, types


def test_conditioning_channels_have_known_values():
    inst, types = two_nuclei()
    cond = masks_to_conditioning(inst, types, num_types=3)
    assert cond.shape == (1, 5, 16, 16) and cond.dtype == torch.float32
    assert torch.equal(cond[0, 0], (inst[0] > 0).float())
    # boundaries: the ring of each nucleus, including the shared edge between 1 and 2
    assert cond[0, 1, 3, 3] == 0 and cond[0, 1, 2, 2] == 1 and cond[0, 1, 3, 4] == 1 and cond[0, 1, 3, 5] == 1
    assert int(cond[0, 1].sum()) == 3 * 8
    for k, nucleus in ((1, 1), (2, 3), (3, 2)):
        assert torch.equal(cond[0, 1 + k], (inst[0] == nucleus).float())
    untyped = masks_to_conditioning(inst[0], None, num_types=3)  # (H,W) input, no type map
    assert untyped.shape == (1, 5, 16, 16) and untyped[:, 2:].sum() == 0
    assert torch.equal(instance_boundaries(inst.long()), cond[:, 1].bool())


def test_bad_masks_are_named():
    inst, types = two_nuclei()
    with pytest.raises(ValueError, match="integer label map, got dtype torch.float32"):
        check_masks(inst.float())
    with pytest.raises(ValueError, match="integer label map, got dtype torch.bool"):
        check_masks(inst > 0)
    with pytest.raises(ValueError, match=r"\(B,H,W\) or \(H,W\)"):
        check_masks(inst[None])
    with pytest.raises(ValueError, match="non-negative"):
        check_masks(inst - 5)
    with pytest.raises(ValueError, match="type ids in 0..2, got 3"):
        masks_to_conditioning(inst, types, num_types=2)
    with pytest.raises(ValueError, match="shape"):
        check_masks(inst, types[:, :8])


def test_edits_are_seeded_and_do_not_touch_inputs():
    inst, types = two_nuclei()
    before = inst.clone(), types.clone()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    dropped, dropped_types = drop_nuclei(inst, types, fraction=1 / 3, generator=g())
    assert len(torch.unique(dropped)) == 3 and torch.equal(dropped_types > 0, dropped > 0)
    assert torch.equal(drop_nuclei(inst, types, 1 / 3, generator=g())[0], dropped)
    dup, dup_types = duplicate_nuclei(inst, types, fraction=1.0, generator=g())
    assert int(dup.max()) > 3 and (dup > 0).sum() > (inst > 0).sum()
    for new_id in range(4, int(dup.max()) + 1):  # copies keep shape (9 px) and a single type
        assert int((dup == new_id).sum()) == 9 and len(torch.unique(dup_types[dup == new_id])) == 1
    moved, moved_types = move_nuclei(inst, types, fraction=1.0, max_shift=3, generator=g())
    assert sorted(torch.unique(moved).tolist()) == [0, 1, 2, 3]
    for nucleus in (1, 2, 3):
        assert int((moved == nucleus).sum()) == 9
        assert torch.unique(moved_types[moved == nucleus]).tolist() == torch.unique(types[inst == nucleus]).tolist()
    relabelled = change_nuclei_types(inst, types, to_type=2, fraction=1.0, from_types=[1], num_types=3, generator=g())
    assert torch.equal(relabelled[inst == 1], torch.full((9,), 2, dtype=torch.long))
    assert torch.equal(relabelled[inst == 2], types[inst == 2].long())
    with pytest.raises(ValueError, match="to_type"):
        change_nuclei_types(inst, types, to_type=4, num_types=3)
    assert torch.equal(inst, before[0]) and torch.equal(types, before[1])
