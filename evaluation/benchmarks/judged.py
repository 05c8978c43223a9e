"""What a benchmark has already judged, kept beside its outputs so that a rerun judges only what is new.

A JSON object from a key (everything the rows were judged from: the files' SHA-256, the models, the thresholds, the
seed) to the rows. A damaged or missing file is an empty record: the rows are judged again."""

from __future__ import annotations

import json
from pathlib import Path

from utils import atomic_write


def read_judged(path: Path) -> dict[str, list[dict]]:
    """The rows recorded at `path`, by key; empty where there is no readable record."""
    try:
        judged = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return judged if isinstance(judged, dict) else {}


def write_judged(path: Path, judged: dict[str, list[dict]]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(judged)))
