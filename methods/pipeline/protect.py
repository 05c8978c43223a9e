"""Protecting photos: the attack built from the options with its models, where each photo is attacked, the attack
itself and the perturbation pasted back in 8 bits within the budget; and FaceCloak's identity masks, learned and
loaded.

`Protector` is what every front end uses (defend.py, main_defend.py, the page): the attack of one set of options, its
models loaded once, protecting photos alone or in batches. What differs between methods is declared by the method
(`Attack.placement`, `Attack.learns`, `Attack.protect`), never decided here by its name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

import methods
from methods.base import L2_STEP
from methods.facecloak import IdentityMask
from methods.models import loading
from methods.models.downloads import sha256_of
from methods.models.faces import FaceDetector, NoFaceError
from methods.progress import progress_bar
from methods.registry import accepted_options
from methods.transforms import EditorView, eot_transform
from utils import (
    InputError,
    ModelUnavailable,
    UserError,
    atomic_write,
    cpu_generator,
    derive_seed,
    list_images,
    load_image,
    loaded_batches,
    pick_dtype,
    pil_to_tensor,
    same_file,
    save_png,
)

from .options import MAX_BUDGET, ProtectionOptions, budget_in_255, l2_limit
from .photos import output_names, photos_under
from .placement import Placement, budget_levels, distances, face_region, paste, place, quantize_within, work_image
from .runs import BackgroundWriter, BatchRun, check_writable, prefetched

logger = logging.getLogger(__name__)

#: Compiled graphs kept per network: one per size bucket (and batch size) of a folder, compiled once and reused.
COMPILED_SHAPES = 64


def configure_backends(options: ProtectionOptions) -> None:
    """torch's global switches for --cudnn_benchmark and --deterministic."""
    if options.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = bool(options.cudnn_benchmark) and not options.deterministic


