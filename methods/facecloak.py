"""FaceCloak: one identity mask per person, learned once, applied to any new photo by a warp."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .base import L2_STEP, Attack, frozen
from .models.faces import ARCFACE_TEMPLATE, Faces, NoFaceError, arcface_matrix, warp_affine
from .randomness import Generators, uniform_noise
from .registry import register
from .transforms import (
    ColorJitter,
    GaussianBlur,
    Lighting,
    PillowJPEG,
    RandomAffine,
    _draw,
    fit_long_side,
    luma,
    scaled_size,
    shrink,
)

logger = logging.getLogger(__name__)

#: The focusing options, each inside the optimisation.
FOCUS = ("stickers", "highpass", "attention")
#: The triplet's near anchor: the gallery face most similar to the person (the paper's), or the person's own face.
NEAR = ("gallery", "self")
#: FaceCloak's budgets and step in the project's [-1, 1] units (twice the [0, 1] value): 8/255, 32/255 and 2/255.
BASE_BUDGET, FOCUS_BUDGET, STEP = 0.0628, 0.251, 0.0157
#: The training canvas shows the face at this multiple of the template's scale, with this much room around it.
CANVAS_SCALE, CANVAS_ROOM = 2.0, 1.5
#: "Another photo of the person": a change of pose, then of lighting and colour, then sometimes blur or JPEG.
POSE = RandomAffine(degrees=(-10.0, 10.0), scale=(0.55, 1.1), shear=(-4.0, 4.0), translate=(-0.04, 0.04))
LIGHT, COLOUR = Lighting(strength=(0.0, 0.3), gamma=(0.8, 1.25)), ColorJitter()
BLUR, CODEC = GaussianBlur(sigma=(0.3, 1.2)), PillowJPEG(quality=(60, 95))


def focus_budgets(eps: float, focus: Sequence[str], sticker_budget: float, highpass_budget: float) -> list[float]:
    """The per-pixel budgets a mask's pixels may take under `focus`: the base `eps`, then each enlarged region's."""
    return [eps] + [b for name, b in (("stickers", sticker_budget), ("highpass", highpass_budget)) if name in focus]


def template(size: int) -> np.ndarray:
    """The five ArcFace landmarks in a `size` x `size` aligned face."""
    return ARCFACE_TEMPLATE * size / 112


@dataclass
class IdentityMask:
    """A person's universal perturbation in the aligned face space (the ArcFace template scaled to `size` x `size`):
    `delta` (`3 x S x S`, `[-1, 1]` units) lies within the per-pixel `budget` (`1 x S x S`) it was learned with.
    `info` is its provenance (models, budgets, photos, loss per pass, seconds), saved with it."""

    delta: torch.Tensor
    budget: torch.Tensor
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = self.delta.shape[-1]
        if self.delta.shape != (3, size, size) or self.budget.shape != (1, size, size):
            raise ValueError(f"an identity mask is 3 x S x S with a 1 x S x S budget, got {tuple(self.delta.shape)} "
                             f"and {tuple(self.budget.shape)}")
        if (self.delta.abs() > self.budget + 1e-6).any():
            raise ValueError("the identity mask exceeds its budget")

    @property
    def size(self) -> int:
        return self.delta.shape[-1]

    @property
    def eps(self) -> float:
        """The largest per-pixel budget."""
        return float(self.budget.max())

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"delta": self.delta.detach().float().cpu().contiguous(),
                   "budget": self.budget.detach().float().cpu().contiguous()}
        save_file(tensors, str(path), metadata={"facecloak": json.dumps(self.info, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> "IdentityMask":
        """A mask saved by `save`; raises `ValueError` for a file that is not one (`OSError` if unreadable)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("facecloak", "{}"))
                return cls(f.get_tensor("delta"), f.get_tensor("budget"), info)
        except (SafetensorError, KeyError) as error:
            raise ValueError(f"{path} is not an identity mask ({error})") from None


# ------------------------------------------------------------------------------------------- focusing

