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

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from methods.facecloak import members
from methods.models.loading import load_face_identity
from methods.pipeline.photos import photos_under
from utils import batches_by_size, image_size, load_image, pil_to_tensor

from ..calibration import labelled_photos, threshold_at_far
from .base import SourceMetric, nanmean

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
    """Per model (a `methods.models.faces.FaceIdentity`), the embedding of each image's largest face (`N x D`, NaN
    rows where no face is found); faces are detected once, by `detector`, for every model."""
    from methods.models.faces import Faces

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


# ------------------------------------------------------------------------------- galleries and probes

def by_name(face) -> tuple[dict, object]:
    """The face models of `face` (a `FaceIdentity` or a `FaceEnsemble`) by name, each on its own, and their shared
    detector."""
    return {member.name: member for member in members(face)}, face.detector


def face_models(spec: str, device: torch.device) -> tuple[dict, object]:
    """The face models named in `spec` (comma-separated, loaded as one `FaceEnsemble`) by name, and their detector."""
    return by_name(load_face_identity(spec, device))


def load_gallery(folder: Path, models: dict, detector, far: float = 0.01, distractors: Path | None = None,
                 calibration: Path | None = None, batch_size: int = 8) -> tuple[Gallery, dict[str, Path]]:
    """Embed the labelled photos of `folder` (and `distractors`, each its own person) with every model, and set each
    model's threshold at `far` on `calibration` (default: the labelled gallery's own pairs). Returns the gallery and
    its photos by key."""
    labelled = labelled_photos(folder)
    paths = {photo_key(path, folder): path for path, _ in labelled}
    identities = [identity for _, identity in labelled]
    if distractors is not None:
        for path in photos_under(distractors):
            key = "distractor__" + photo_key(path, distractors)
            paths[key] = path
            identities.append(key)
    keys = list(paths)
    embedded = embed_paths([paths[k] for k in keys], models, detector, batch_size)
    if calibration is None:
        labelled_keys = set(keys[:len(labelled)])
        thresholds = {}
        for model, table in embedded.items():
            impostor = [float(table[a] @ table[b]) for a, b in itertools.combinations(range(len(keys)), 2)
                        if keys[a] in labelled_keys and keys[b] in labelled_keys
                        and identities[a] != identities[b] and not table[[a, b]].isnan().any()]
            thresholds[model] = threshold_at_far(impostor, far)
    else:
        from ..calibration import calibrate

        photos = labelled_photos(calibration)
        thresholds = {name: calibrate(model, photos, far).threshold for name, model in models.items()}
    return Gallery(keys, identities, embedded, thresholds), paths


def embed_paths(paths: Sequence[Path], models: dict, detector, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per model, the embeddings of the largest face of each photo (NaN rows where there is none)."""
    device = next(next(iter(models.values())).parameters()).device
    tables: dict[str, torch.Tensor] = {}
    order = list(range(len(paths)))
    for batch in batches_by_size(order, lambda i: image_size(paths[i]), batch_size):
        images = torch.cat([pil_to_tensor(load_image(paths[i])) for i in batch]).to(device)
        for model, table in embed_largest(models, detector, images).items():
            if model not in tables:
                tables[model] = torch.full((len(paths), table.shape[1]), float("nan"))
            tables[model][batch] = table
    return tables


def score_probes(probes: Probes, paths: dict[str, Path], batch_size: int = 8) -> list[dict]:
    """One row per probe (by name) and model with its PSR outcomes."""
    rows = []
    names = sorted(paths)
    for batch in batches_by_size(names, lambda n: image_size(paths[n]), batch_size):
        images = torch.cat([pil_to_tensor(load_image(paths[n])) for n in batch])
        for model, outcomes in probes.outcomes(images, batch).items():
            for k, name in enumerate(batch):
                rows.append({"probe": name, "model": model, **{kind: float(outcomes[kind][k]) for kind in KINDS}})
    return rows


def summarise(rows: list[dict], label: str, models: Sequence[str]) -> list[dict]:
    out = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        scored = [r for r in mine if not math.isnan(r["top1"])]
        out.append({"probes": label, "model": model, **{kind: nanmean([r[kind] for r in mine]) for kind in KINDS},
                    "scored": len(scored), "unscored": len(mine) - len(scored)})
    return out
