"""What the evaluation runner needs to know about a metric."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


class Metric:
    """One score per edit.

    `reference` says what an edit is compared with: "clean" (the edit of the unprotected photo with the same
    prompt and seed) or "source" (the photo that was edited). `lower_is_stronger` gives the arrow: the direction in
    which the score moves when the defense works better. A score of NaN means the edit could not be scored (for
    example no face was found) and is counted, not averaged.
    """

    key = ""
    title = ""
    reference = "clean"
    lower_is_stronger = True

    @classmethod
    def arrow(cls) -> str:
        return "↓" if cls.lower_is_stronger else "↑"

    @classmethod
    def heading(cls) -> str:
        return f"{cls.title} {cls.arrow()}"


class CleanMetric(Metric):
    """Compares an edit with the clean edit of the same photo, prompt and seed."""

    reference = "clean"

    def score(self, edits: torch.Tensor, cleans: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SourceMetric(Metric):
    """Compares an edit with its source photo. Sources are added once (`add_sources`), whatever the number of
    prompts and methods, and edits are then scored against them by name."""

    reference = "source"

    def __init__(self) -> None:
        self.sources: dict[str, torch.Tensor] = {}

    def add_sources(self, names: list[str], images: torch.Tensor) -> None:
        for name, value in zip(names, self.embed_sources(images)):
            self.sources[name] = value

    def embed_sources(self, images: torch.Tensor) -> list:
        raise NotImplementedError

    def set_prompt(self, prompt: str) -> None:
        """Called before the edits of each prompt are scored."""

    def score(self, edits: torch.Tensor, names: list[str]) -> torch.Tensor:
        raise NotImplementedError


def nanmean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN if none is)."""
    scored = [v for v in values if not math.isnan(v)]
    return float(np.mean(scored)) if scored else float("nan")