def sticker_regions(size: int) -> torch.Tensor:
    """FaceCloak's region stickers on the aligned face (`1 x S x S`, boolean): eye boxes W/5 x H/11 and a nose box
    W/5 x H/4, centred on their landmarks, and a mouth box from one mouth corner to the other, 28/112 of the side
    high, centred between them."""
    points, k = template(size), size / 112
    mouth = (points[3] + points[4]) / 2
    boxes = [(*points[0], size / 5, size / 11), (*points[1], size / 5, size / 11), (*points[2], size / 5, size / 4),
             (*mouth, points[4, 0] - points[3, 0], 28 * k)]
    centres = torch.arange(size, dtype=torch.float64)
    regions = torch.zeros(size, size, dtype=torch.bool)
    for cx, cy, w, h in boxes:
        inside_x = (centres - cx).abs() <= w / 2
        inside_y = (centres - cy).abs() <= h / 2
        regions |= inside_y[:, None] & inside_x[None, :]
    return regions[None]


def highpass_regions(aligned: torch.Tensor) -> torch.Tensor:
    """Where the aligned face (`N x 3 x S x S` in `[-1, 1]`, averaged) has more high-frequency texture than on
    average (`1 x S x S`, boolean): the magnitude of its luma minus a Gaussian blur of sigma 3/112 of the side,
    z-scored, above zero."""

    face = aligned.float().mean(dim=0, keepdim=True)
    detail = luma(face - GaussianBlur(sigma=3 * aligned.shape[-1] / 112).apply(face, None)).abs()
    z = (detail - detail.mean()) / detail.std().clamp_min(1e-12)
    return (z > 0)[0]


# -------------------------------------------------------------------------------------------- placing

def mask_matrices(faces: Faces, size: int) -> torch.Tensor:
    """Per face, the 2 x 3 similarity from image pixels to the `size` x `size` aligned face."""
    points = faces.landmarks.detach().cpu().double().numpy()
    return torch.tensor(np.array([arcface_matrix(p, (size, size)) for p in points]).reshape(-1, 2, 3))


def footprints(faces: Faces, size: int, shape: tuple[int, int]) -> list[tuple[int, tuple[int, ...], np.ndarray]]:
    """Per face: its image, the window `(y0, y1, x0, x1)` of an image of `shape` that its `size` x `size` aligned
    face covers once warped back (clipped to the image), and the 2 x 3 matrix from the aligned face's pixels to the
    window's: the inverse of the face's alignment."""
    height, width = shape
    out = []
    for k, matrix in zip(faces.index.tolist(), mask_matrices(faces, size)):
        inverse = np.linalg.inv(np.vstack([matrix.numpy(), [0, 0, 1]]))[:2]
        corners = inverse @ np.array([[-0.5, -0.5, 1], [size - 0.5, -0.5, 1], [-0.5, size - 0.5, 1],
                                      [size - 0.5, size - 0.5, 1]]).T
        x0, y0 = (max(int(math.floor(v)) - 1, 0) for v in corners.min(axis=1))
        x1, y1 = min(int(math.ceil(corners[0].max())) + 2, width), min(int(math.ceil(corners[1].max())) + 2, height)
        if x1 > x0 and y1 > y0:
            out.append((k, (y0, y1, x0, x1), inverse - np.array([[0, 0, x0], [0, 0, y0]])))
    return out


def warp_window(maps: torch.Tensor, matrix: np.ndarray, window: tuple[int, ...]) -> torch.Tensor:
    """Aligned-space maps (`C x S x S`) warped by `matrix` onto a `window` (`y0, y1, x0, x1`): `C x h x w`. Bilinear,
    so a warped value never exceeds the largest of its four neighbours in the aligned face."""
    y0, y1, x0, x1 = window
    return warp_affine(maps[None], torch.from_numpy(matrix)[None], (y1 - y0, x1 - x0))[0]


def warp_onto(maps: torch.Tensor, faces: Faces, shape: tuple[int, int]) -> torch.Tensor:
    """Aligned-space maps (`C x S x S`) warped onto every face of `faces` in images of `shape` (height, width):
    `N x C x H x W`, zero away from the faces; where faces overlap, values add. Differentiable in `maps`."""
    out = maps.new_zeros((faces.count, maps.shape[0], *shape))
    for k, (y0, y1, x0, x1), matrix in footprints(faces, maps.shape[-1], shape):
        out[k, :, y0:y1, x0:x1] += warp_window(maps, matrix, (y0, y1, x0, x1))
    return out


