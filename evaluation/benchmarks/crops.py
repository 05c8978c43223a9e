"""The benchmarks' photos: a square around the face of each, at a size the models take."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
from PIL import Image

from methods.models.faces import FaceDetector
from utils import pil_to_tensor

T = TypeVar("T")


def spread(items: Sequence[T], count: int) -> list[T]:
    """`count` of `items` (all where there are fewer), spread evenly over them from the first."""
    count = min(count, len(items))
    return [items[round(k * len(items) / count)] for k in range(count)]


def face_crop(image: Image.Image, size: int, detector: FaceDetector) -> Image.Image:
    """A `size`-pixel square around the largest face, scaled so that the face box is about 45 % of the square's
    height (a centre crop where no face is found)."""
    x = pil_to_tensor(image)
    boxes = detector(x).boxes
    if len(boxes):
        x0, y0, x1, y1 = boxes[0].tolist()
        scale = 0.45 * size / max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2 * scale, (y0 + y1) / 2 * scale
    else:
        scale = size / min(image.size)
        cx, cy = image.width * scale / 2, image.height * scale / 2
    resized = image.resize((max(round(image.width * scale), 1), max(round(image.height * scale), 1)), Image.LANCZOS)
    left, top = round(cx - size / 2), round(cy - size / 2)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, (-left, -top))
    if left < 0 or top < 0 or left + size > resized.width or top + size > resized.height:
        edge = np.asarray(canvas).copy()  # fill what lies outside the photo with its nearest edge pixels
        rows = np.clip(np.arange(size) + top, 0, resized.height - 1)
        cols = np.clip(np.arange(size) + left, 0, resized.width - 1)
        edge[:] = np.asarray(resized)[rows][:, cols]
        canvas = Image.fromarray(edge)
    return canvas
