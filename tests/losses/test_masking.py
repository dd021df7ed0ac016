"""BEiT / iBOT block-wise masks: target ratios, rectangles, probabilities, reproducibility."""
import torch

from tcae_ldm.losses.masking import (
    BlockMaskGenerator,
    generate_masks,
    sample_mask_ratios,
)


def test_block_masks_reach_target_ratio():
    g = torch.Generator().manual_seed(0)
    small = BlockMaskGenerator(14, 14, min_num_patches=4)
    iBOT = BlockMaskGenerator(14, 14)  # iBOT's minimum block area: (14 // 3) ** 2 = 16 tokens
    assert iBOT.min_num_patches == 16 and BlockMaskGenerator(28, 28).min_num_patches == 81
    for ratio in (0.1, 0.3, 0.5):
        target = ratio * 14 * 14  # unrounded, as iBOT's loader passes it
        for _ in range(30):
            assert target - 4 < int(small(target, g).sum()) <= target  # small blocks fill the target closely
        counts = [int(iBOT(target, g).sum()) for _ in range(100)]
        # never overshoots; stops short when no block of the minimum area fits what is left
        assert max(counts) <= target and sum(counts) / len(counts) > target - 16


def test_blocks_have_the_minimum_area():
    """Every first block covers about (min(H, W) // 3) ** 2 tokens or more (up to rounding of its sides)."""
    g = torch.Generator().manual_seed(4)
    for grid, low in ((14, 16), (28, 81)):
        make = BlockMaskGenerator(grid, grid)
        areas = []
        for _ in range(200):
            mask = torch.zeros(grid, grid, dtype=torch.bool)
            areas.append(make.add_block(mask, 2 * low, g))
        assert min(areas) >= 0.75 * low and sorted(areas)[100] >= low


def test_single_block_is_a_rectangle():
    make = BlockMaskGenerator(16, 16)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        mask = torch.zeros(16, 16, dtype=torch.bool)
        added = make.add_block(mask, 40, g)
        assert added == int(mask.sum()) > 0
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all() and h * w == added
        assert 0.3 / 2 <= h / w <= 2 / 0.3  # aspect in [0.3, 1/0.3] up to rounding of small sides


def test_mask_probability_ratios_and_reproducibility():
    g = torch.Generator().manual_seed(2)
    ratios = sample_mask_ratios(4000, ratio=0.3, ratio_var=0.2, mask_probability=0.5, generator=g)
    on = ratios > 0
    assert abs(on.float().mean().item() - 0.5) < 0.03
    assert ratios[on].min() >= 0.1 - 1e-9 and ratios[on].max() <= 0.5 + 1e-9
    assert abs(ratios[on].mean().item() - 0.3) < 0.01
    assert sample_mask_ratios(100, ratio=0.9, ratio_var=0.3, mask_probability=1.0, generator=g).max() < 1.0

    masks = generate_masks(400, 8, 8, mask_probability=0.3, generator=torch.Generator().manual_seed(3))
    assert masks.shape == (400, 8, 8) and masks.dtype == torch.bool
    assert abs(masks.flatten(1).any(1).float().mean().item() - 0.3) < 0.07
    a = generate_masks(16, 8, 8, generator=torch.Generator().manual_seed(7))
    b = generate_masks(16, 8, 8, generator=torch.Generator().manual_seed(7))
    c = generate_masks(16, 8, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)

