"""Which photos a run reads from a folder tree: every image anywhere under it, the held-out acceptance set refused."""

from __future__ import annotations

from pathlib import Path

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
