"""Protection Success Rate (PSR): can a face model still identify a protected photo's person in a gallery?

The protocol of FaceCloak's evaluation: each probe (a protected photo, or an edit of one) is compared by cosine
similarity with a clean gallery holding other photos of the same people and of distractors (the probe's own clean
photo is left out). Rank-k PSR, per probe: 1 when no gallery photo of the probe's person is among the k most
similar (ties count against the protection), else 0. Verification PSR, per probe: the fraction of the pairs (probe,
gallery photo of the same person) that the model rejects, i.e. whose similarity is at or below the threshold where a
labelled calibration set gives the chosen false-accept rate (`evaluation.calibration`). A PSR is the mean over
probes; probes without a detectable face, or whose person has no other gallery photo, are not scored (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .base import SourceMetric

KINDS = ("top1", "top5", "verification")


def psr_outcomes(similarity: torch.Tensor, same: torch.Tensor, eligible: torch.Tensor, threshold: float,
                 ks: Sequence[int] = (1, 5)) -> dict[str, torch.Tensor]:
    """Per probe (`P`), from `P x G` similarities to the gallery, whether each gallery photo shows the probe's person
    (`same`) and may be compared with it (`eligible`; False for the probe's own clean photo): `top{k}` for each k
    (1.0: no photo of the person among the k most similar eligible gallery photos) and `verification` (the fraction
    of the person's eligible gallery photos at or below `threshold`). NaN where the person has no eligible photo."""
    genuine = same & eligible
    impostor = ~same & eligible
    has_genuine = genuine.any(dim=1)
    best = torch.where(genuine, similarity, torch.full_like(similarity, -torch.inf)).max(dim=1).values
    above = (impostor & (similarity > best[:, None])).sum(dim=1)  # other people strictly closer than the person
    nan = torch.full((len(similarity),), float("nan"))
    out = {f"top{k}": torch.where(has_genuine, (above >= k).float(), nan) for k in ks}
    rejected = (genuine & (similarity <= threshold)).sum(dim=1).float()
    out["verification"] = torch.where(has_genuine, rejected / genuine.sum(dim=1).clamp_min(1), nan)
    return out


def photo_key(path: Path, root: Path) -> str:
    """A gallery photo's name: its path under the gallery without extension, folders joined by `__`
    (`obama/obama1.jpg` -> `obama__obama1`), the name the benchmarks give flattened copies."""
    return "__".join(path.relative_to(root).with_suffix("").parts)


@dataclass
class Gallery:
    """Clean labelled photos embedded once by each face model (`embeddings[model]`: `G x D`, NaN rows where no face
    was found), with each model's threshold at the chosen false-accept rate."""

    keys: list[str]
    identities: list[str]
    embeddings: dict[str, torch.Tensor]
    thresholds: dict[str, float]

    def identity_of(self, name: str) -> tuple[str | None, int | None]:
        """The person of a probe named like a gallery photo (its key, or its file name when that is unique) and the
        position of that photo in the gallery; (None, None) when no gallery photo has that name."""
        if name in self.keys:
            k = self.keys.index(name)
            return self.identities[k], k
        stems = [k for k, key in enumerate(self.keys) if key.split("__")[-1] == name]
        if len(stems) == 1:
            return self.identities[stems[0]], stems[0]
        return None, None

    def outcomes(self, model: str, embeddings: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per probe (`embeddings`: `P x D`, a NaN row for a probe without a face), its PSR outcomes by `model`."""
        gallery = self.embeddings[model]
        found = ~gallery.isnan().any(dim=1)
        similarity = torch.nan_to_num(embeddings.float() @ torch.nan_to_num(gallery.float()).T, nan=-torch.inf)
        same = torch.zeros(len(names), len(self.keys), dtype=torch.bool)
        eligible = found[None].repeat(len(names), 1)
        for p, name in enumerate(names):
            person, own = self.identity_of(name)
            if person is None:
                eligible[p] = False
                continue
            same[p] = torch.tensor([identity == person for identity in self.identities])
            eligible[p, own] = False
        result = psr_outcomes(similarity, same, eligible, self.thresholds[model])
        probe_found = ~embeddings.isnan().any(dim=1)
        return {kind: torch.where(probe_found, value, torch.full_like(value, float("nan")))
                for kind, value in result.items()}


@torch.no_grad()
def embed_largest(models: dict[str, object], detector, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per model (a `methods.faces.FaceIdentity`), the embedding of each image's largest face (`N x D`, NaN rows where
    no face is found); faces are detected once, by `detector`, for every model."""
    from methods.faces import Faces

    faces = detector(images)
    first = {}
    for k, i in enumerate(faces.index.tolist()):
        first.setdefault(i, k)  # the largest face comes first
    keep = torch.tensor(list(first.values()), dtype=torch.long)
    largest = Faces(faces.index[keep], faces.boxes[keep], faces.landmarks[keep], len(images)) if len(keep) else faces
    out = {}
    for name, model in models.items():
        embeddings, _, _ = model.embed(images, largest)
        table = torch.full((len(images), embeddings.shape[1]), float("nan"))
        if len(keep):
            table[torch.tensor(list(first))] = embeddings.float().cpu()
        out[name] = table
    return out


class GalleryPSR(SourceMetric):
    """One PSR (`kind`: top1, top5 or verification) by one face model, scored per edit (the probe) against a
    `Gallery`; edits are named after their source photo, which tells the person. The edits of a batch are embedded
    once for every PSR metric sharing the same `Probes`."""

    lower_is_stronger = False
    reference = "source"

    def __init__(self, probes: "Probes", model: str, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.probes, self.model, self.kind = probes, model, kind
        self.key = f"psr_{kind}_{model}"
        self.title = f"PSR {'top-1' if kind == 'top1' else 'top-5' if kind == 'top5' else 'verification'} ({model})"

    def heading(self) -> str:
        return f"{self.title} {self.arrow()}"

    def embed_sources(self, images: torch.Tensor) -> list:
        return [None] * len(images)  # the gallery, not the source photo, is the reference

    def score(self, edits: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.probes.outcomes(edits, names)[self.model][self.kind]


class Probes:
    """Embeds each batch of probes once for all PSR metrics and models (the last batch, compared by content, is
    remembered)."""

    def __init__(self, gallery: Gallery, models: dict[str, object], detector) -> None:
        self.gallery, self.models, self.detector = gallery, models, detector
        self._last: tuple | None = None

    def outcomes(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        if self._last is None or self._last[1] != list(names) or self._last[0].shape != images.shape or \
                not torch.equal(self._last[0], images):  # each metric gets its own copy of the batch
            device = next(next(iter(self.models.values())).parameters()).device
            embedded = embed_largest(self.models, self.detector, images.to(device))
            outcomes = {model: self.gallery.outcomes(model, embedded[model], names) for model in self.models}
            self._last = (images, list(names), outcomes)
        return self._last[2]
