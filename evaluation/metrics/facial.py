"""FR: face-recognition cosine similarity between the source photo's face and the edit's face."""

from __future__ import annotations

import torch

from .base import SourceMetric


class FaceSimilarity(SourceMetric):
    """Takes a `methods.models.faces.FaceIdentity` (any face model, so a model the attack never saw can judge).

    The source's largest face is embedded once. On each edit the face is detected again by default (an edit may
    move the face); `reuse_landmarks` crops the edit where the source's face was instead. Sources or edits without
    a detectable face score NaN: they are counted and reported, never averaged as zero.
    """

    key, title, lower_is_stronger = "fr", "FR", True

    def __init__(self, identity, reuse_landmarks: bool = False) -> None:
        super().__init__()
        self.identity = identity
        self.reuse_landmarks = reuse_landmarks
        self.device = next(identity.parameters()).device

    @torch.no_grad()
    def embed_sources(self, images: torch.Tensor) -> list:
        embeddings, faces, _ = self.identity.embed(images.to(self.device))
        out = [None] * len(images)
        for k, i in enumerate(faces.index.tolist()):
            if out[i] is None:  # the largest face comes first
                out[i] = (embeddings[k].cpu(), faces.landmarks[k].cpu(), faces.boxes[k].cpu())
        return out

    @torch.no_grad()
    def score(self, edits: torch.Tensor, names: list[str]) -> torch.Tensor:
        from methods.models.faces import Faces

        scores = torch.full((len(names),), float("nan"))
        known = [i for i, name in enumerate(names) if self.sources[name] is not None]
        if not known:
            return scores
        batch = edits[known].to(self.device)
        if self.reuse_landmarks:
            faces = Faces(index=torch.arange(len(known), device=self.device),
                          boxes=torch.stack([self.sources[names[i]][2] for i in known]).to(self.device),
                          landmarks=torch.stack([self.sources[names[i]][1] for i in known]).to(self.device),
                          count=len(known))
        else:
            faces = None
        embeddings, faces, _ = self.identity.embed(batch, faces)
        seen = set()
        for k, j in enumerate(faces.index.tolist()):
            if j not in seen:  # the largest face of edit j
                seen.add(j)
                source = self.sources[names[known[j]]][0]
                scores[known[j]] = torch.dot(embeddings[k].cpu(), source)
        return scores


class HeldOutFaceSimilarity(FaceSimilarity):
    """FR by a second face model, one the protections did not attack, as a column of its own."""

    key, title = "fr_heldout", "FR held-out"
