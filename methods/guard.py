"""Flux-Guard: the user's own edit comes out already protected against face recognition.

Flux-Guard (Wang et al., "Flow-Guided Adversarial Face Editing for Postable Social Photo Privacy", official code
https://github.com/JLMWang/Flux-Guard) protects an edit while it is being made: a clean denoising trajectory runs
beside a protected one, and at each of the last `steps` denoising steps the protected latent is optimised with a
fresh Adam for `iterations` iterations (gradients through the decoder only), minimising

    w_id * L_id + perceptual_weight * L_p,    w_id = clamp(0.05 + 0.95 / (1 + exp(20 (L_p - 0.3))), 0.05, 1)

where `L_p` is a perceptual distance between the protected decode and the clean trajectory's decode at the same
step, and `L_id` an identity loss on the protected decode. The protected trajectory then goes on denoising from the
optimised latent.

Threat model: face recognition of the edited photo. Dodging (default): `L_id` is the face model's cosine
similarity between the decode's face and the source photo's face, pushed down. Impersonation (`target` given):
`L_id = 1 - cos` to the target photo's face, pulled up. Faces are found by the project's detector (on the clean
edit, or on the source where the edit has none) and aligned by the differentiable 5-point warp of
`methods.models.faces`, with any face model or a `FaceEnsemble`. The protected decode is kept within `eps` of the clean
edit (`[-1, 1]` units; L-infinity, or with `norm="l2"` the L2 length of each image's whole change): the identity
loss sees the decode brought into that budget, and the output is projected onto it after decoding (the caller
rounds it to 8 bits without leaving it, `methods.pipeline.placement.quantize_within`).

Beyond the paper, `refine` PGD steps on the pixels follow the latent optimisation (`IdentityRefinement`, on the
project's attack engine with momentum and input diversity): on the decoded edit, within the same budget. A latent
change must pass through the decoder and is then clipped to the budget, which wastes most of it; steps on the
pixels use the whole budget (measured in evaluation/results/guard.md: held-out similarity lower at the same budget).

Range: images `N x 3 x H x W` in `[-1, 1]`; latents in the editor's own (scaled) latent space. Defaults: 5 steps x
10 Adam iterations at lr 0.02, perceptual weight 0.5 (as the paper), eps 0.03 (as the project's defenses), no
pixel steps (`edit.py` runs 100).

Example::

    guard = IdentityGuard(load_face_identity("sface", device), load_vgg19_features(), refine=100)
    edit = guarded_edit(pipe, guard, sources, prompt=[prompt], image=[photo], generator=[generator])
    edit.clean      # exactly the unprotected edit (its 8-bit values), N x 3 x H x W in [-1, 1]
    edit.protected  # within eps of it; guard.report(edit.clean, rounded, edit.identity) gives the similarities
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import L2_STEP, NORMS, PGDAttack, budget_limit, frozen, project
from .models.autoencoder import as_autoencoder
from .models.faces import EnsembleReference, FaceReference, Faces, NoFaceError
from .randomness import Generators

#: The pixel stage's transfer levers (`PGDAttack` options), chosen by `evaluation.benchmarks.guard`
#: (evaluation/results/guard.md).
REFINEMENT = dict(momentum=1.0, input_diversity=0.7)


def adaptive_weight(perceptual_loss: torch.Tensor) -> torch.Tensor:
    """Flux-Guard's weight of the identity loss: near 1 while the perceptual loss is below 0.3, falling to 0.05
    above it."""
    return (0.05 + 0.95 * torch.sigmoid(-20 * (perceptual_loss - 0.3))).clamp(0.05, 1.0)


def _members(reference: Any) -> list[FaceReference]:
    return list(reference.members) if isinstance(reference, EnsembleReference) else [reference]


def _with_embeddings(positions: Any, embeddings: list[torch.Tensor]) -> Any:
    """`positions` (a face reference: where to crop) holding other embeddings (whom to compare with)."""
    members = [FaceReference(p.faces, p.matrices, e) for p, e in zip(_members(positions), embeddings)]
    return EnsembleReference(positions.faces, members) if isinstance(positions, EnsembleReference) else members[0]


def _one_face_each(faces: Faces) -> dict[int, tuple]:
    """Image index -> (box, landmarks) of its first (largest) face."""
    out: dict[int, tuple] = {}
    for k, i in enumerate(faces.index.tolist()):
        if i not in out:
            out[i] = (faces.boxes[k], faces.landmarks[k])
    return out


def _scaled(box: torch.Tensor, landmarks: torch.Tensor, sx: float, sy: float) -> tuple:
    """A face's box and landmarks in an image resized by (sx, sy)."""
    scale = torch.tensor([sx, sy], dtype=box.dtype, device=box.device)
    return box * scale.repeat(2), landmarks * scale


