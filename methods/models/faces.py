"""Faces: detection, differentiable alignment and face-recognition embedders.

Images are `N x 3 x H x W` tensors in `[-1, 1]`. A `FaceDetector` finds boxes and five landmarks (eyes, nose,
mouth corners) once, on clean images. Alignment is a 2 x 3 matrix per face from image pixels to the embedder's
crop (a 5-point similarity onto the ArcFace template, or the detector box for facenet), applied with
`affine_grid`/`grid_sample` so that gradients reach every input pixel. A `FaceEmbedder` turns aligned crops into
unit vectors. `FaceIdentity` puts them together for the FaceLock loss and the FR metric; `FaceEnsemble` puts
several face models behind the same interface (one detection, similarities combined).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import SimilarityTransform
from torch import nn

from utils import ModelUnavailable

from ..randomness import normal_noise, uniform_noise

logger = logging.getLogger(__name__)

#: Five landmarks of the standard ArcFace 112 x 112 crop (x, y in pixels).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


class NoFaceError(ValueError):
    """No face was found where one is needed; `missing` lists the batch positions."""

    def __init__(self, message: str, missing: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []


@dataclass
class Faces:
    """Faces found in a batch of `count` images: the image each face belongs to (`index`, shape `K`), its box
    (`K x 4`, x0 y0 x1 y1) and landmarks (`K x 5 x 2`), in pixels of that image."""

    index: torch.Tensor
    boxes: torch.Tensor
    landmarks: torch.Tensor
    count: int

    @property
    def found(self) -> torch.Tensor:
        """Per image: was at least one face found?"""
        return torch.bincount(self.index, minlength=self.count) > 0


def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """`[-1, 1]` N x 3 x H x W to 0..255 N x H x W x 3 (what MTCNN takes)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)


class FaceDetector:
    """MTCNN (facenet-pytorch, weights inside the wheel) keeping the largest face per image, or all of them.

    Faces below `min_confidence` are dropped. Runs without gradients; its device follows the images.
    """

    def __init__(self, keep: str = "largest", min_confidence: float = 0.9, min_face_size: int = 20) -> None:
        if keep not in ("largest", "all"):
            raise ValueError(f"keep must be 'largest' or 'all', got {keep!r}")
        self.keep, self.min_confidence, self.min_face_size = keep, min_confidence, min_face_size
        self._mtcnn: dict[torch.device, nn.Module] = {}

    def _network(self, device: torch.device) -> nn.Module:
        if device not in self._mtcnn:
            from facenet_pytorch import MTCNN

            self._mtcnn[device] = MTCNN(keep_all=True, select_largest=True, min_face_size=self.min_face_size,
                                        device=device)
        return self._mtcnn[device]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Faces:
        boxes, probs, points = self._network(images.device).detect(to_uint8_hwc(images), landmarks=True)
        index, kept_boxes, kept_points = [], [], []
        for i, (b, p, pts) in enumerate(zip(boxes, probs, points)):
            if b is None:
                continue
            keep = [k for k in range(len(b)) if p[k] >= self.min_confidence]
            keep = keep[:1] if self.keep == "largest" else keep
            index += [i] * len(keep)
            kept_boxes += [b[k] for k in keep]
            kept_points += [pts[k] for k in keep]
        return Faces(
            index=torch.tensor(index, dtype=torch.long, device=images.device),
            boxes=torch.tensor(np.array(kept_boxes, dtype=np.float32).reshape(-1, 4), device=images.device),
            landmarks=torch.tensor(np.array(kept_points, dtype=np.float32).reshape(-1, 5, 2), device=images.device),
            count=len(images),
        )


