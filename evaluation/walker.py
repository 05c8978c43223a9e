"""The one directory walker of the evaluation scripts.

Edits live in `DIR/seed{S}/prompt{i}/<name>.png` or, for a method run at several budgets,
`DIR/budget_*/seed{S}/prompt{i}/<name>.png`. Files are paired by name without extension (a source `a.jpg`
pairs with the edit `a.png`), never by sorted position; files that are not images are ignored, and names present on
one side only are reported as missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from utils import UserError, list_images


@dataclass
class EditSet:
    """The edits of one method (at one budget) for one seed."""

    label: str
    root: Path

    def prompt_dirs(self) -> dict[int, Path]:
        """prompt index -> folder, for every `prompt{i}` folder present."""
        found = {}
        for folder in self.root.iterdir():
            match = re.fullmatch(r"prompt(\d+)", folder.name)
            if match and folder.is_dir():
                found[int(match.group(1))] = folder
        return dict(sorted(found.items()))


def edit_sets(folder: str | Path, seed: int, label: str | None = None) -> list[EditSet]:
    """The edit sets under `folder` for `seed`: `folder/seed{S}` itself, or one per `folder/budget_*/seed{S}`."""
    folder = Path(folder)
    label = label or folder.name
    if (folder / f"seed{seed}").is_dir():
        return [EditSet(label, folder / f"seed{seed}")]
    budgets = sorted(p for p in folder.glob("budget_*") if (p / f"seed{seed}").is_dir())
    if not budgets:
        raise UserError(f"{folder} holds neither seed{seed}/ nor budget_*/seed{seed}/ (edits made with --seed {seed})")
    return [EditSet(f"{label}/{b.name}", b / f"seed{seed}") for b in budgets]


def images_by_name(folder: Path) -> dict[str, Path]:
    """Image files of `folder` by name without extension."""
    return {path.stem: path for path in list_images(folder)} if folder.is_dir() else {}


@dataclass
class Pairing:
    """Edits matched to their references by name."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (name, edit, reference)
    missing: list[str] = field(default_factory=list)  # reference names with no edit
    unmatched: list[str] = field(default_factory=list)  # edits with no reference


def pair_by_name(edits: dict[str, Path], references: dict[str, Path]) -> Pairing:
    return Pairing(
        pairs=[(name, edits[name], references[name]) for name in sorted(edits) if name in references],
        missing=sorted(set(references) - set(edits)),
        unmatched=sorted(set(edits) - set(references)),
    )