def compile_models(components: dict) -> None:
    """torch.compile the networks that do the work: the autoencoder's encoder and decoder, the editor's UNet, the
    face network and LPIPS' backbone. Shapes are static; each new size bucket is compiled once and kept (up to
    `COMPILED_SHAPES`)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILED_SHAPES)
    networks = []
    if "autoencoder" in components:
        networks += [components["autoencoder"].encoder, components["autoencoder"].decoder]
    if "editor" in components:
        networks.append(components["editor"].unet)
    if components.get("face") is not None:
        networks += components["face"].networks()
    if components.get("perceptual") is not None:
        networks.append(components["perceptual"].lpips.net)
    for network in networks:
        network.compile(dynamic=False)


def load_attacked_editor(options: ProtectionOptions, device: torch.device) -> torch.nn.Module:
    """The editing pipeline of --target_model/--model_id (its autoencoder replaced by --vae, if given), loaded as
    edit.py loads it, for the methods that run the editor itself."""
    from methods.diffusion import DiffusionEditor

    return DiffusionEditor(loading.load_editor(options.target_model, options.model_id, device, dtype=options.dtype,
                                               vae=options.vae, progress=False))


#: The levers a method takes only if it says so (its constructor names them): flag, option, the value that is off.
LEVERS = (("--eot", "eot", None), ("--momentum", "momentum", 0.0), ("--input_diversity", "input_diversity", 0.0),
          ("--ti_kernel", "ti_kernel", 0), ("--norm l2", "norm", "linf"), ("--chroma", "chroma", 1.0),
          ("--smooth_perturbation", "smooth_perturbation", 0), ("--dct_keep", "dct_keep", 0),
          ("--flat_budget", "flat_budget", 1.0),
          ("--surrogate_noise", "surrogate_noise", 0.0), ("--landmark_jitter", "landmark_jitter", 0.0),
          ("--antialias", "antialias", False), ("--feature_weight", "feature_weight", 0.0))


def build_attack(options: ProtectionOptions, device: torch.device, progress: bool = True) -> methods.Attack:
    """Load the models the chosen method needs and build it from the options."""
    cls = methods.get_method(options.defend_method)
    refused = [flag for flag, name, on in LEVERS if getattr(options, name) != on and name not in accepted_options(cls)]
    if refused:
        takers = [n for n, c in methods.METHODS.items()
                  if all(name in accepted_options(c) for flag, name, _ in LEVERS if flag in refused)]
        pgd = [n for n, c in methods.METHODS.items() if issubclass(c, methods.PGDAttack)]
        kind = "the PGD methods" if takers == pgd else "the methods"
        raise UserError(f"{' and '.join(refused)} work(s) with {kind} ({', '.join(takers)}), not "
                        f"{options.defend_method}")
    dtype = pick_dtype(options.dtype, device)
    components = {}
    if "autoencoder" in cls.models:
        components["autoencoder"] = loading.load_autoencoder(options.vae, options.model_id, device, dtype)
    if "face" in cls.models and not options.mask:  # an identity mask made earlier needs only the detector
        components["face"] = loading.load_face_identity(options.fr_model, device, keep=options.faces,
                                                        combine=options.fr_combine)
    if "editor" in cls.models:
        components["editor"] = load_attacked_editor(options, device)
    if "perceptual" in cls.models:
        components["perceptual"] = loading.load_perceptual(options.lpips, device)
    memory_format = torch.channels_last if options.memory_format == "channels_last" else torch.contiguous_format
    for model in components.values():
        if model is not None:
            model.to(memory_format=memory_format)
    if options.vae_tiling and ("autoencoder" in components or "editor" in components):
        autoencoder = components["autoencoder"] if "autoencoder" in components else components["editor"].autoencoder.vae
        autoencoder.enable_tiling()
    if options.compile:
        compile_models(components)
    o = options
    return methods.create(
        o.defend_method, **components, eps=o.attack_budget, step_size=o.step_size, num_iters=o.num_iters,
        targeted=o.targeted, c=o.c, lr=o.lr, allow_no_face=o.allow_no_face, target_fr=o.target_fr,
        progress=progress, eot=eot_transform(o.eot.split(",")) if o.eot else None, eot_samples=o.eot_samples,
        momentum=o.momentum, input_diversity=o.input_diversity, ti_kernel=o.ti_kernel, schedule=o.schedule,
        norm=o.norm, chroma=o.chroma, smooth_perturbation=o.smooth_perturbation, dct_keep=o.dct_keep,
        flat_budget=o.flat_budget,
        surrogate_noise=o.surrogate_noise, landmark_jitter=o.landmark_jitter, antialias=o.antialias,
        feature_weight=o.feature_weight,
        fidelity_weight=o.fidelity_weight,
        steps=o.diffusion_steps, grad_reps=o.grad_reps,
        guidance_scale=o.guidance_scale, image_guidance_scale=o.image_guidance_scale, strength=o.strength,
        prompt=o.attack_prompt, gradient_checkpointing=o.gradient_checkpointing,
        detector=FaceDetector(keep=o.faces), mask=load_mask(o.mask) if o.mask else None, focus=o.focus_list,
        sticker_budget=o.sticker_budget, highpass_budget=o.highpass_budget, variations=o.variations,
        mask_size=o.mask_size, max_size=o.max_size, near=o.near, mask_l2=o.mask_l2,
    )


def describe_attack(options: ProtectionOptions, attack: methods.Attack) -> str:
    """One line: the method, its budget and steps, the levers on, and the models it attacks."""
    o = options
    parts = [f"{o.defend_method}: budget {budget_in_255(o.attack_budget, o.norm)}"]
    if attack.learns:  # applying a mask has no steps; learning one takes passes over the photos
        l2 = f"mask L2 {o.mask_l2} (steps {o.mask_l2 * L2_STEP:g})" if o.mask_l2 else f"step {o.step_size}"
        parts.append(f"mask {o.mask}" if o.mask else f"{l2}, {o.num_iters} passes, focus {o.focus}, near "
                     f"{o.near}, {o.variations} variations per photo, gallery {o.gallery}")
    else:
        if hasattr(attack, "step_size"):
            parts.append(f"step {o.step_size}")
        if hasattr(attack, "num_iters"):
            parts.append(f"{o.num_iters} iterations")
    if getattr(attack, "eot", None) is not None:
        parts.append(f"EOT over {o.eot} ({o.eot_samples} per step)")
    levers = [f"{name} {value}" for name, value in (("momentum", o.momentum), ("DI", o.input_diversity),
                                                     ("TI kernel", o.ti_kernel)) if value]
    levers += [f"{name} {value}" for name, value, off in (
        ("chroma", o.chroma, 1.0), ("smoothed", o.smooth_perturbation, 0), ("DCT kept below", o.dct_keep, 0),
        ("flat budget", o.flat_budget, 1.0),
        ("surrogate noise", o.surrogate_noise, 0.0), ("landmark jitter", o.landmark_jitter, 0.0),
        ("antialiased faces", o.antialias, False), ("feature weight", o.feature_weight, 0.0)) if value != off]
    if levers:
        parts.append(", ".join(levers))
    if "autoencoder" in attack.models:
        parts.append(f"autoencoder {o.vae or o.model_id + ' (vae)'}")
    if "editor" in attack.models:
        swapped = f" with autoencoder {o.vae}" if o.vae else ""
        parts.append(f"editor {o.target_model} {o.model_id}{swapped}, {attack.steps} steps unrolled, "
                     f"{attack.grad_reps} generations per step")
    if getattr(attack, "face", None) is not None:
        parts.append(f"face model {o.fr_model}" + (f" ({o.fr_combine})" if "," in o.fr_model else ""))
    if "perceptual" in attack.models:
        parts.append(f"LPIPS {o.lpips}")
    return ", ".join(parts)


def placements(images: Sequence[Image.Image], options: ProtectionOptions, attack: methods.Attack
               ) -> list[Placement]:
    """Where each image is attacked (`--region`), at what size (`--max_size`) and padding (`--bucket`), as the
    method declares (`Attack.placement`): a "region" method is attacked in the square around the face(s) with
    --region face (found with the attack's own detector where it has one; an image without a face is attacked whole,
    and FaceLock then refuses it unless --allow_no_face), or whole; a "photo" method (FaceCloak's mask) goes onto
    the whole photo at its own size."""
    if attack.placement == "photo":
        return [place(image.size, None, 0, options.bucket) for image in images]
    detector = None
    if options.region == "face":
        face = getattr(attack, "face", None)
        detector = face.detector if face is not None else FaceDetector(keep=options.faces)
    view = detector is not None and isinstance(attack, methods.PGDAttack)
    result = []
    for image in images:
        box = face_region(image, detector) if detector is not None else None
        result.append(place(image.size, box, options.max_size, options.bucket, view=view and box is not None))
    return result


def budget_problem(attack: methods.Attack, placement: Placement) -> str | None:
    """Why the attack's budget cannot be used on this work image (an L2 budget longer than the largest change the
    image can take), in a few words; None where it can."""
    if attack.norm == "l2" and attack.eps > l2_limit(*placement.work):
        return (f"the L2 budget {attack.eps} is longer than this photo's work image ({placement.work[0]}x"
                f"{placement.work[1]}) can take ({l2_limit(*placement.work):.1f}: {MAX_BUDGET} on every pixel)")
    return None


def protect_images(attack: methods.Attack, images: Sequence[Image.Image], seeds: Sequence[int],
                   device: torch.device, where: Sequence[Placement]) -> list[tuple[np.ndarray, dict]]:
    """Protect images whose placements share one padded size, in one batch; each image's random start comes from
    its own seed. Returns the 8-bit protected images and their statistics (L-infinity in 1/255, PSNR in dB,
    seconds). A method that gives a per-pixel budget map with its result (`Attack.protect`: FaceCloak) is rounded
    within that map, on the whole photo; the others are pasted back into their region within their budget."""
    start = time.perf_counter()
    for placement in where:
        problem = budget_problem(attack, placement)
        if problem:
            raise UserError(f"{problem}; lower --attack_budget")
    x = torch.cat([work_image(image, placement) for image, placement in zip(images, where)]).to(device)
    if any(placement.seen is not None for placement in where):
        attack.view = EditorView([p.work for p in where], [p.seen or p.work for p in where])
    try:
        protected, budgets = attack.protect(x, [cpu_generator(s) for s in seeds])
    finally:
        attack.view = None
    results = []
    for k, (image, placement, seed) in enumerate(zip(images, where, seeds)):
        if budgets is None:
            out, stats = _pasted(attack, image, placement, protected[k] - x[k])
        else:
            out, stats = _within_map(attack, image, protected[k], budgets[k])
        results.append((out, {"seed": seed, **stats, "region": list(placement.box)}))
    seconds = (time.perf_counter() - start) / len(images)
    return [(out, {**stats, "seconds": round(seconds, 3)}) for out, stats in results]


def _pasted(attack: methods.Attack, image: Image.Image, placement: Placement, change: torch.Tensor
            ) -> tuple[np.ndarray, dict]:
    out, stats = paste(image, placement, change, attack.eps, attack.norm)
    if attack.norm == "linf" and stats["linf_255"] > attack.eps * 127.5:
        raise AssertionError(f"budget broken after rounding: {stats['linf_255']}/255 > {attack.eps * 127.5:.2f}/255")
    if attack.norm == "l2" and stats["l2"] > attack.eps + 1e-6:
        raise AssertionError(f"budget broken after rounding: L2 {stats['l2']} > {attack.eps}")
    return out, {"linf_255": stats["linf_255"], "l2": round(stats["l2"], 4), "psnr": round(stats["psnr"], 3)}


def _within_map(attack: methods.Attack, image: Image.Image, adv: torch.Tensor, budget: torch.Tensor
                ) -> tuple[np.ndarray, dict]:
    """`adv` (the whole photo, never scaled) in 8 bits, each pixel within its own budget (the warp of the mask's
    budget map), checked after rounding."""
    width, height = image.size
    clean, eps = np.asarray(image), budget[:, :height, :width].permute(1, 2, 0).cpu().numpy()
    out = quantize_within(adv[:, :height, :width], clean, eps)
    stats = distances(out, clean)
    if stats["linf_255"] > attack.eps * 127.5 or (np.abs(out.astype(np.int64) - clean) > budget_levels(eps)).any():
        raise AssertionError(f"budget broken after rounding: {stats['linf_255']}/255 > {attack.eps * 127.5:.2f}/255 "
                             f"or above the mask's budget map")
    return out, {"linf_255": stats["linf_255"], "psnr": round(stats["psnr"], 3)}


class Protector:
    """The protection of one set of options with its models loaded once: `protect(images, seeds)` protects photos
    (of one padded size when more than one) and returns each as 8 bits with its statistics."""

    def __init__(self, options: ProtectionOptions, device: torch.device, progress: bool = True) -> None:
        self.options, self.device = options, device
        self.attack = build_attack(options, device, progress=progress)

    def describe(self) -> str:
        return describe_attack(self.options, self.attack)

    def notes(self) -> list[str]:
        """What a user should know about this protection before it runs."""
        if "perceptual" in self.attack.models and self.attack.perceptual is None:
            return ["LPIPS term off (--lpips none): facelock runs with its face-recognition and latent terms only"]
        return []

    def placements(self, images: Sequence[Image.Image]) -> list[Placement]:
        return placements(images, self.options, self.attack)

    def protect(self, images: Sequence[Image.Image], seeds: Sequence[int],
                where: Sequence[Placement] | None = None) -> list[tuple[np.ndarray, dict]]:
        where = self.placements(images) if where is None else where
        return protect_images(self.attack, images, seeds, self.device, where)


# ------------------------------------------------------------------------------------------ identity masks

def load_mask(path: str | Path) -> IdentityMask:
    try:
        return IdentityMask.load(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--mask {path}: not an identity mask ({str(error).splitlines()[0]})") from None


def mask_provenance(mask: IdentityMask, path: Path) -> dict:
    """What the manifest records of the mask a folder was protected with."""
    return {"path": str(path), "sha256": sha256_of(path), **mask.info}


def saved_mask_note(provenance: dict) -> str:
    """What a script says once a mask is learned and saved."""
    path = provenance["path"]
    return (f"mask saved to {path} ({provenance['seconds']:.1f} s; triplet loss per pass {provenance['loss']}); "
            f"protect new photos of this person with --defend_method facecloak --mask {path}")


def learn_mask(options: ProtectionOptions, attack: methods.Attack, sources: Sequence[Path], path: Path) -> dict:
    """Learn the identity mask of the person in `sources` against `--gallery` (every photo under it), save it to
    `path` (atomically) and return its provenance for the manifest. Files that cannot be read or show no face are
    left out and named."""
    if not options.gallery:
        raise UserError("facecloak learns a mask against photos of other people: pass --gallery DIR (or apply a "
                        "mask learned earlier with --mask)")
    left_out = {}

    def readable(paths: Sequence[Path]):
        for source in paths:
            try:
                yield pil_to_tensor(load_image(source))
            except InputError as error:
                left_out[str(source)] = str(error)

    chosen = list(sources)
    gallery = [p for p in photos_under(options.gallery) if all(p.resolve() != s.resolve() for s in chosen)]
    logger.info("learning a facecloak mask from %d photo(s) against %d gallery photos (%d passes, %d variations "
                "per photo)", len(chosen), len(gallery), options.num_iters, options.variations)
    photos, synthetic = readable(chosen), []
    if options.arc2face:
        photos = list(photos)
        synthetic = synthetic_photos(options, attack, photos)
    mask = attack.learn([*photos, *synthetic] if synthetic else photos, readable(gallery),
                        cpu_generator(derive_seed(options.seed, "facecloak")))
    used = [s for s in chosen if str(s) not in left_out]
    for i in mask.info["no_face"]:
        if i < len(used):  # the others are synthetic
            left_out[str(used[i])] = "no face found"
    mask.info.update(learned_from=[str(s) for s in used if str(s) not in left_out], gallery=str(options.gallery),
                     left_out=left_out, synthetic=len(synthetic))
    atomic_write(path, mask.save)
    return mask_provenance(mask, path)


def synthetic_photos(options: ProtectionOptions, attack: methods.Attack, photos: list[torch.Tensor]
                     ) -> list[torch.Tensor]:
    """`--arc2face` new photos of the person per photo, generated by Arc2Face from the hub."""
    device = next(attack.face.parameters()).device
    try:
        arc2face = loading.load_arc2face(attack.detector, device, pick_dtype(options.dtype, device))
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"cannot load Arc2Face ({str(error).splitlines()[0]}); it comes from the Hugging Face "
                               f"hub (FoivosPar/Arc2Face and Stable Diffusion 1.5): run without --arc2face offline")
    logger.info("generating %d Arc2Face photo(s) per photo", options.arc2face)
    out = []
    for k, photo in enumerate(photos):
        images = arc2face.generate(photo, options.arc2face, cpu_generator(derive_seed(options.seed, "arc2face", k)))
        out += [image[None].cpu() for image in images]
    return out


# ---------------------------------------------------------------------------------------------- a folder

#: Options that decide the result; a folder made with other values is refused.
DEFINING = ("defend_method", "preset", "attack_budget", "step_size", "num_iters", "targeted", "c", "lr", "seed",
            "target_model", "model_id", "vae", "fr_model", "fr_combine", "faces", "allow_no_face", "lpips", "target_fr",
            "eot", "eot_samples", "momentum", "input_diversity", "ti_kernel", "schedule", "max_size", "region",
            "bucket", "norm", "fidelity_weight", "diffusion_steps", "grad_reps", "guidance_scale",
            "image_guidance_scale", "strength", "attack_prompt", "mask", "gallery", "focus", "sticker_budget",
            "highpass_budget", "variations", "mask_size", "arc2face", "near", "mask_l2", "chroma",
            "smooth_perturbation", "dct_keep", "flat_budget", "surrogate_noise", "landmark_jitter", "antialias",
            "feature_weight")
#: Where a run of a method that learns (FaceCloak) keeps what it learned (the identity mask), beside the outputs.
MASK_FILE = "facecloak_mask.safetensors"


def output_folder(options: ProtectionOptions, output_dir: str | Path) -> Path:
    """Where a folder's protected photos go: `output_dir/budget_{budget}`, the layout editing and evaluation read."""
    return Path(output_dir) / f"budget_{options.attack_budget}"