def arcface_matrix(points: np.ndarray, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """The 2 x 3 similarity taking five landmarks (image pixels) onto the ArcFace template scaled to `size`
    (height, width): the 5-point alignment of ArcFace-style models."""
    height, width = size
    template = ARCFACE_TEMPLATE * np.array([width / 112, height / 112])
    return SimilarityTransform.from_estimate(np.asarray(points, dtype=np.float64), template).params[:2]


def _pixel_to_unit(height: int, width: int) -> np.ndarray:
    """Pixel coordinates (pixel centres at integers) to grid_sample's [-1, 1] (align_corners=False)."""
    return np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])


def warp_affine(t: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int], padding: str = "zeros"
                ) -> torch.Tensor:
    """Differentiable bilinear warp: `t[k]` (`K x C x h x w`) moved by `matrices[k]` (2 x 3, from `t`'s pixels to the
    output's) onto a `size` (height, width) output; where the output falls outside `t` it is zero, or with
    `padding="border"` the nearest edge value."""
    height, width = t.shape[-2:]
    thetas = []
    for m in matrices.detach().cpu().double().numpy():
        forward = np.vstack([m, [0, 0, 1]])
        theta = _pixel_to_unit(height, width) @ np.linalg.inv(forward) @ np.linalg.inv(_pixel_to_unit(*size))
        thetas.append(theta[:2])
    theta = torch.tensor(np.array(thetas).reshape(-1, 2, 3), dtype=t.dtype, device=t.device)
    grid = F.affine_grid(theta, [len(theta), t.shape[1], *size], align_corners=False)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def crop_faces(images: torch.Tensor, faces: Faces, matrices: torch.Tensor, size: tuple[int, int],
               antialias: bool = False) -> torch.Tensor:
    """Differentiable crops: face `k` of image `faces.index[k]` warped by `matrices[k]` (2 x 3, image pixels to
    crop pixels) into a `size` (height, width) crop. Outside the image is black, as with OpenCV's warpAffine.

    With `antialias`, a face that the crop shrinks is first resized (antialiased) to the crop's scale, so that every
    pixel of the face reaches the crop; without it, bilinear sampling reads the four pixels around each crop pixel
    and, on a face several times the crop's size, skips the rest."""
    if not antialias:
        return warp_affine(images[faces.index] + 1, matrices, size) - 1
    crops = [warp_affine(*shrunk_for(images[i:i + 1] + 1, matrix), size)
             for i, matrix in zip(faces.index.tolist(), matrices)]
    return torch.cat(crops) - 1 if crops else images.new_zeros((0, images.shape[1], *size))