def _faces(chosen: list[tuple]) -> Faces:
    return Faces(index=torch.arange(len(chosen), device=chosen[0][0].device),
                 boxes=torch.stack([box for box, _ in chosen]), landmarks=torch.stack([pts for _, pts in chosen]),
                 count=len(chosen))


@dataclass
class Identity:
    """Whose face the guard works on: `source` compares with the source photos' faces, `goal` with the faces the
    loss is about (the sources when dodging, the target when impersonating); both crop the edit where its face is."""

    source: Any
    goal: Any
    impersonate: bool
    face_from_edit: list[bool]  # per image: face found on the clean edit (else the source's position is used)


class IdentityRefinement(PGDAttack):
    """The guard's last stage, in pixels: projected steps (sign steps; L2: along the normalised gradient) on the
    decoded protected edit against the identity loss, within the guard's budget around the clean edit (the images
    this attack is called with), starting from the latent stage's decode `start_from` instead of a random point.
    Momentum and input diversity (the engine's transfer levers) make the change carry over to face models the guard
    never saw. Not a protection of its own: `IdentityGuard.refine` runs it."""

    name = "guard refinement"
    models = ("face",)

    def __init__(self, guard: "IdentityGuard", identity: Identity, start_from: torch.Tensor, **options) -> None:
        super().__init__(eps=guard.eps, norm=guard.norm, progress=guard.progress, **options)
        self.face, self.guard, self.identity, self.start_from = guard.face, guard, identity, start_from

    def start(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        return self.project(self.start_from.detach().float(), x)

    def objective(self, x_adv: torch.Tensor, reference: None, i: int) -> torch.Tensor:
        return -self.guard.identity_loss(x_adv, self.identity)


class IdentityGuard:
    """The latent optimisation of Flux-Guard, independent of any pipeline (see `guarded_edit` for diffusers).

    Models:
        face: a `methods.models.faces.FaceIdentity` or `FaceEnsemble` (anything with `detector`, `reference(x, faces)`
            and `face(y, reference)` giving one similarity per image, differentiable in `y`).
        perceptual: has `reference(x)` and `perceptual(y, reference)` giving one distance per image (e.g.
            `methods.models.perceptual.VGGFeatureDistance`, the paper's, or `LPIPSDistance`), or None: then `L_p = 0`
            and the budget alone keeps the protected edit close to the clean one.
    """

    def __init__(self, face: nn.Module, perceptual: nn.Module | None = None, eps: float = 0.03, steps: int = 5,
                 iterations: int = 10, lr: float = 0.02, perceptual_weight: float = 0.5, norm: str = "linf",
                 refine: int = 0, refinement: dict | None = None, progress: bool = False) -> None:
        if norm not in NORMS or not 0 < eps <= budget_limit(norm) or steps < 1 or iterations < 0 or lr < 0 \
                or perceptual_weight < 0 or refine < 0:
            raise ValueError(f"need norm in {NORMS}, eps in (0, 2] (L2: > 0), steps >= 1, iterations >= 0, lr >= 0, "
                             f"perceptual_weight >= 0 and refine >= 0, got {norm!r}, {eps}, {steps}, {iterations}, "
                             f"{lr}, {perceptual_weight} and {refine}")
        self.face, self.perceptual = face, perceptual
        self.eps, self.norm, self.steps, self.iterations, self.lr = eps, norm, steps, iterations, lr
        self.perceptual_weight = perceptual_weight
        self.refine_iterations = refine
        self.refinement = dict(REFINEMENT if refinement is None else refinement)
        self.progress = progress

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.face, self.perceptual) if isinstance(m, nn.Module)]

    @property
    def model_names(self) -> list[str]:
        return getattr(self.face, "name", "").split(",")

    @torch.no_grad()
    def source_faces(self, sources: torch.Tensor) -> dict[int, tuple]:
        """The largest face of every source photo (image index -> box, landmarks); raises `NoFaceError` naming the
        photos without one. Cheap: run it before the edit."""
        found = _one_face_each(self.face.detector(sources))
        missing = [i for i in range(len(sources)) if i not in found]
        if missing:
            raise NoFaceError(f"no face found in source image(s) {missing}", missing)
        return found

    @torch.no_grad()
    def identity(self, sources: torch.Tensor, cleans: torch.Tensor, target: torch.Tensor | None = None,
                 found: dict[int, tuple] | None = None) -> Identity:
        """The faces the guard works on: the source photos' (whose identity is protected; `found` if they were
        already detected by `source_faces`), the clean edits' (where the protected edits are cropped; the source's
        position, rescaled, where an edit shows none) and the target's. Raises `NoFaceError` for a source (or
        target) without a face."""
        found = self.source_faces(sources) if found is None else found
        sx, sy = cleans.shape[-1] / sources.shape[-1], cleans.shape[-2] / sources.shape[-2]
        in_edit = _one_face_each(self.face.detector(cleans))
        chosen = [in_edit[i] if i in in_edit else _scaled(*found[i], sx, sy) for i in range(len(cleans))]
        positions = self.face.reference(cleans, _faces(chosen))
        source = self.face.reference(sources, _faces([found[i] for i in range(len(sources))]))
        source = _with_embeddings(positions, [m.embeddings for m in _members(source)])
        goal = source
        if target is not None:
            wanted = self.face.reference(target[:1])
            if not bool(wanted.found.all()):
                raise NoFaceError("no face found in the target photo", [0])
            rows = torch.zeros(len(sources), dtype=torch.long, device=sources.device)
            goal = _with_embeddings(positions, [m.embeddings[:1][rows] for m in _members(wanted)])
        return Identity(source, goal, target is not None, [i in in_edit for i in range(len(cleans))])

    def identity_loss(self, images: torch.Tensor, identity: Identity) -> torch.Tensor:
        """Per image: the similarity to the source face (dodging) or 1 - the similarity to the target's."""
        similarity = self.face(images, identity.goal).float()
        return 1 - similarity if identity.impersonate else similarity

    @torch.no_grad()
    def similarities(self, images: torch.Tensor, reference: Any) -> dict[str, list[float]]:
        """Per face model of the guard, per image: the cosine similarity of the face in `images` to `reference`'s
        faces (`identity.source` or `identity.goal`)."""
        if hasattr(self.face, "per_model"):
            values = self.face.per_model(images, reference)
        else:
            values = self.face(images, reference)[None]
        return {name: row.tolist() for name, row in zip(self.model_names, values.float().cpu())}

    def report(self, cleans: torch.Tensor, protected: torch.Tensor, identity: Identity) -> list[dict]:
        """Per image, what the guard achieved by its own face model(s): the similarity of the clean and of the
        protected edit to the source face (and of the protected edit to the target's, when impersonating)."""
        before, after = self.similarities(cleans, identity.source), self.similarities(protected, identity.source)
        goal = self.similarities(protected, identity.goal) if identity.impersonate else {}
        records = []
        for i in range(len(cleans)):
            record = {"similarity_clean": {m: v[i] for m, v in before.items()},
                      "similarity_protected": {m: v[i] for m, v in after.items()},
                      "face_from_edit": identity.face_from_edit[i]}
            if goal:
                record["target_similarity_protected"] = {m: v[i] for m, v in goal.items()}
            records.append(record)
        return records

    def bound(self, images: torch.Tensor, cleans: torch.Tensor) -> torch.Tensor:
        """`images` brought into the budget around the clean edits (and into `[-1, 1]`)."""
        return project(images.float(), cleans.float(), self.eps, (-1.0, 1.0), self.norm)

    def refine(self, protected: torch.Tensor, cleans: torch.Tensor, identity: Identity,
               generator: Generators = None) -> torch.Tensor:
        """The pixel stage after the latent one: `refine` steps of `IdentityRefinement` from the bounded decode
        `protected`, within the budget around `cleans` (input diversity draws from `generator`, one per image).
        With `refine` 0, `protected` as it is."""
        if not self.refine_iterations:
            return protected
        step = self.eps / 3 if self.norm == "linf" else self.eps * L2_STEP
        attack = IdentityRefinement(self, identity, protected, step_size=step, num_iters=self.refine_iterations,
                                    **self.refinement)
        return attack(cleans.float(), generator)

    def optimise(self, latents: torch.Tensor, clean: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                 identity: Identity) -> tuple[torch.Tensor, dict]:
        """One denoising step's optimisation: a fresh Adam on the latents for `iterations` iterations.

        `clean` is the clean trajectory's decode at this step (the perceptual reference and the centre of the
        budget the identity loss sees); `decode` maps latents to `[-1, 1]` images differentiably. Returns the
        optimised latents (detached, in the input's dtype) and the last iteration's losses and weight.
        """
        reference = self.perceptual.reference(clean) if self.perceptual is not None else None
        z = latents.detach().float().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=self.lr)
        stats: dict = {}
        for _ in range(self.iterations):
            decoded = decode(z).float()
            if self.perceptual is not None:
                perceptual = self.perceptual(decoded, reference).float()
            else:
                perceptual = decoded.new_zeros(len(decoded))
            weight = adaptive_weight(perceptual.detach())
            identity_loss = self.identity_loss(self.bound(decoded, clean), identity)
            loss = weight * identity_loss + self.perceptual_weight * perceptual
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimiser.step()
            stats = {"identity_loss": identity_loss.tolist(), "perceptual_loss": perceptual.tolist(),
                     "identity_weight": weight.tolist()}
        return z.detach().to(latents.dtype), stats

    def protect(self, trajectory: list[torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                identity: Identity, advance: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict]:
        """The protected trajectory beside the clean one, whose latents after each of the last steps are
        `trajectory`: it starts at `trajectory[0]`, `advance(z, j)` denoises it into step `j` (from 1 on; None: a
        no-op editor, whose latent stays), and after every step its latent is optimised against the clean decode
        of that step. Returns the final protected latents and the last optimisation's losses and weights."""
        z, stats = trajectory[0], {}
        for j, clean_latents in enumerate(tqdm(trajectory, desc="protecting", leave=False, disable=not self.progress)):
            with torch.no_grad():
                if j > 0 and advance is not None:
                    z = advance(z, j)
                clean = decode(clean_latents)
            z, stats = self.optimise(z, clean, decode, identity)
        return z, stats


# --------------------------------------------------------------------------------------------- diffusers

@dataclass
class GuardedEdit:
    """The result of `guarded_edit` (`N x 3 x H x W` in `[-1, 1]`): `clean`, the pipeline's own edit (exactly its
    8-bit output), and `protected`, within the budget of it but not yet rounded to 8 bits; with the faces used,
    the number of protected steps and the last optimisation's losses and weights per image."""

    clean: torch.Tensor
    protected: torch.Tensor
    identity: Identity
    steps: int
    stats: dict = field(default_factory=dict)


class _Recorder:
    """A `callback_on_step_end` that keeps the clean trajectory's last `steps` latents and, after the first of
    them, the scheduler, the generators' states and the conditioning, so that the protected trajectory can branch
    off there and replay the remaining steps with the same noise."""

    def __init__(self, steps: int, generators: list[torch.Generator]) -> None:
        self.steps, self.generators = steps, generators
        self.latents: list[torch.Tensor] = []
        self.timesteps: list = []
        self.scheduler = None
        self.states: list = []
        self.conditioning: dict[str, torch.Tensor] = {}

    def __call__(self, pipe, i: int, t, tensors: dict) -> dict:
        first = max(pipe.num_timesteps - self.steps, 0)
        if i >= first:
            self.latents.append(tensors["latents"].detach().clone())
            self.timesteps.append(t)
        if i == first:
            self.scheduler = copy.deepcopy(pipe.scheduler)
            self.states = [g.get_state() for g in self.generators]
            self.conditioning = {k: v.detach().clone() for k, v in tensors.items() if k != "latents"}
        return {}

    def restored_generators(self) -> list[torch.Generator]:
        return [torch.Generator(g.device).set_state(state) for g, state in zip(self.generators, self.states)]


def _pix2pix_noise(pipe, scheduler, latents: torch.Tensor, t, conditioning: dict) -> torch.Tensor:
    """InstructPix2Pix's guided noise prediction (3-way guidance: text, image, neither), as in its pipeline."""
    cfg = pipe.do_classifier_free_guidance
    x = scheduler.scale_model_input(torch.cat([latents] * 3) if cfg else latents, t)
    x = torch.cat([x, conditioning["image_latents"]], dim=1)
    noise = pipe.unet(x, t, encoder_hidden_states=conditioning["prompt_embeds"], return_dict=False)[0]
    if cfg:
        text, image, uncond = noise.chunk(3)
        noise = uncond + pipe.guidance_scale * (text - image) + pipe.image_guidance_scale * (image - uncond)
    return noise


def _img2img_noise(pipe, scheduler, latents: torch.Tensor, t, conditioning: dict) -> torch.Tensor:
    """Stable Diffusion img2img's guided noise prediction, as in its pipeline."""
    cfg = pipe.do_classifier_free_guidance
    x = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
    noise = pipe.unet(x, t, encoder_hidden_states=conditioning["prompt_embeds"],
                      cross_attention_kwargs=pipe.cross_attention_kwargs, return_dict=False)[0]
    if cfg:
        uncond, text = noise.chunk(2)
        noise = uncond + pipe.guidance_scale * (text - uncond)
    return noise


def _denoiser(pipe) -> tuple[Callable, list[str]]:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    if isinstance(pipe, StableDiffusionInstructPix2PixPipeline):
        return _pix2pix_noise, ["latents", "prompt_embeds", "image_latents"]
    if isinstance(pipe, StableDiffusionImg2ImgPipeline):
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("protected editing does not support UNets with guidance embeddings (LCM)")
        return _img2img_noise, ["latents", "prompt_embeds"]
    raise ValueError(f"protected editing supports InstructPix2Pix and Stable Diffusion img2img, not "
                     f"{type(pipe).__name__}")


def guarded_edit(pipe, guard: IdentityGuard, sources: torch.Tensor, target: torch.Tensor | None = None,
                 **options: Any) -> GuardedEdit:
    """Edit with `pipe(**options)` (one batch; `generator` a list with one generator per image) and protect the
    result with `guard`.

    The pipeline runs unchanged, so the clean edit is exactly the normal edit; a callback records its last
    `guard.steps` latents. The protected trajectory branches off at the first of them and replays the remaining
    steps with the pipeline's own guidance, scheduler state and noise (the generators' states restored), its
    latent optimised by `guard` after each step. `sources` are the photos being edited (`N x 3 x h x w` in
    `[-1, 1]`, any size): whose faces are protected; `target` a photo to impersonate.
    """
    denoise, inputs = _denoiser(pipe)
    generators = options.get("generator")
    generators = list(generators) if isinstance(generators, (list, tuple)) else [generators]
    if len(generators) != len(sources) or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError("guarded_edit needs one torch.Generator per image (generator=[...]), so that the protected "
                         "trajectory replays the clean one's noise")
    recorder = _Recorder(guard.steps, generators)
    sources = sources.to(pipe._execution_device)
    target = None if target is None else target.to(sources.device)
    found = guard.source_faces(sources)
    with torch.no_grad():
        images = pipe(**options, output_type="pt", callback_on_step_end=recorder,
                      callback_on_step_end_tensor_inputs=inputs).images
    # the 8-bit image the pipeline's default PIL output holds, back in [-1, 1]
    cleans = (images.float().clamp(0, 1) * 255).round() / 127.5 - 1
    autoencoder = as_autoencoder(pipe.vae)
    scaling = pipe.vae.config.scaling_factor

    def decode(z: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(z / scaling).float().clamp(-1, 1)

    with frozen(autoencoder, *guard.modules()):
        identity = guard.identity(sources, cleans, target, found)
        scheduler, generators = recorder.scheduler, recorder.restored_generators()
        step_options = pipe.prepare_extra_step_kwargs(generators, 0.0)

        def advance(z: torch.Tensor, j: int) -> torch.Tensor:
            t, z = recorder.timesteps[j], z.to(recorder.latents[j].dtype)
            noise = denoise(pipe, scheduler, z, t, recorder.conditioning)
            return scheduler.step(noise, t, z, **step_options, return_dict=False)[0]

        z, stats = guard.protect(recorder.latents, decode, identity, advance)
        with torch.no_grad():
            protected = guard.bound(decode(z), cleans)
    protected = guard.refine(protected, cleans, identity, generators)
    return GuardedEdit(cleans, protected, identity, len(recorder.latents), stats)
