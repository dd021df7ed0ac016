"""BEiT / iBOT block-wise masks: target ratios, rectangles, probabilities, reproducibility, and the published
loop draw for draw."""
import math

import pytest
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



class _BlockMaskReference:
    """BEiT's / iBOT's block masking loop as published (an attempt budget of 10, strict fits, overlap allowed,
    tokens filled one by one), written over lists; Python's random.uniform / randint are replaced by the same
    torch draws, in the same order, so both sides consume one generator stream."""

    def __init__(self, height, width, min_num_patches, max_num_patches=None, min_aspect=0.3, max_aspect=None):
        self.height, self.width, self.min_num_patches = height, width, min_num_patches
        self.max_num_patches = max_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    @staticmethod
    def _uniform(a, b, g):
        return a + (b - a) * torch.rand((), generator=g).item()

    def _mask(self, mask, max_mask_patches, g):
        delta = 0
        for _attempt in range(10):
            target_area = self._uniform(self.min_num_patches, max_mask_patches, g)
            aspect_ratio = math.exp(self._uniform(*self.log_aspect, g))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(torch.randint(0, self.height - h + 1, (), generator=g))
                left = int(torch.randint(0, self.width - w + 1, (), generator=g))
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = True
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches, g):
        mask = [[False] * self.width for _ in range(self.height)]
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            if self.max_num_patches is not None:
                max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, g)
            if delta == 0:
                break
            mask_count += delta
        return torch.tensor(mask)


@pytest.mark.parametrize("grid,kwargs", [
    ((14, 14), {}),  # iBOT's defaults on ViT-B/16's grid: minimum area 16, aspect in [0.3, 1/0.3]
    ((4, 6), {"min_num_patches": 1}),  # small grid: blocks as tall as the grid, single-token blocks
    ((8, 8), {"min_num_patches": 2, "max_num_patches": 5, "min_aspect": 0.5, "max_aspect": 3.0}),
])
def test_block_masks_equal_beit_ibot_loop_draw_for_draw(grid, kwargs):
    """Same generator stream, same masks, over many calls: every attempt, give-up and block position agrees,
    so an extra or missing draw anywhere would desynchronise every later mask."""
    ref_kwargs = dict(kwargs)
    ref_kwargs.setdefault("min_num_patches", (min(grid) // 3) ** 2)
    ours, ref = BlockMaskGenerator(*grid, **kwargs), _BlockMaskReference(*grid, **ref_kwargs)
    g_ours, g_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    gave_up = 0
    for k in range(120):
        target = (0.1 + 0.8 * (k % 9) / 8) * grid[0] * grid[1]  # unrounded, as iBOT passes it
        a, b = ours(target, g_ours), ref(target, g_ref)
        assert a.dtype == torch.bool and a.shape == grid
        assert torch.equal(a, b), (k, target)
        gave_up += int(a.sum()) < target - 1
    assert gave_up > 0  # the give-up path (10 failed attempts) ran


def test_mask_ratios_follow_ibot_formula_from_the_same_draws():
    """ratio ~ U[ratio - var, ratio + var] from the first B draws (float64), masked iff the next B draws fall
    below mask_probability; iBOT's defaults 0.3 / 0.2 / 0.5; ratios below 0 clip to 0 and never reach 1."""
    B = 64
    g = torch.Generator().manual_seed(5)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    on = torch.rand(B, generator=g, dtype=torch.float64) < 0.5
    expected = torch.where(on, 0.1 + 0.4 * u, torch.zeros_like(u))
    got = sample_mask_ratios(B, generator=torch.Generator().manual_seed(5))
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-12)

    wide = sample_mask_ratios(B, ratio=0.1, ratio_var=0.3, mask_probability=1.0,
                              generator=torch.Generator().manual_seed(5))
    assert torch.allclose(wide, (-0.2 + 0.6 * u).clamp(min=0.0), rtol=0, atol=1e-12)
    assert (wide == 0).any() and (wide >= 0).all()


def test_generate_masks_passes_every_setting_to_ratios_and_blocks():
    """generate_masks = sample_mask_ratios, then one block mask per image with ratio > 0 from the same stream."""
    def expected(B, H, W, ratio=0.3, ratio_var=0.2, p=0.5, seed=0, min_num_patches=None, min_aspect=0.3):
        g = torch.Generator().manual_seed(seed)
        ratios = sample_mask_ratios(B, ratio, ratio_var, p, g)
        make = BlockMaskGenerator(H, W, min_num_patches=min_num_patches, min_aspect=min_aspect)
        return torch.stack([make(r * H * W, g) if r > 0 else torch.zeros(H, W, dtype=torch.bool)
                            for r in ratios.tolist()])

    assert torch.equal(generate_masks(24, 9, 9, generator=torch.Generator().manual_seed(0)), expected(24, 9, 9))
    custom = dict(ratio=0.5, ratio_var=0.1, mask_probability=0.8, min_num_patches=2, min_aspect=0.6)
    got = generate_masks(24, 9, 9, generator=torch.Generator().manual_seed(1), **custom)
    assert torch.equal(got, expected(24, 9, 9, 0.5, 0.1, 0.8, seed=1, min_num_patches=2, min_aspect=0.6))
    assert not torch.equal(got, expected(24, 9, 9, 0.5, 0.1, 0.8, seed=1))  # the settings changed the masks