def shrunk_for(image: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`image` (`1 x C x h x w`) resized with antialiasing to the scale of the warp `matrix` (2 x 3) where that
    shrinks it, and the matrix that warps the resized image the same way (`1 x 2 x 3`)."""
    m = matrix.detach().cpu().double().numpy()
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale >= 1:
        return image, matrix[None]
    height, width = image.shape[-2:]
    size = (max(round(height * scale), 1), max(round(width * scale), 1))
    fy, fx = size[0] / height, size[1] / width
    # a resized pixel u' sits at (u' + 0.5) / f - 0.5 in the image (pixel centres at integers)
    back = np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5], [0, 0, 1]])
    resized = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized, torch.tensor((np.vstack([m, [0, 0, 1]]) @ back)[None, :2], dtype=matrix.dtype)


class FaceEmbedder(nn.Module):
    """A face-recognition network with its input contract.

    Args:
        network: maps an `N x 3 x h x w` batch in the contract's range and channel order to `N x D` features.
        size: (height, width) of the crop.
        input_range: the pixel range the network takes, e.g. (0, 255) or (-1, 1).
        bgr: whether the network takes BGR instead of RGB.
        alignment: "arcface" (5-point similarity onto the ArcFace template, scaled to `size`) or
            "box" (the detector's box stretched onto the crop, as facenet expects).
        keypoints: pass the aligned landmarks (in [0, 1] crop units) as a second argument (CVLFace KP-RPE models).
    """

    def __init__(self, network: nn.Module, size: tuple[int, int] = (112, 112),
                 input_range: tuple[float, float] = (0.0, 255.0), bgr: bool = False, alignment: str = "arcface",
                 keypoints: bool = False, name: str = "") -> None:
        super().__init__()
        if alignment not in ("arcface", "box"):
            raise ValueError(f"alignment must be 'arcface' or 'box', got {alignment!r}")
        self.network = network
        self.size = tuple(size)
        self.input_range = tuple(float(v) for v in input_range)
        self.bgr, self.alignment, self.keypoints, self.name = bgr, alignment, keypoints, name
        self._feature_layer: str | None = None  # the name of `feature_layer()`, found on its first call

    def matrices(self, faces: Faces) -> torch.Tensor:
        """Per face, the 2 x 3 matrix from image pixels to crop pixels."""
        height, width = self.size
        out = []
        for box, points in zip(faces.boxes.cpu().double().numpy(), faces.landmarks.cpu().double().numpy()):
            if self.alignment == "arcface":
                out.append(arcface_matrix(points, (height, width)))
            else:
                x0, y0, x1, y1 = box
                sx, sy = width / max(x1 - x0, 1e-6), height / max(y1 - y0, 1e-6)
                out.append(np.array([[sx, 0, -x0 * sx - 0.5 + 0.5 * sx], [0, sy, -y0 * sy - 0.5 + 0.5 * sy]]))
        return torch.tensor(np.array(out).reshape(-1, 2, 3), dtype=torch.float64)

    def feature_layer(self) -> nn.Module:
        """The module giving the network's middle feature map: of its leaf modules whose output is an
        `N x C x h x w` map, in the order a forward pass runs them, the one half-way (found once, by running a grey
        crop). Intermediate features carry over between face models better than the final embedding (the
        feature-level attacks FIA and ILA)."""
        if self._feature_layer is None:
            order: list[str] = []
            hooks = [module.register_forward_hook(lambda m, i, out, name=name: order.append(name)
                                                  if torch.is_tensor(out) and out.dim() == 4 else None)
                     for name, module in self.network.named_modules() if not list(module.children())]
            kernel = next(self.network.parameters())
            crop = torch.zeros((1, 3, *self.size), device=kernel.device)
            height, width = self.size
            points = torch.tensor(ARCFACE_TEMPLATE * np.array([width / 112, height / 112]))[None]
            grey = Faces(torch.zeros(1, dtype=torch.long), torch.zeros(1, 4), points, 1)  # a face filling the crop
            try:
                with torch.no_grad():
                    self(crop, grey, torch.eye(2, 3, dtype=torch.float64)[None])
            finally:
                for hook in hooks:
                    hook.remove()
            if not order:
                raise ValueError(f"face model {self.name or type(self.network).__name__} has no feature map to compare")
            self._feature_layer = order[len(order) // 2]
        return self.network.get_submodule(self._feature_layer)

    def forward(self, crops: torch.Tensor, faces: Faces | None = None, matrices: torch.Tensor | None = None,
                weights: dict[str, torch.Tensor] | None = None, features: list | None = None) -> torch.Tensor:
        """Unit embeddings of `[-1, 1]` crops; with `weights` (name -> tensor), the network runs with those in place
        of its own parameters (a perturbed copy of the model, `noisy_weights`); with a list as `features`, the
        middle feature map (`feature_layer`) is appended to it."""
        hook = None if features is None else self.feature_layer().register_forward_hook(
            lambda m, i, out: features.append(out))
        kernel = next(self.network.parameters())
        low, high = self.input_range
        x = ((crops.float() + 1) / 2 * (high - low) + low).to(kernel.dtype)
        if self.bgr:
            x = x.flip(1)
        inputs = (x,)
        if self.keypoints:
            points = _apply(matrices, faces.landmarks.double().cpu()) / torch.tensor([self.size[1], self.size[0]])
            inputs = (x, points.to(x))
        try:
            if weights is None:
                embeddings = self.network(*inputs)
            else:
                embeddings = torch.func.functional_call(self.network, weights, inputs)
        finally:
            if hook is not None:
                hook.remove()
        return F.normalize(embeddings.float().flatten(1), dim=1)

    def noisy_weights(self, sigma: float, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """A randomly perturbed copy of the network's weights: each multiplied by `1 + sigma * n`, `n` standard
        normal, drawn from `generator` (surrogate diversity: one copy per image and step)."""
        out = {}
        for name, weight in self.network.named_parameters():
            if weight.is_floating_point():
                noise = normal_noise(torch.empty((1, *weight.shape)), generator)[0].to(weight)
                out[name] = weight * (1 + sigma * noise)
        return out


def _apply(matrices: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply K 2 x 3 matrices to K x P x 2 points."""
    return points @ matrices[:, :, :2].transpose(1, 2) + matrices[:, None, :, 2]


@dataclass
class FaceReference:
    """The clean faces of a batch: where they are, how they are cropped and their embeddings."""

    faces: Faces
    matrices: torch.Tensor
    embeddings: torch.Tensor
    #: `K x F`: the clean faces' middle feature maps, flattened and of unit length (kept within `featured`).
    features: torch.Tensor | None = None

    @property
    def found(self) -> torch.Tensor:
        return self.faces.found


def _unit_maps(maps: list) -> torch.Tensor:
    return F.normalize(maps[0].float().flatten(1), dim=1)


class FaceIdentity(nn.Module):
    """Detection, alignment and embedding behind one call.

    `reference(x)` detects faces once on the clean images and embeds them; `self(y, reference)` crops `y` at the
    clean faces' positions and returns, per image, the cosine similarity to the clean embedding, summed over the
    image's faces (0 where no face was found). Differentiable in `y`.
    """

    def __init__(self, embedder: FaceEmbedder, detector: Callable[[torch.Tensor], Faces]) -> None:
        super().__init__()
        self.embedder = embedder
        self.detector = detector
        #: (sigma, one generator per image) while `diversified` is on: each image sees a perturbed copy.
        self.diversity: tuple[float, list] | None = None
        #: Whether faces are cropped with antialiasing (`crop_faces`): on within `antialiased`.
        self.antialias = False
        #: The weight of the middle feature map's similarity, added to the embedding's within `featured` (0: off).
        self.feature_weight = 0.0

    @property
    def name(self) -> str:
        return self.embedder.name

    def networks(self) -> list[nn.Module]:
        """The face-recognition networks doing the work (what `--compile` compiles)."""
        return [self.embedder.network]

    def embed(self, images: torch.Tensor, faces: Faces | None = None, weights: dict | None = None,
              features: list | None = None) -> tuple[torch.Tensor, Faces, torch.Tensor]:
        """Embeddings (`K x D`) of the faces in `images`, detecting them unless `faces` is given (by the network's
        own weights, or `weights` in their place); also returns the faces and their crop matrices."""
        faces = self.detector(images) if faces is None else faces
        matrices = self.embedder.matrices(faces)
        if len(faces.index) == 0:
            return images.new_zeros((0, 1)), faces, matrices
        crops = crop_faces(images.float(), faces, matrices, self.embedder.size, self.antialias)
        return self.embedder(crops, faces, matrices, weights=weights, features=features), faces, matrices

    def reference(self, x: torch.Tensor, faces: Faces | None = None) -> FaceReference:
        """The clean faces of `x`: detected here unless `faces` (found by another model's detector) is given;
        within `featured`, with their middle feature maps."""
        maps: list | None = [] if self.feature_weight else None
        embeddings, faces, matrices = self.embed(x, faces, features=maps)
        return FaceReference(faces, matrices, embeddings.detach(), _unit_maps(maps).detach() if maps else None)

    def crops(self, y: torch.Tensor, reference: FaceReference) -> torch.Tensor:
        """`y` cropped at the clean faces' positions, as this model's embedder takes them."""
        return crop_faces(y.float(), reference.faces, reference.matrices, self.embedder.size, self.antialias)

    def similarity(self, crops: torch.Tensor, reference: FaceReference, count: int) -> torch.Tensor:
        """Per image of `count`, the summed cosine similarity of the `crops` to the clean embeddings. Within
        `diversified`, each image's faces are embedded by a perturbed copy of the network of its own; within
        `featured`, each face's similarity adds `feature_weight` times that of its middle feature map to the clean
        face's (the reference's `features`)."""
        faces = reference.faces
        featured_now = bool(self.feature_weight) and reference.features is not None
        if self.diversity is None:
            maps: list | None = [] if featured_now else None
            embeddings = self.embedder(crops, faces, reference.matrices, features=maps)
            similarity = self._scores(embeddings, maps, reference, slice(None))
        else:
            sigma, generators = self.diversity
            similarity = crops.new_zeros(len(crops), dtype=torch.float32)
            for i in sorted(set(faces.index.tolist())):
                rows = (faces.index == i).nonzero().flatten()
                mine = Faces(faces.index[rows], faces.boxes[rows], faces.landmarks[rows], faces.count)
                weights = self.embedder.noisy_weights(sigma, generators[i])
                maps = [] if featured_now else None
                embeddings = self.embedder(crops[rows], mine, reference.matrices[rows.cpu()], weights=weights,
                                           features=maps)
                similarity = similarity.index_copy(0, rows, self._scores(embeddings, maps, reference, rows))
        return crops.new_zeros(count, dtype=torch.float32).index_add(0, faces.index, similarity.float())

    def _scores(self, embeddings: torch.Tensor, maps: list | None, reference: FaceReference, rows) -> torch.Tensor:
        """Per face: the cosine similarity of its embedding to the clean one of its `rows` of the reference, plus,
        where its middle feature `maps` were kept, `feature_weight` times theirs."""
        value = (embeddings.float() * reference.embeddings[rows]).sum(dim=1)
        if maps is not None:
            value = value + self.feature_weight * (_unit_maps(maps) * reference.features[rows]).sum(dim=1)
        return value.float()

    def jittered(self, reference: FaceReference, generators: list, amount: float) -> FaceReference:
        """`reference` with each crop moved a little, as another detector would place it (`jitter_draws`)."""
        return moved(reference, self.embedder.size, jitter_draws(reference.faces, generators, amount))

    def forward(self, y: torch.Tensor, reference: FaceReference) -> torch.Tensor:
        if len(reference.faces.index) == 0:
            return y.new_zeros(len(y), dtype=torch.float32)
        return self.similarity(self.crops(y, reference), reference, len(y))


@dataclass
class EnsembleReference:
    """The clean faces of a batch, found once, with each member model's reference."""

    faces: Faces
    members: list[FaceReference]

    @property
    def found(self) -> torch.Tensor:
        return self.faces.found


class FaceEnsemble(nn.Module):
    """Several face models behind the interface of one `FaceIdentity`: faces are detected once (by the first
    member's detector), each model embeds them with its own alignment, crops are shared between models whose
    contracts agree (same crop size and alignment), and the per-image similarities are combined by `combine`:
    "mean" (default) or "max" (the per-image maximum, so an attack that lowers it works on the hardest model).
    """

    COMBINE = ("mean", "max")

    def __init__(self, members: list[FaceIdentity], combine: str = "mean") -> None:
        super().__init__()
        if not members:
            raise ValueError("a face ensemble needs at least one model")
        if combine not in self.COMBINE:
            raise ValueError(f"combine must be one of {self.COMBINE}, got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine

    @property
    def name(self) -> str:
        return ",".join(member.name for member in self.members)

    @property
    def detector(self) -> Callable[[torch.Tensor], Faces]:
        return self.members[0].detector

    def networks(self) -> list[nn.Module]:
        return [network for member in self.members for network in member.networks()]

    def reference(self, x: torch.Tensor, faces: Faces | None = None) -> EnsembleReference:
        faces = self.detector(x) if faces is None else faces
        return EnsembleReference(faces, [member.reference(x, faces) for member in self.members])

    def per_model(self, y: torch.Tensor, reference: EnsembleReference) -> torch.Tensor:
        """`M x N`: each member's similarity per image."""
        if len(reference.faces.index) == 0:
            return y.new_zeros((len(self.members), len(y)), dtype=torch.float32)
        crops: dict[tuple, torch.Tensor] = {}
        values = []
        for member, ref in zip(self.members, reference.members):
            key = (member.embedder.size, member.embedder.alignment)
            if key not in crops:
                crops[key] = member.crops(y, ref)
            values.append(member.similarity(crops[key], ref, len(y)))
        return torch.stack(values)

    def jittered(self, reference: EnsembleReference, generators: list, amount: float) -> EnsembleReference:
        """`reference` with each face's crop moved a little, the same move for every member (`jitter_draws`)."""
        draws = jitter_draws(reference.faces, generators, amount)
        return EnsembleReference(reference.faces, [moved(ref, member.embedder.size, draws)
                                                   for member, ref in zip(self.members, reference.members)])

    def forward(self, y: torch.Tensor, reference: EnsembleReference) -> torch.Tensor:
        values = self.per_model(y, reference)
        return values.mean(dim=0) if self.combine == "mean" else values.max(dim=0).values


@contextlib.contextmanager
def _set_on_models(face: nn.Module, attribute: str, value, off) -> Iterator[None]:
    """Within this block, `attribute` is `value` on every face model of `face` (a `FaceIdentity` or each member of a
    `FaceEnsemble`), and `off` again after it; nothing is touched when `value` is off."""
    models = list(face.members) if isinstance(face, FaceEnsemble) else [face]
    if not value:
        yield
        return
    for model in models:
        setattr(model, attribute, value)
    try:
        yield
    finally:
        for model in models:
            setattr(model, attribute, off)


def diversified(face: nn.Module, sigma: float, generators: list) -> contextlib.AbstractContextManager:
    """Within this block, every face model of `face` embeds each image's faces with its own randomly perturbed copy
    of its network (`FaceEmbedder.noisy_weights`, drawn from that image's generator): surrogate diversity, for
    protection that carries over to face models never attacked. Nothing changes when `sigma` is 0."""
    return _set_on_models(face, "diversity", (sigma, generators) if sigma else None, None)


def featured(face: nn.Module, weight: float) -> contextlib.AbstractContextManager:
    """Within this block, every face model of `face` keeps the clean faces' middle feature maps in the references it
    makes (`FaceEmbedder.feature_layer`), and its similarity adds `weight` times that of the feature maps to the
    embeddings' (a feature-level loss, for face models never attacked: their middle features resemble each other
    more than their final embeddings do). Nothing changes when `weight` is 0."""
    return _set_on_models(face, "feature_weight", weight, 0.0)


def antialiased(face: nn.Module, on: bool = True) -> contextlib.AbstractContextManager:
    """Within this block (where `on`), every face model of `face` crops faces with antialiasing (`crop_faces`), so
    that an attack's change covers the whole face rather than the pixels its alignment samples, and survives a
    resize or another detector's alignment."""
    return _set_on_models(face, "antialias", on, False)


def jitter_draws(faces: Faces, generators: list, amount: float) -> list[tuple[float, float, float, float]]:
    """Per face, how a detector that places faces a little differently would move its crop: a turn of up to
    `amount` degrees, a scale of up to `amount` %, a shift of up to `amount` % of the side each way, drawn from its
    image's generator."""
    draws = []
    for k in faces.index.tolist():
        u = uniform_noise(torch.empty(1, 4), -1.0, 1.0, generators[k])[0].double().tolist()
        draws.append((math.radians(amount * u[0]), 1 + amount / 100 * u[1], amount / 100 * u[2], amount / 100 * u[3]))
    return draws


def moved(reference: FaceReference, size: tuple[int, int], draws: list) -> FaceReference:
    """`reference` cropping each face moved by its draw of `jitter_draws` about the centre of a `size` crop; the
    clean embeddings are unchanged."""
    height, width = size
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    out = []
    for matrix, (angle, scale, dx, dy) in zip(reference.matrices.double().numpy(), draws):
        turn = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        shift = centre - turn @ centre + np.array([dx * width, dy * height])
        out.append(np.hstack([turn, shift[:, None]]) @ np.vstack([matrix, [0, 0, 1]]))
    matrices = torch.tensor(np.array(out).reshape(-1, 2, 3), dtype=reference.matrices.dtype)
    return replace(reference, matrices=matrices)


# --------------------------------------------------------------------------------------------------- loading

def read_contract(card: dict) -> dict:
    """The input contract of an ONNX face model from its `model.json`.

    Keys: `input_size` ([h, w], default [112, 112]); `input_range` ([low, high], default [0, 255]);
    `channel_order` ("RGB" or "BGR", default RGB); `alignment` ("arcface" or "box", default arcface). Cards that
    describe the input in words, as in `FACELOCK_ASSETS/models/*/model.json` (`"input": "float32 RGB in 0..255"`,
    `"alignment": "... ArcFace 112x112 template"`), are read too.
    """
    words = str(card.get("input", ""))
    if "input_range" in card:
        input_range = tuple(card["input_range"])
    elif "-1..1" in words.replace(" ", ""):
        input_range = (-1.0, 1.0)
    elif "0..1" in words.replace(" ", "") and "0..255" not in words:
        input_range = (0.0, 1.0)
    else:
        input_range = (0.0, 255.0)
    order = str(card.get("channel_order", "BGR" if "BGR" in words else "RGB")).upper()
    alignment = str(card.get("alignment", "arcface")).lower()
    alignment = "arcface" if "arcface" in alignment else alignment
    return {"size": tuple(card.get("input_size", (112, 112))), "input_range": input_range, "bgr": order == "BGR",
            "alignment": alignment}


def load_onnx_embedder(path: str | Path) -> FaceEmbedder:
    """An ONNX face model converted to PyTorch with onnx2torch, with the contract of the `model.json` beside it
    (see `read_contract`; without one, a 112 x 112 ArcFace-aligned RGB model taking 0..255 is assumed). The model is
    run once on a grey face to check that it gives one embedding per face. Raises `FileNotFoundError` for a missing
    file and `ModelUnavailable`, in one line, for a damaged or wrong one (truncated, not a face model, a broken
    `model.json`)."""
    import onnx2torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"face model {path} does not exist")
    card_path = path.with_name("model.json")
    try:
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        if not isinstance(card, dict):
            raise ValueError("not a JSON object")
        contract = read_contract(card)
        height, width = (int(v) for v in contract["size"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise ModelUnavailable(f"{card_path}: not a face model's card ({error}); see methods/README.md for its "
                               f"keys") from None
    if not card:
        logger.warning("no model.json beside %s; assuming %s", path, contract)
    try:
        network = onnx2torch.convert(str(path)).eval()
        with torch.no_grad():
            probe = network(torch.full((2, 3, height, width), sum(contract["input_range"]) / 2))
    except Exception as error:  # onnx and onnx2torch raise many kinds for a damaged or foreign file
        raise ModelUnavailable(f"{path}: not a face model this toolkit can run ({_first_line(error)})") from None
    if not isinstance(probe, torch.Tensor) or probe.squeeze(-1).squeeze(-1).ndim != 2 or len(probe) != 2:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise ModelUnavailable(f"{path}: gives {shape} for two faces, not one embedding per face; not a face model")
    return FaceEmbedder(network, **contract, name=card.get("name", path.parent.name))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