def plan(sources: list[Path], folder: Path, done: Callable[[Path, Path], bool]
         ) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
    """Pair each source with its output (`photos.output_names`); returns the pairs not `done(source, output)` yet
    and the files refused."""
    pending, refused, claimed = [], {}, {}
    for source, name in output_names(sources).items():
        output = folder / name
        if output.name in claimed:
            refused[str(source)] = f"same output name as {claimed[output.name].name}"
            continue
        claimed[output.name] = source
        if done(source, output):
            continue
        pending.append((source, output))
    return pending, refused


def protect_folder(options: ProtectionOptions, image_dir: str | Path, output_dir: str | Path, batch_size: int = 1,
                   say: Callable[[str], None] = logger.info) -> int:
    """Protect every photo of `image_dir` into `output_folder(options, output_dir)`, `batch_size` same-size photos
    per forward pass, with a `manifest.json` beside them (the parameters, package versions and per photo its seed,
    distances and seconds). A rerun skips finished photos (unless `options.overwrite`); a bad file is recorded and
    named at the end without stopping the others. `torchrun` or `accelerate launch` split the photos between
    processes. `say` reports the run's progress in words (a script passes `print`). Returns the exit status: 1 if
    any photo failed."""
    image_dir, folder = Path(image_dir), output_folder(options, output_dir)
    if not image_dir.is_dir():
        raise UserError(f"--image_dir {image_dir} is not a folder")
    if same_file(image_dir, folder):
        raise UserError(f"the output folder {folder} is the input folder; choose another --output_dir")
    sources = list_images(image_dir)
    if not sources:
        raise UserError(f"no images in {image_dir}")

    check_writable(folder)
    parameters = {"image_dir": str(image_dir), "output_dir": str(output_dir), "batch_size": batch_size,
                  **dataclasses.asdict(options)}
    run = BatchRun(folder, parameters, DEFINING, options.overwrite, device=options.device)
    device = run.device
    digests = {source: sha256_of(source) for source in sources}
    # an output counts as finished once the manifest records it, made from this very input (by its SHA-256)
    pending, refused = plan(sources, folder, lambda source, output: not options.overwrite and output.exists()
                            and run.recorded(output.name, digests[source]))
    for source, reason in refused.items():
        run.fail(source, reason)
    finished = len(sources) - len(pending) - len(refused)
    mine = run.mine(pending)
    if run.is_main:
        say(f"{len(sources)} images in {image_dir}: {finished} already protected, {len(pending)} to do"
            + (f" in {run.num_processes} processes" if run.num_processes > 1 else "") + f"; output {folder}")
    configure_backends(options)
    learning = methods.get_method(options.defend_method).learns and not options.mask and bool(pending)
    protector = Protector(options, device, progress=run.is_main) if mine or (learning and run.is_main) else None
    if protector is not None and run.is_main:
        for note in protector.notes():
            say(note)
        say(f"{protector.describe()} on {device}")
    if learning or options.mask:
        run.manifest["mask"] = folder_mask(options, protector, sources, folder, run, say)

    bar = progress_bar(total=len(mine), desc="images", unit="img", disable=not run.is_main)
    unreadable: queue.SimpleQueue = queue.SimpleQueue()  # filled by the loading thread, recorded here

    def record_unreadable() -> None:
        while not unreadable.empty():
            (source, _), error = unreadable.get()
            run.fail(str(source), str(error))
            bar.update(1)

    def loaded():
        """Batches of (source, output, image, placement), loaded and placed on a background thread."""
        for batch in loaded_batches(mine, lambda item: item[0], batch_size,
                                    lambda item, error: unreadable.put((item, error))):
            where = protector.placements([image for _, image in batch])
            yield [(source, output, image, placement) for ((source, output), image), placement in zip(batch, where)]

    pools: dict[tuple, list] = {}  # images waiting for a batch, by padded work size (and editor's view)
    with BackgroundWriter() as writer:
        def protect(pool: list) -> None:
            protect_batch(protector, pool, run, writer, digests)
            writer.collect()
            record_unreadable()
            run.save()
            bar.update(len(pool))

        for batch in prefetched(loaded()):
            record_unreadable()
            for entry in batch:
                pool = pools.setdefault(entry[3].batch, [])
                pool.append(entry)
                if len(pool) == batch_size:
                    protect(pools.pop(entry[3].batch))
        for pool in pools.values():
            protect(pool)
    record_unreadable()
    bar.close()

    manifest = run.finish()
    if manifest is None:
        return 0
    protected = sum(output.exists() for _, output in pending)
    if manifest["outputs"]:
        entries = manifest["outputs"].values()
        worst = (f"L2 {max(e.get('l2', 0) for e in entries)}" if options.norm == "l2"
                 else f"L-inf {max(e['linf_255'] for e in entries)}/255")
        say(f"largest {worst} (budget {budget_in_255(options.attack_budget, options.norm)})")
    return run.report(f"protected {protected}, already done {finished}", folder, say)


