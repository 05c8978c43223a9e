"""FaceLock: protect the biometric identity of a portrait against diffusion editing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PGDAttack
from .models.autoencoder import as_autoencoder
from .models.faces import NoFaceError, antialiased, diversified, featured
from .randomness import Generators, per_sample_generators
from .registry import register


@dataclass
class _Clean:
    latent: torch.Tensor
    face: Any
    has_face: torch.Tensor
    perceptual: Any
    fr: torch.Tensor | None = None  # the attack's own FR similarity at the current iteration, once it is computed


@register
class FaceLock(PGDAttack):
    """FaceLock ("Edit Away and My Face Will not Stay: Personal Biometric Defense against Malicious Generative
    Editing", Wang et al., CVPR 2025, https://arxiv.org/abs/2411.16832).

    PGD through the editor's autoencoder that ascends, per image, with `y = clip(D(E(x')), -1, 1)`:

        -fr_weight * FR(y, x) * [i >= fr_start * N]
        + latent_weight * MSE(E(x'), E(x))
        + lpips_weight * LPIPS(y, x) * [i > lpips_start * N]

    i.e. it breaks the face-recognition similarity of the reconstruction, pushes the latent away from the clean
    one and makes the reconstruction perceptually different. Defaults are the official code's schedule and
    weights (1, 0.2, 1; FR from 35 % of the iterations on, LPIPS after 25 %). The clean latent, the clean face
    embedding (with its landmarks, reused for the reconstruction) and the clean perceptual reference are
    computed once. While a weight is zero its term is not computed at all; in the first quarter of the
    iterations only the encoder runs.

    Threat model: L-infinity, `eps` in `[-1, 1]` units. Defaults: eps 0.03, step_size 0.01, num_iters 100; the other
    options of `PGDAttack` (expectation over transformation among them).

    Models:
        autoencoder: any diffusers autoencoder (`AutoencoderKL`, `AutoencoderTiny`).
        face: has `reference(x)` (clean faces, computed once; `.found` marks images with a face) and is called
            as `face(y, reference)` giving one similarity per image, differentiable in `y`
            (e.g. `methods.models.faces.FaceIdentity`).
        perceptual: has `reference(x)` and is called as `perceptual(y, reference)` giving one distance per image
            (e.g. `methods.models.perceptual.LPIPSDistance`), or None to drop the term.

    For face models it never saw (each off by default): `surrogate_noise` embeds each image's reconstruction, at every
    step, with a randomly perturbed copy of each attacked face model (its weights times `1 + surrogate_noise * n`, drawn
    from the image's generator; surrogate diversity, after DPA's perturbed surrogates), and `landmark_jitter` crops the
    face where another detector would put it (turned by up to that many degrees, scaled and moved by up to that many %
    of the crop, drawn per face and step), and `feature_weight` adds to each face model's similarity that weight times
    the similarity of its middle feature map to the clean face's (a feature-level loss, after FIA and ILA:
    `methods.models.faces.featured`; the FR term, and `target_fr`, then count both). For photos resized on their way (an
    editor's working size, a platform's) and faces larger than the face model's crop: `antialias` crops faces with
    antialiasing (`methods.models.faces.crop_faces`), so that the change covers every pixel of the face instead of the
    pixels the model's bilinear alignment samples (on a face three times the crop's side, two in five).

    An image in which no face is found raises `NoFaceError`, unless `allow_no_face`: then that image is
    protected with the latent and perceptual terms only. With `target_fr`, an image stops as soon as the FR
    similarity of its reconstruction falls below that value (early stopping; off by default).

    Example::

        face = FaceIdentity(load_embedder("facenet"), FaceDetector())
        attack = FaceLock(pipe.vae, face, LPIPSDistance(lpips.LPIPS(net="vgg")))
        protected = attack(images, generator=[torch.Generator().manual_seed(s) for s in seeds])
    """

    name = "facelock"
    summary = "FaceLock: break face recognition of the VAE reconstruction, with latent and LPIPS terms"
    models = ("autoencoder", "face", "perceptual")

    def __init__(self, autoencoder: nn.Module, face: nn.Module, perceptual: nn.Module | None = None,
                 fr_weight: float = 1.0, latent_weight: float = 0.2, lpips_weight: float = 1.0,
                 fr_start: float = 0.35, lpips_start: float = 0.25, allow_no_face: bool = False,
                 target_fr: float | None = None, surrogate_noise: float = 0.0, landmark_jitter: float = 0.0,
                 antialias: bool = False, feature_weight: float = 0.0, **options) -> None:
        super().__init__(**options)
        if surrogate_noise < 0 or landmark_jitter < 0 or feature_weight < 0:
            raise ValueError(f"need surrogate_noise, landmark_jitter and feature_weight >= 0, got {surrogate_noise}, "
                             f"{landmark_jitter} and {feature_weight}")
        self.surrogate_noise, self.landmark_jitter, self.antialias = surrogate_noise, landmark_jitter, antialias
        self.feature_weight = feature_weight
        self.generators: list | None = None  # the per-image generators of the call in progress
        self.autoencoder = as_autoencoder(autoencoder)
        self.face = face
        self.perceptual = perceptual
        self.fr_weight, self.latent_weight, self.lpips_weight = fr_weight, latent_weight, lpips_weight
        self.fr_start, self.lpips_start = fr_start, lpips_start
        self.allow_no_face = allow_no_face
        self.target_fr = target_fr

    def weights_at(self, i: int) -> tuple[float, float, float]:
        """(FR, latent, LPIPS) weights at iteration `i`, with the official schedule."""
        fr = self.fr_weight if i >= self.num_iters * self.fr_start else 0.0
        lpips = self.lpips_weight if self.perceptual is not None and i > self.num_iters * self.lpips_start else 0.0
        return fr, self.latent_weight, lpips

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        self.generators = per_sample_generators(generator, len(x))
        try:
            with antialiased(self.face, self.antialias), featured(self.face, self.feature_weight):
                return super().perturb(x, generator)
        finally:
            self.generators = None

    def prepare(self, x: torch.Tensor) -> _Clean:
        face = self.face.reference(x)
        has_face = face.found.to(x.device)
        if not self.allow_no_face and not has_face.all():
            missing = [i for i, found in enumerate(has_face.tolist()) if not found]
            raise NoFaceError(f"no face found in image(s) {missing} of the batch", missing)
        perceptual = self.perceptual.reference(x) if self.perceptual is not None else None
        return _Clean(self.autoencoder.encode(x).float(), face, has_face, perceptual)

    def objective(self, x_adv: torch.Tensor, clean: _Clean, i: int) -> torch.Tensor:
        fr_w, latent_w, lpips_w = self.weights_at(i)
        latent = self.autoencoder.encode(x_adv)
        value = latent_w * F.mse_loss(latent.float(), clean.latent, reduction="none").flatten(1).mean(dim=1)
        if fr_w or lpips_w:
            y = self.autoencoder.decode(latent).float().clamp(-1, 1)
            if fr_w:
                faces = clean.face
                if self.landmark_jitter:
                    faces = self.face.jittered(faces, self.generators, self.landmark_jitter)
                with diversified(self.face, self.surrogate_noise, self.generators):
                    clean.fr = self.face(y, faces).float()
                value = value - fr_w * clean.fr * clean.has_face
            if lpips_w:
                value = value + lpips_w * self.perceptual(y, clean.perceptual).float()
        return value

    def reached(self, clean: _Clean, i: int) -> torch.Tensor | None:
        if self.target_fr is None or clean.fr is None:
            return None
        return (clean.fr.detach() < self.target_fr) & clean.has_face
