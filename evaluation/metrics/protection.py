"""PSR: the protection success rate, the fraction of edits in which a face model no longer recognises the person."""

from __future__ import annotations

import torch

from .facial import FaceSimilarity


class ProtectionSuccess(FaceSimilarity):
    """Per edit, 1 where the FR similarity between the source photo's face and the edit's is at or below
    `threshold` (not recognised), 0 above it, NaN where either shows no face; the mean over edits is the protection
    success rate. Take the threshold of the judging face model at a false-accept rate from
    `evaluation.calibration` (1 % is the usual protocol of Flux-Guard's family), and judge with a face model the
    protection never saw.
    """

    key, title, lower_is_stronger = "psr", "PSR", False

    def __init__(self, identity, threshold: float, reuse_landmarks: bool = False) -> None:
        super().__init__(identity, reuse_landmarks)
        self.threshold = threshold

    def score(self, edits: torch.Tensor, names: list[str]) -> torch.Tensor:
        similarity = super().score(edits, names)
        return torch.where(similarity.isnan(), similarity, (similarity <= self.threshold).float())