def folder_mask(options: ProtectionOptions, protector: Protector | None, sources: list[Path], folder: Path,
                run: BatchRun, say: Callable[[str], None]) -> dict:
    """What a folder is protected with by a method that learns (FaceCloak's identity mask) and its provenance:
    `--mask`, or the mask learned here before (a rerun resumes with it), or one learned now from the folder's photos
    by the main process and saved beside the outputs."""
    path = Path(options.mask) if options.mask else folder / MASK_FILE
    if not options.mask and run.is_main:
        if options.overwrite or not path.exists():
            say(saved_mask_note(learn_mask(options, protector.attack, sources, path)))
        else:
            say(f"applying the mask learned for this folder before: {path}")
    run.processes.wait_for_everyone()
    mask = load_mask(path)
    if protector is not None:
        protector.attack.use(mask)
    return mask_provenance(mask, path)


def protect_batch(protector: Protector, batch: list[tuple[Path, Path, Image.Image, Placement]], run: BatchRun,
                  writer: BackgroundWriter, digests: dict[Path, str]) -> None:
    """Protect one batch and hand each result to the writer, which records it (with its input's SHA-256) once
    written; record each failure. An image without a face, or one the budget does not fit, is set aside and the rest
    of the batch protected without it; any other failure of the batch is recorded for each of its images."""
    for k in reversed(range(len(batch))):
        problem = budget_problem(protector.attack, batch[k][3])
        if problem:
            run.fail(str(batch.pop(k)[0]), problem)
    while batch:
        seeds = [derive_seed(protector.options.seed, source.stem) for source, _, _, _ in batch]
        try:
            results = protector.protect([image for _, _, image, _ in batch], seeds,
                                        [placement for _, _, _, placement in batch])
        except NoFaceError as error:
            for i in sorted(error.missing, reverse=True):
                run.fail(str(batch.pop(i)[0]), f"no face found ({protector.attack.no_face_hint})")
            continue
        except RuntimeError as error:  # e.g. out of memory on a large photo
            logger.exception("protecting %s failed", ", ".join(str(s) for s, _, _, _ in batch))
            for source, _, _, _ in batch:
                run.fail(str(source), f"{type(error).__name__}: {str(error).splitlines()[0]}")
            return
        for (source, output, _, _), (protected, stats) in zip(batch, results):
            entry = {"source": str(source), "sha256": digests[source], **stats}
            writer.submit(lambda protected=protected, output=output: save_png(protected, output),
                          lambda output=output, entry=entry: run.record(output.name, entry))
        return
