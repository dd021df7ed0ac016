"""BEiT / iBOT block-wise masking of a token grid (Bao et al., ICLR 2022; Zhou et al., ICLR 2022)."""
from __future__ import annotations

import math

import torch

#################################################################################
#                            Block-wise masking                                 #
#################################################################################

def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    # lo > hi is allowed (as Python's random.uniform), which BEiT relies on near the end of a mask.
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi], both ends included."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


class BlockMaskGenerator:
    """BEiT/iBOT block-wise masking: random rectangles on an (H, W) token grid up to a target count.

    A block covers at least min_num_patches tokens (default: iBOT's (min(H, W) // 3) ** 2, e.g. 16 on a 14x14
    grid; BEiT's fixed 16 was tuned for that grid) unless less than that is left to mask.
    """

    def __init__(self, grid_h: int, grid_w: int, min_num_patches: int | None = None,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                 max_attempts: int = 10):
        self.height, self.width = grid_h, grid_w
        self.min_num_patches = (min(grid_h, grid_w) // 3) ** 2 if min_num_patches is None else min_num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts

    def add_block(self, mask: torch.Tensor, max_patches: float, generator: torch.Generator | None = None) -> int:
        """Mask one rectangle adding at most `max_patches` new tokens; return how many (0: gave up)."""
        for _ in range(self.max_attempts):
            area = _uniform(self.min_num_patches, max_patches, generator)
            aspect = math.exp(_uniform(*self.log_aspect, generator))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= self.height or w >= self.width:
                continue
            top = _randint(0, self.height - h, generator)
            left = _randint(0, self.width - w, generator)
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            # Overlap with earlier blocks is allowed, but the block must add something without overshooting.
            if 0 < new <= max_patches:
                block.fill_(True)
                return new
        return 0

    def __call__(self, num_masking_patches: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """A mask of at most `num_masking_patches` tokens (iBOT passes ratio * H * W unrounded)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            max_patches = num_masking_patches - count
            if self.max_num_patches is not None:
                max_patches = min(max_patches, self.max_num_patches)
            delta = self.add_block(mask, max_patches, generator)
            if delta == 0:  # no block fits what is left: stop a few tokens short, as BEiT does
                break
            count += delta
        return mask  # (H, W)


def sample_mask_ratios(batch_size: int, ratio: float = 0.3, ratio_var: float = 0.2, mask_probability: float = 0.5,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image masking ratio: U[ratio - var, ratio + var] clipped to [0, 1) with probability
    `mask_probability`, else 0 (iBOT's `--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`)."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    ratios = (ratio - ratio_var + 2.0 * ratio_var * u).clamp(0.0, math.nextafter(1.0, 0.0))
    masked = torch.rand(batch_size, generator=generator, dtype=torch.float64) < mask_probability
    return torch.where(masked, ratios, torch.zeros_like(ratios))  # (B,)


def generate_masks(batch_size: int, grid_h: int, grid_w: int, ratio: float = 0.3, ratio_var: float = 0.2,
                   mask_probability: float = 0.5, generator: torch.Generator | None = None,
                   min_num_patches: int | None = None, min_aspect: float = 0.3) -> torch.Tensor:
    """Block-wise masks for a batch; True = masked token. Returns a bool tensor (B, H, W)."""
    ratios = sample_mask_ratios(batch_size, ratio, ratio_var, mask_probability, generator)
    make = BlockMaskGenerator(grid_h, grid_w, min_num_patches=min_num_patches, min_aspect=min_aspect)
    masks = torch.zeros(batch_size, grid_h, grid_w, dtype=torch.bool)
    for i, r in enumerate(ratios.tolist()):
        if r > 0:
            masks[i] = make(r * grid_h * grid_w, generator)
    return masks
