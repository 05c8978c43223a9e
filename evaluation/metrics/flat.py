"""How much a protection changes the flat parts of a photo (sky, studio walls, plain clothing), where people see a
change first and where PSNR and SSIM, averaged over the whole photo, hide it: the mean and the largest change (in
8-bit levels) inside the 8 x 8 blocks whose clean luma varies by less than `FLAT_LEVELS` (standard deviation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: A block counts as flat below this standard deviation of its clean luma, in 8-bit levels.
FLAT_LEVELS = 2.0


def flat_blocks(clean: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Per image of `clean` (`N x 3 x H x W` in `[-1, 1]`), which `block` x `block` blocks are flat (`N x h x w`)."""
    luma = (0.299 * clean[:, 0:1] + 0.587 * clean[:, 1:2] + 0.114 * clean[:, 2:3] + 1) * 127.5
    mean = F.avg_pool2d(luma.double(), block)
    square = F.avg_pool2d(luma.double() ** 2, block)
    return ((square - mean**2).clamp_min(0).sqrt() < FLAT_LEVELS)[:, 0]


def flat_change(protected: torch.Tensor, clean: torch.Tensor, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the mean and the largest absolute change (8-bit levels, over the channels) inside the flat blocks
    of `clean`; NaN where a photo has no flat block."""
    if protected.shape != clean.shape or protected.ndim != 4:
        raise ValueError(f"need two N x 3 x H x W batches of one shape, got {tuple(protected.shape)} and "
                         f"{tuple(clean.shape)}")
    levels = [((t.double() + 1) * 127.5).round() for t in (protected, clean)]  # the 8-bit values of the files
    change = (levels[0] - levels[1]).abs().amax(dim=1, keepdim=True)
    means, largest = F.avg_pool2d(change, block)[:, 0], F.max_pool2d(change, block)[:, 0]
    flat = flat_blocks(clean, block)
    count = flat.flatten(1).sum(dim=1)
    mean = (means * flat).flatten(1).sum(dim=1) / count.clamp_min(1)
    worst = torch.where(flat, largest, torch.zeros_like(largest)).flatten(1).amax(dim=1)
    nan = torch.full_like(mean, float("nan"))
    return torch.where(count > 0, mean, nan).float(), torch.where(count > 0, worst, nan).float()