def detect(detector: Callable[[torch.Tensor], Faces], x: torch.Tensor, max_size: int = 0) -> Faces:
    """Faces of `x`, found on a copy whose long side is at most `max_size` (0: full size), in `x`'s pixels."""
    height, width = x.shape[-2:]
    small = fit_long_side(x, max_size)
    if small is x:
        return detector(x)
    sy, sx = small.shape[-2] / height, small.shape[-1] / width
    faces = detector(small)
    factor = torch.tensor([sx, sy], dtype=faces.landmarks.dtype, device=faces.landmarks.device)
    boxes = ((faces.boxes.view(-1, 2, 2) + 0.5) / factor - 0.5).view(-1, 4)
    return Faces(faces.index, boxes, (faces.landmarks + 0.5) / factor - 0.5, faces.count)


# ------------------------------------------------------------------------------------------- learning

@dataclass
class _View:
    """One training image: a square canvas around the face, with the face's landmarks and box in its pixels."""

    canvas: torch.Tensor
    landmarks: torch.Tensor
    box: torch.Tensor

    @property
    def faces(self) -> Faces:
        return Faces(torch.zeros(1, dtype=torch.long, device=self.canvas.device), self.box[None].to(self.canvas),
                     self.landmarks[None].to(self.canvas), 1)


def members(face: nn.Module) -> list[nn.Module]:
    """The face models of a `FaceIdentity` (one) or a `FaceEnsemble` (each)."""
    return list(face.members) if hasattr(face, "members") else [face]


