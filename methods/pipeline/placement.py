"""Where and at what size a photo is attacked, and how the perturbation goes back onto it.

A `Placement` maps a photo of any size to the work image an attack sees. The editor sees the photo at its working
size, the canvas: scaled down so that its long side is at most `max_size`. The attacked region is a window of that
canvas (the whole of it, or a square around its faces with its corner on the canvas's 8-pixel grid, where the
editor's autoencoder has its latent cells) and `box` the photo pixels it covers. The work image is either the
window itself (scaled: the perturbation is made at the canvas's scale and scaled back up) or, with `view`, the box at
the photo's own resolution, which the attack sees through the editor's resize (`seen`, the window's size: an
`EditorView`), so that the perturbation is made for what the editor will see of the photo: a perturbation made at
the canvas's scale and scaled up to the photo loses most of its effect when the editor scales it down again. The
work image is padded (edge pixels repeated) up to a size bucket, a multiple of `bucket` pixels (8 at least, for the
autoencoders). The bucket depends only on the photo itself, so a photo gets the same work image alone or batched
with others of its bucket.

After the attack, `paste` cuts the perturbation out of the padding, scales it back up to the box where it was made
on the canvas, and adds it there in 8 bits, strip by strip: every pixel moves by at most the budget after rounding,
the rest of the photo is left untouched, and a photo of hundreds of megapixels never exists as a float tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: Rows of the full-resolution photo processed at a time by `paste`.
STRIP_ROWS = 256
#: Long side at which faces are detected when choosing a face region (a huge photo is looked at in a smaller copy).
DETECTION_SIZE = 1024


@dataclass(frozen=True)
class Placement:
    """`size` (width, height) is the photo's; `canvas` (width, height) the photo's at the editor's working size (`size`
    where it is not scaled); `window` (left, top, right, bottom) the attacked region on the canvas; `box` the photo
    pixels it covers; `work` (width, height) the work image's size: the window's, or the box's where the attack sees
    it through the editor's resize to `seen` (the window's size; None otherwise); `padded` (width, height) the work
    image's size with its padding."""

    size: tuple[int, int]
    canvas: tuple[int, int]
    window: tuple[int, int, int, int]
    box: tuple[int, int, int, int]
    work: tuple[int, int]
    padded: tuple[int, int]
    seen: tuple[int, int] | None = None

    @property
    def scaled(self) -> bool:
        """Whether the work image is the window at the canvas's scale (and the perturbation is scaled back up)."""
        return self.work != (self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def batch(self) -> tuple:
        """Placements of one batch key make work images the attack can take in one batch."""
        return self.padded, None if self.seen is None else tuple(math.ceil(side / 8) * 8 for side in self.seen)


def place(size: tuple[int, int], box: tuple[int, int, int, int] | None = None, max_size: int = 0,
          bucket: int = 8, view: bool = False) -> Placement:
    """The placement of a `size` (width, height) photo: scaled down to a long side of `max_size` where it is longer
    (0: never), attacked in the window of that canvas that covers `box` (photo pixels; default: all of it) with its
    corner moved to the canvas's 8-pixel grid, padded to a multiple of `bucket` (a multiple of 8). With `view`, the
    work image of a scaled photo is the box at the photo's resolution, seen through the editor's resize."""
    if bucket < 8 or bucket % 8:
        raise ValueError(f"the size bucket must be a multiple of 8, got {bucket}")
    width, height = size
    box = box or (0, 0, width, height)
    scale = max_size / max(size) if max_size and max(size) > max_size else 1.0
    canvas = (max(round(width * scale), 1), max(round(height * scale), 1))
    window = box
    if canvas != size:
        fx, fy = canvas[0] / width, canvas[1] / height
        window = (int(box[0] * fx) // 8 * 8, int(box[1] * fy) // 8 * 8,
                  min(math.ceil(box[2] * fx), canvas[0]), min(math.ceil(box[3] * fy), canvas[1]))
        box = (int(window[0] / fx), int(window[1] / fy), min(math.ceil(window[2] / fx), width),
               min(math.ceil(window[3] / fy), height))
    work = (window[2] - window[0], window[3] - window[1])
    seen = None
    if view and canvas != size:
        work, seen = (box[2] - box[0], box[3] - box[1]), work
    padded = (math.ceil(work[0] / bucket) * bucket, math.ceil(work[1] / bucket) * bucket)
    return Placement(size=(width, height), canvas=canvas, window=window, box=box, work=work, padded=padded,
                     seen=seen)


def face_region(image: Image.Image, detector: Callable[[torch.Tensor], object], scale: float = 1.25,
                margin: int = 32) -> tuple[int, int, int, int] | None:
    """A square around every face the detector finds: the faces' bounding box, its long side times `scale`, plus
    `margin` pixels on each side (the autoencoder's receptive field), a multiple of 8 with its corner on the photo's
    8-pixel grid, moved inside the photo (and cut to it where the photo is smaller). None where no face is found.
    Faces are detected on a copy at most `DETECTION_SIZE` pixels long."""
    factor = min(1.0, DETECTION_SIZE / max(image.size))
    small = image if factor == 1.0 else image.resize(
        (max(round(image.width * factor), 1), max(round(image.height * factor), 1)), Image.BILINEAR)
    array = np.asarray(small, dtype=np.float32)
    faces = detector(torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1)
    if len(faces.boxes) == 0:
        return None
    boxes = faces.boxes.detach().cpu().double() / factor
    x0, y0 = boxes[:, 0].min().item(), boxes[:, 1].min().item()
    x1, y1 = boxes[:, 2].max().item(), boxes[:, 3].max().item()
    side = math.ceil((max(x1 - x0, y1 - y0) * scale + 2 * margin) / 8) * 8
    width, height = image.size
    w, h = min(side, width), min(side, height)
    # the corner on the 8-pixel grid of the whole photo, so that the region's latent cells are the photo's own: a
    # perturbation made for one alignment of the autoencoder's stride barely works at another
    left = min(max(round((x0 + x1 - w) / 2), 0), width - w) // 8 * 8
    top = min(max(round((y0 + y1 - h) / 2), 0), height - h) // 8 * 8
    return (left, top, left + w, top + h)


def work_image(image: Image.Image, placement: Placement) -> torch.Tensor:
    """The `1 x 3 x H x W` work image in `[-1, 1]`: the window of the canvas (the photo scaled with Pillow's
    antialiased bilinear filter, only the window computed) and its padding."""
    if placement.scaled:
        fx, fy = placement.size[0] / placement.canvas[0], placement.size[1] / placement.canvas[1]
        left, top, right, bottom = placement.window
        region = image.resize(placement.work, Image.BILINEAR, box=(left * fx, top * fy, right * fx, bottom * fy))
    else:
        region = image.crop(placement.box) if placement.box != (0, 0, *placement.size) else image
    x = torch.from_numpy(np.asarray(region, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    (w, h), (pw, ph) = placement.work, placement.padded
    return F.pad(x, (0, pw - w, 0, ph - h), mode="replicate") if (pw, ph) != (w, h) else x


def _scaled_up(delta: torch.Tensor, dim: int, axis: int, placement: Placement, start: int, stop: int) -> torch.Tensor:
    """The perturbation `delta` (made on the placement's window of the canvas) at photo pixels `start..stop` along
    `axis` (0: x, 1: y), the tensor's dimension `dim`: a `canvas -> photo` bilinear resize (align_corners=False, as
    `F.interpolate`), the window's edge values repeated beyond it."""
    canvas, photo = placement.canvas[axis], placement.size[axis]
    first_pixel, last = placement.window[axis], placement.window[axis + 2] - placement.window[axis] - 1
    position = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) * canvas / photo - 0.5 - first_pixel
                ).clamp(0, last)
    first = position.floor().long()
    second = (first + 1).clamp_max(last)
    weight = (position - first).float().view([-1 if d == dim else 1 for d in range(delta.ndim)])
    return torch.lerp(delta.index_select(dim, first), delta.index_select(dim, second), weight)


def budget_levels(eps: float | np.ndarray) -> float | np.ndarray:
    """The largest whole number of 8-bit levels within a budget `eps` ([-1, 1] units; a number, or a per-pixel
    `H x W x 1` array)."""
    return np.floor(np.asarray(eps, dtype=np.float64) * 127.5 + 1e-6)


def round_within_l2(exact: np.ndarray, clean: np.ndarray, radius: float) -> np.ndarray:
    """`clean` (uint8) moved by `exact` (float, in 8-bit levels) rounded to whole levels, the L2 length of the change
    kept within `radius` levels: pixels are rounded to the nearest level, and where that makes the change longer
    than `radius`, those rounded furthest away from the clean value are rounded toward it instead, until it fits
    (rounding all of them toward it always fits)."""
    exact = exact * min(1.0, radius / max(float(np.linalg.norm(exact)), 1e-12))  # float32 rounding may overshoot
    base = clean.astype(np.int64)
    delta = np.clip(base + np.round(exact), 0, 255) - base
    over = float(np.sum(delta**2)) - radius**2
    if over > 1e-6:
        excess = np.abs(delta) - np.abs(exact)  # > 0 where rounding moved a pixel away from the clean value
        order = np.argsort(-excess, axis=None)
        order = order[excess.flat[order] > 0]
        saved = np.cumsum(2 * np.abs(delta.flat[order]) - 1)  # what rounding each toward the clean value saves
        chosen = order[:int(np.searchsorted(saved, over - 1e-6)) + 1]
        delta.flat[chosen] -= np.sign(delta.flat[chosen])
    return (base + delta).astype(np.uint8)


def quantize_within(x_adv: torch.Tensor, clean: np.ndarray, eps: float | np.ndarray, norm: str = "linf") -> np.ndarray:
    """Round a protected image to 8 bits without leaving the budget: each pixel moves from the clean 8-bit value
    by the rounded perturbation, capped at the largest whole number of levels within `eps` ([-1, 1] units; a
    number, or a per-pixel `H x W x 1` array).

    With `norm="l2"` (`eps` the L2 length of the whole perturbation in `[-1, 1]` units), the perturbation is rounded
    within that length (`round_within_l2`)."""
    adversarial = (x_adv.detach().float().cpu().reshape(-1, *x_adv.shape[-2:]).permute(1, 2, 0).numpy() + 1) * 127.5
    exact = adversarial - clean.astype(np.float64)
    if norm == "l2":
        return round_within_l2(exact, clean, eps * 127.5)
    levels = budget_levels(eps)
    delta = np.clip(np.round(exact), -levels, levels)
    return np.clip(clean.astype(np.int64) + delta, 0, 255).astype(np.uint8)



def paste(image: Image.Image, placement: Placement, delta: torch.Tensor, eps: float,
          norm: str = "linf") -> tuple[np.ndarray, dict]:
    """Add the perturbation `delta` (`3 x H x W` on the padded work image, `[-1, 1]` units) to the photo's region.

    Each pixel of the region moves by the perturbation scaled back to the region's size, rounded to whole 8-bit
    levels and capped at the largest whole number of levels within `eps`; the result stays in 0..255. With
    `norm="l2"` (`eps` the L2 length of the whole change, `[-1, 1]` units), the scaled-back perturbation is
    shortened to `eps` and rounded within it (`round_within_l2`), in one piece. Returns the protected 8-bit photo
    and its distance to the photo: L-infinity in 1/255, L2 in `[-1, 1]` units and PSNR in dB.
    """
    if norm == "l2":
        return _paste_l2(image, placement, delta, eps)
    levels = int(budget_levels(eps))
    (w, h), (left, top, right, bottom) = placement.work, placement.box
    region_h = bottom - top
    delta = delta.detach().float().cpu()[:, :h, :w].clamp(-eps, eps) * 127.5
    if placement.scaled:  # the width now, the height strip by strip below
        delta = _scaled_up(delta, 2, 0, placement, left, right)
    delta = delta.permute(1, 2, 0).contiguous()  # rows x columns x channels, as the photo's array
    out = np.array(image)
    worst, squared = 0, 0.0
    for start in range(0, region_h, STRIP_ROWS):
        stop = min(start + STRIP_ROWS, region_h)
        if placement.scaled:
            strip = _scaled_up(delta, 0, 1, placement, top + start, top + stop)
        else:
            strip = delta[start:stop]
        clean = torch.from_numpy(out[top + start:top + stop, left:right])
        before = clean.to(torch.int16)
        protected = strip.round().clamp_(-levels, levels).to(torch.int16).add_(before).clamp_(0, 255)
        change = before.sub_(protected).abs_()
        worst = max(worst, int(change.max()))
        squared += float(torch.linalg.vector_norm(change.float(), dtype=torch.float64)) ** 2
        clean.copy_(protected)  # writes into `out`
    return out, _distances(worst, squared, out.size)


def _paste_l2(image: Image.Image, placement: Placement, delta: torch.Tensor, eps: float) -> tuple[np.ndarray, dict]:
    (w, h), (left, top, right, bottom) = placement.work, placement.box
    delta = delta.detach().float().cpu()[:, :h, :w] * 127.5
    if placement.scaled:
        delta = _scaled_up(_scaled_up(delta, 2, 0, placement, left, right), 1, 1, placement, top, bottom)
    out = np.array(image)
    clean = out[top:bottom, left:right]
    protected = round_within_l2(delta.permute(1, 2, 0).double().numpy(), clean, eps * 127.5)
    change = np.abs(protected.astype(np.int64) - clean)
    out[top:bottom, left:right] = protected
    return out, _distances(int(change.max()), float(np.sum(change**2)), out.size)


def distances(protected: np.ndarray, clean: np.ndarray) -> dict:
    """L-infinity (1/255), L2 (`[-1, 1]` units) and PSNR (dB) between two 8-bit images of one shape."""
    change = np.abs(protected.astype(np.int64) - clean.astype(np.int64))
    return _distances(int(change.max()), float(np.sum(change**2)), change.size)


def _distances(worst: int, squared: float, size: int) -> dict:
    """L-infinity (1/255), L2 (`[-1, 1]` units) and PSNR (dB) of a change of largest level `worst` and summed squared
    levels `squared` over an 8-bit photo of `size` values."""
    mse = squared / size / 255**2
    return {"linf_255": worst, "l2": float(np.sqrt(squared) / 127.5),
            "psnr": float("inf") if mse == 0 else float(10 * np.log10(1 / mse))}
