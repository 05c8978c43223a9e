"""Which photos a run reads from a folder tree (every image anywhere under it, the held-out acceptance set refused),
and what each output of a folder is named."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from utils import IMAGE_EXTENSIONS, UserError

#: The acceptance set of the offline assets (FACELOCK_ASSETS): no test, benchmark, default or tuning reads it.
HOLDOUT = "faces-holdout"


def photos_under(folder: str | Path) -> list[Path]:
    """Every image anywhere under `folder`, by path; the held-out acceptance set is refused."""
    folder = Path(folder)
    if HOLDOUT in folder.resolve().parts:
        raise UserError(f"{folder} is the held-out set, reserved for acceptance evaluation; no benchmark reads it")
    photos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise UserError(f"no photos under {folder}")
    return photos


def output_names(sources: Sequence[Path]) -> dict[Path, str]:
    """The output file of each source, `<stem>.png`; sources that share a stem (`face.heic` and `face.jpg`) each get
    their extension in the name instead (`face_heic.png`, `face_jpg.png`), so that none is left out, whatever else
    the folder holds. Two sources whose names still meet (`face_jpg.png` beside `face.jpg` and `face.heic`) are not
    named: the caller refuses the second."""
    stems = Counter(source.stem for source in sources)
    return {source: f"{source.stem}.png" if stems[source.stem] == 1 else
            f"{source.stem}_{source.suffix.lstrip('.')}.png" for source in sources}


def reading_notes(path: str | Path) -> list[str]:
    """What a person should know about how `utils.load_image` reads this file: of an animation or a multi-page file
    only the first frame is protected, and transparency becomes white (a fully transparent picture, all white)."""
    from PIL import Image

    from utils import read_heif

    read_heif()
    notes = []
    with Image.open(path) as image:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            notes.append(f"it has {frames} frames; only the first is protected")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            low, high = image.convert("RGBA").getchannel("A").getextrema()
            if high == 0:
                notes.append("it is fully transparent: it is protected as a white picture")
            elif low < 255:
                notes.append("its transparent parts become white")
    return notes