@register
class FaceCloak(Attack):
    """FaceCloak ("Personalized Face Privacy Protection From a Single Image"; official code
    https://github.com/zacharyyahn/FaceCloak): a universal, identity-specific perturbation learned once from a few
    photos of a person (plus synthetic variations of them) and added to any later photo of that person, with no
    optimisation per photo.

    The mask lives in the aligned face space: the ArcFace 112 x 112 template, or `mask_size` (a multiple of it). On
    a photo it is warped by the inverse of the similarity that aligns that photo's five landmarks onto the template,
    so it lands on the face whatever its size, position and roll. Learning optimises it through that same warp and
    through each face model's own alignment, over the person's photos and random variations of each (pose, lighting,
    colour, blur, JPEG: `variations` per photo and pass), with FaceCloak's triplet loss per face model

        cos(e, near) - cos(e, far)

    where `near` and `far` are the gallery faces (other people) most and least similar to the person's photos (their
    mean clean embedding); several face models (`FaceEnsemble`) are averaged (or their worst taken,
    with `combine="max"`). Sign-PGD as the paper: uniform start in the budget, `num_iters` passes, one step of
    `step_size` after each image, projection onto the per-pixel budget after every step.

    For the way photos are shared and for face models never attacked (both off by default): `eot` sends each masked
    view through a random cleanup (e.g. `methods.transforms.Sharing`: a resize, one or two JPEGs) before it is
    embedded, and `surrogate_noise` embeds it with a randomly perturbed copy of each face model (see `FaceLock`).

    Beyond the paper (both off by default): `near="self"` takes the person's own mean clean embedding as the near
    anchor, so that the loss pushes the face away from itself rather than from the most similar other person; and
    `mask_l2` also bounds the L2 length of the mask (in `[-1, 1]` units, at `mask_size`): steps then follow the
    L2-normalised gradient (length `mask_l2 / 8`) instead of its sign, the start is uniform in the largest cube
    inside the ball, and each projection clips to the per-pixel budget, then shortens the mask to `mask_l2`. The
    per-pixel budget becomes a cap (e.g. `eps=0.251`, 32/255): the change goes where it moves the embedding most.

    Focusing (`focus`, any of): "stickers", a larger budget (`sticker_budget`) in boxes around the eyes, nose and
    mouth; "highpass", a larger budget (`highpass_budget`) where the person's aligned face has above-average
    high-frequency texture; "attention", FaceCloak's learnable attention (a per-pixel gain on the perturbation,
    updated by `attention_lr` times its z-scored gradient, the product clipped to the budget). The budgets are maps
    in the aligned space, saved with the mask; in a photo, the budget of a pixel is the bilinear warp of that map
    (which bounds the warped mask exactly), zero away from the face.

    Threat model: per-pixel L-infinity around the clean photo, `eps` (the base budget; default 8/255, i.e. 0.0628 in
    `[-1, 1]` units) and the focus budgets (default 32/255), on the face only. `self.eps` is the largest of them.
    With `mask_l2`, the mask's L2 length in the aligned space is bounded too (its length in a photo scales with the
    face's size).

    Models:
        face: a `methods.models.faces.FaceIdentity` or `FaceEnsemble` (needed to learn a mask).
        detector: finds faces and landmarks when the mask is applied (default: the face model's detector).
        mask: an `IdentityMask` learned earlier (`learn` sets one).

    Example::

        cloak = FaceCloak(load_face_identity("sface,mobilefacenet", device))
        mask = cloak.learn([photo], gallery=[pil_to_tensor(p) for p in others], generator=torch.Generator())
        protected = cloak(new_photos)  # any size, each face found and masked in a fraction of a second
    """

    name = "facecloak"
    summary = "FaceCloak: one identity mask learned from a person's photos, warped onto any new photo of them"
    models = ("face",)
    #: The paper's budget 8/255, step 2/255 and 10 passes, in [-1, 1] units, and the mask on the whole photo.
    defaults = {"attack_budget": BASE_BUDGET, "step_size": STEP, "num_iters": 10, "region": "full"}
    placement = "photo"
    placement_reason = ("its mask is warped onto the faces themselves and the rest of the photo is left untouched "
                        "anyway")
    learns = True
    no_face_hint = "facecloak masks faces only; the photo is left as it is"

    def __init__(self, face: nn.Module | None = None, detector: Callable[[torch.Tensor], Faces] | None = None,
                 mask: IdentityMask | None = None, eps: float = BASE_BUDGET, step_size: float = STEP,
                 num_iters: int = 10, variations: int = 8, focus: Sequence[str] = (),
                 sticker_budget: float = FOCUS_BUDGET, highpass_budget: float = FOCUS_BUDGET,
                 attention_lr: float = 10.0, mask_size: int = 112, max_size: int = 1024,
                 near: str = "gallery", mask_l2: float = 0.0, eot: Callable | None = None,
                 surrogate_noise: float = 0.0, progress: bool = False) -> None:
        focus = tuple(focus)
        unknown = sorted(set(focus) - set(FOCUS))
        if unknown:
            raise ValueError(f"unknown focus {unknown}; choose from {', '.join(FOCUS)}")
        if mask_size < 112 or mask_size % 112:
            raise ValueError(f"mask_size must be a multiple of 112, got {mask_size}")
        if step_size <= 0 or num_iters < 1 or variations < 0 or near not in NEAR or mask_l2 < 0:
            raise ValueError(f"need step_size > 0, num_iters >= 1, variations >= 0, near in {NEAR} and mask_l2 >= 0, "
                             f"got {step_size}, {num_iters}, {variations}, {near!r} and {mask_l2}")
        budgets = focus_budgets(eps, focus, sticker_budget, highpass_budget)
        if min(budgets) <= 0:
            raise ValueError(f"budgets must be positive, got {budgets}")
        super().__init__(eps=max(budgets), progress=progress)
        self.face = face
        self.detector = detector if detector is not None else getattr(face, "detector", None)
        self.base_budget, self.sticker_budget, self.highpass_budget = eps, sticker_budget, highpass_budget
        self.step_size, self.num_iters, self.variations = step_size, num_iters, variations
        self.focus, self.attention_lr = focus, attention_lr
        self.mask_size, self.max_size = mask_size, max_size
        self.near, self.mask_l2 = near, mask_l2
        if surrogate_noise < 0:
            raise ValueError(f"need surrogate_noise >= 0, got {surrogate_noise}")
        self.eot, self.surrogate_noise = eot, surrogate_noise
        self.mask: IdentityMask | None = None
        if mask is not None:
            self.use(mask)

    def use(self, mask: IdentityMask) -> None:
        """Apply `mask` from now on; its own budgets hold."""
        self.mask = mask
        self.eps = mask.eps

    # ------------------------------------------------------------------------------------ applying

    def cloak(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The protected images (`N x 3 x H x W` in the bounds) and each pixel's budget (`N x 1 x H x W`, `[-1, 1]`
        units; zero away from the faces). Raises `NoFaceError` naming the images without a face."""
        if self.mask is None:
            raise ValueError("no identity mask: learn one (learn) or load one (IdentityMask.load) first")
        if self.detector is None:
            raise ValueError("FaceCloak needs a face detector to place its mask")
        faces = detect(self.detector, x, self.max_size)
        missing = [i for i, found in enumerate(faces.found.tolist()) if not found]
        if missing:
            raise NoFaceError(f"no face found in image(s) {missing} of the batch", missing)
        maps = torch.cat([self.mask.delta, self.mask.budget]).to(x.device, torch.float32)
        protected = x.float().clone()
        budget = torch.zeros((len(x), 1, *x.shape[-2:]), device=x.device)
        prints = footprints(faces, self.mask.size, x.shape[-2:])
        for k in sorted({k for k, _, _ in prints}):  # work on the window around the image's faces only
            mine = [(window, matrix) for i, window, matrix in prints if i == k]
            y0, x0 = min(w[0] for w, _ in mine), min(w[2] for w, _ in mine)
            y1, x1 = max(w[1] for w, _ in mine), max(w[3] for w, _ in mine)
            delta, limit = maps.new_zeros((3, y1 - y0, x1 - x0)), maps.new_zeros((1, y1 - y0, x1 - x0))
            for (a, b, c, d), matrix in mine:
                warped, inside = warp_window(maps, matrix, (a, b, c, d)), (..., slice(a - y0, b - y0),
                                                                            slice(c - x0, d - x0))
                delta[inside] += warped[:3]
                limit[inside] = torch.maximum(limit[inside], warped[3:])
            window = (k, slice(None), slice(y0, y1), slice(x0, x1))
            protected[window] = (protected[window] + _clip(delta, limit)).clamp(*self.bounds)  # clip: overlaps
            budget[window] = limit
        return protected.to(x.dtype), budget

    def perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        return self.cloak(x)[0]

    def protect(self, x: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask warped onto every face of `x` and each pixel's budget (see `cloak`); no randomness."""
        return self.cloak(x)

    # ------------------------------------------------------------------------------------ learning

    def learn(self, photos: Sequence[torch.Tensor], gallery: Sequence[torch.Tensor],
              generator: torch.Generator | None = None) -> IdentityMask:
        """Learn the mask of the person in `photos` (each `1 x 3 x H x W` in `[-1, 1]`, any size; the largest face
        of each is the person) against `gallery` (photos of other people, for the near and far anchors), use it
        from now on and return it. Photos without a face are left out (`info["no_face"]` lists their positions);
        raises `NoFaceError` if none has one."""
        if self.face is None:
            raise ValueError("learning a mask needs face models (face=...)")
        start = time.perf_counter()
        with frozen(*self.modules()), torch.no_grad():
            views, no_face = self._views(photos)
            if not views:
                raise NoFaceError("no face found in any of the photos to learn from", no_face)
            anchors = self._anchors(views, gallery)
            budget = self._budget(views)
        with frozen(*self.modules()):
            delta, history = self._optimise(views, anchors, budget, generator)
        budgets = {"base": self.base_budget}
        if "stickers" in self.focus:
            budgets["stickers"] = self.sticker_budget
        if "highpass" in self.focus:
            budgets["highpass"] = self.highpass_budget
        info = {"method": self.name, "size": self.mask_size, "models": getattr(self.face, "name", ""),
                "combine": getattr(self.face, "combine", "mean"), "budgets": budgets, "focus": list(self.focus),
                "photos": len(views), "no_face": no_face, "variations": self.variations,
                "passes": self.num_iters, "step_size": self.step_size, "attention_lr": self.attention_lr,
                "near": self.near, "mask_l2": self.mask_l2,
                "anchors": anchors["chosen"], "loss": history,
                "seconds": round(time.perf_counter() - start, 2)}
        mask = IdentityMask(delta.detach().cpu(), budget.cpu(), info)
        self.use(mask)
        return mask

    def _views(self, photos: Sequence[torch.Tensor]) -> tuple[list[_View], list[int]]:
        """Each photo with a face as a canvas: the face at `CANVAS_SCALE` times the template's scale, with room."""
        views, no_face = [], []
        device = next(self.face.parameters()).device
        scale = CANVAS_SCALE * self.mask_size / 112
        side = round(CANVAS_ROOM * 112 * scale)
        offset = (side - 112 * scale) / 2
        for i, photo in enumerate(photos):
            photo = photo.to(device, torch.float32)
            faces = detect(self.detector, photo, self.max_size)
            if not faces.found.all():
                no_face.append(i)
                continue
            points = faces.landmarks[0].double().cpu().numpy()
            matrix = arcface_matrix(points, (112, 112))
            zoom = scale * math.hypot(*matrix[:, 0])  # photo pixels -> canvas pixels
            if zoom < 1:  # shrink the photo first, antialiased, so that the canvas is not aliased
                height, width = photo.shape[-2:]
                photo = shrink(photo, scaled_size(height, width, zoom))
                sx, sy = photo.shape[-1] / width, photo.shape[-2] / height
                points = (points + 0.5) * np.array([sx, sy]) - 0.5
                matrix = arcface_matrix(points, (112, 112))
            to_canvas = np.vstack([matrix * scale, [0, 0, 1]])
            to_canvas[:2, 2] += offset
            canvas = warp_affine(photo, torch.from_numpy(to_canvas[:2])[None], (side, side), padding="border")
            landmarks = torch.from_numpy(points @ to_canvas[:2, :2].T + to_canvas[:2, 2]).float()
            box = faces.boxes[0].double().cpu().numpy().reshape(2, 2)
            if zoom < 1:
                box = (box + 0.5) * np.array([sx, sy]) - 0.5
            box = _transform_box(box, to_canvas[:2])
            views.append(_View(canvas, landmarks, box))
        return views, no_face

    def _anchors(self, views: list[_View], gallery: Sequence[torch.Tensor]) -> dict:
        """Per face model: the gallery faces nearest to and farthest from the person's mean clean embedding (with
        `near="self"`, the near anchor is that mean embedding itself)."""
        device = views[0].canvas.device
        own = [torch.cat([m.embed(v.canvas, v.faces)[0] for v in views]) for m in members(self.face)]
        embedded = [[] for _ in own]
        for image in gallery:
            image = image.to(device, torch.float32)
            faces = detect(self.detector, image, self.max_size)
            if not faces.found.any():
                continue
            first = Faces(faces.index[:1], faces.boxes[:1], faces.landmarks[:1], 1)
            for k, m in enumerate(members(self.face)):
                embedded[k].append(m.embed(image, first)[0])
        if len(embedded[0]) < 2:
            raise ValueError(f"the gallery needs faces of at least two other people; found {len(embedded[0])}")
        out: dict = {"near": [], "far": [], "chosen": {}}
        for m, mine, others in zip(members(self.face), own, embedded):
            person = F.normalize(mine.mean(dim=0), dim=0)
            others = torch.cat(others)
            similarity = others @ person
            near, far = int(similarity.argmax()), int(similarity.argmin())
            out["near"].append(person if self.near == "self" else others[near])
            out["far"].append(others[far])
            out["chosen"][getattr(m, "name", "") or f"model{len(out['chosen'])}"] = {
                "near": "self" if self.near == "self" else near, "far": far,
                "near_similarity": 1.0 if self.near == "self" else round(float(similarity[near]), 4),
                "far_similarity": round(float(similarity[far]), 4)}
        return out

    def _budget(self, views: list[_View]) -> torch.Tensor:
        """The per-pixel budget map of the aligned face (`1 x S x S`)."""
        size = self.mask_size
        budget = torch.full((1, size, size), float(self.base_budget))
        if "stickers" in self.focus:
            budget = torch.where(sticker_regions(size), torch.clamp_min(budget, self.sticker_budget), budget)
        if "highpass" in self.focus:
            aligned = torch.cat([warp_affine(v.canvas + 1, mask_matrices(v.faces, size), (size, size)) - 1
                                 for v in views])
            budget = torch.where(highpass_regions(aligned.cpu()), torch.clamp_min(budget, self.highpass_budget), budget)
        return budget

    def loss(self, delta: torch.Tensor, view: _View, anchors: dict,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """FaceCloak's triplet loss (lower is better protected) of the mask `delta` placed on one view; the masked
        view goes through `eot` (the way photos are shared) and each model is a perturbed copy (`surrogate_noise`)
        where those are on, drawn from `generator`."""
        faces = view.faces
        y = (view.canvas + warp_onto(delta, faces, view.canvas.shape[-2:])).clamp(*self.bounds)
        if self.eot is not None:
            y = self.eot(y, generator)
        values = []
        for k, m in enumerate(members(self.face)):
            weights = m.embedder.noisy_weights(self.surrogate_noise, generator) if self.surrogate_noise else None
            e = m.embed(y, faces, weights=weights)[0][0]
            value = e @ anchors["near"][k] - e @ anchors["far"][k]
            values.append(value)
        values = torch.stack(values)
        return values.max() if getattr(self.face, "combine", "mean") == "max" else values.mean()

    def _optimise(self, views: list[_View], anchors: dict, budget: torch.Tensor,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, list[float]]:
        device = views[0].canvas.device
        budget = budget.to(device)
        shape = (3, self.mask_size, self.mask_size)
        start = uniform_noise(torch.empty((1, *shape)), -1.0, 1.0, generator)[0].to(device)
        radius = budget if not self.mask_l2 else budget.clamp_max(self.mask_l2 / math.sqrt(math.prod(shape)))
        delta = start * radius
        attention = torch.ones(shape, device=device) if "attention" in self.focus else None
        history = []
        bar = tqdm(total=self.num_iters * len(views) * (1 + self.variations), desc=self.name, leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        for _ in range(self.num_iters):
            total = 0.0
            for view in views:
                for v in range(1 + self.variations):
                    sample = view if v == 0 else vary(view, generator)
                    leaves = [delta.detach().requires_grad_(True)]
                    if attention is not None:
                        leaves.append(attention.detach().requires_grad_(True))
                        effective = self._project(leaves[1] * leaves[0], budget)
                    else:
                        effective = leaves[0]
                    value = self.loss(effective, sample, anchors, generator)
                    grads = torch.autograd.grad(value, leaves)
                    delta = self._project(delta - self._step(grads[0]), budget)
                    if attention is not None:
                        g = grads[1]
                        attention = attention - self.attention_lr * (g - g.mean()) / (g.std() + 0.01)
                    total += value.item()
                    bar.update(1)
                    bar.set_postfix(loss=f"{value.item():.3f}")
            history.append(round(total / (len(views) * (1 + self.variations)), 4))
        bar.close()
        final = self._project(attention * delta, budget) if attention is not None else delta
        return final.detach(), history

    def _step(self, grad: torch.Tensor) -> torch.Tensor:
        if self.mask_l2:
            return self.mask_l2 * L2_STEP * grad / grad.norm().clamp_min(1e-12)
        return self.step_size * grad.sign()

    def _project(self, delta: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """Clip to the per-pixel budget, then (`mask_l2`) shorten to the L2 length: shortening keeps the clip."""
        delta = _clip(delta, budget)
        if self.mask_l2:
            delta = delta * (self.mask_l2 / delta.norm().clamp_min(1e-12)).clamp_max(1.0)
        return delta


def _clip(delta: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(delta, budget), -budget)


def _transform_box(box: np.ndarray, matrix: np.ndarray) -> torch.Tensor:
    """The axis-aligned box around a box's corners (`2 x 2`: x0 y0, x1 y1) moved by a 2 x 3 matrix."""
    (x0, y0), (x1, y1) = box
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]]) @ matrix.T
    return torch.tensor([*corners.min(axis=0), *corners.max(axis=0)], dtype=torch.float32)


@torch.no_grad()
def vary(view: _View, generator: torch.Generator | None) -> _View:
    """A synthetic variation of a view: another pose (the landmarks follow), lighting and colour, and one time in
    three a blur, one in three a JPEG round trip."""
    side = view.canvas.shape[-1]
    matrix = POSE.matrix(generator, side, side)
    canvas = warp_affine(view.canvas, torch.from_numpy(matrix)[None], (side, side), padding="border")
    canvas = COLOUR(LIGHT(canvas, generator), generator)
    choice = _draw((0.0, 3.0), generator)
    if choice < 1:
        canvas = BLUR(canvas, generator)
    elif choice < 2:
        canvas = CODEC(canvas, generator)
    landmarks = view.landmarks.double() @ torch.from_numpy(matrix[:, :2]).T + torch.from_numpy(matrix[:, 2])
    box = view.box.double().numpy().reshape(2, 2)
    return _View(canvas, landmarks.float(), _transform_box(box, matrix))
