"""Does protected editing (Flux-Guard, `edit.py --protect_identity`) hide the face from a face model it never saw?

    python -m evaluation.benchmarks.guard --output runs/guard [--results evaluation/results/guard.md]

No diffusion editor runs offline, so the edit is a stand-in: the TAESD autoencoder decodes the photo's own latent
(a no-op edit), and the guard optimises that latent during the last `--steps` "steps" (with nothing to denoise in
between) as it does a real editor's. Every photo of FACELOCK_ASSETS/faces (faces-holdout/ is refused) is cut to a
square around its face; the guard works against `--fr_model` within `--budgets` of the clean decode; the held-out
`--judge`, whose threshold at `--far` is calibrated on the same labelled photos (`evaluation.calibration`), scores
the face in the clean decode, in the protected one and in a control (the clean decode plus random signs at the
full budget) against the photo's. Reported per row: the judge's mean similarity and protection success rate (the
fraction at or below its threshold), the attacked models' mean similarity, PSNR and L-infinity against the clean
decode, and seconds per photo; as a markdown table (also printed), a CSV and the images.

`--editor` also times protected edits by a real InstructPix2Pix pipeline (hub id or folder) at `--editor_size`:
seconds per protected and per plain edit and the peak memory (of the GPU on CUDA), which is how the GPU figures of
evaluation/results/guard.md are measured.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from methods.base import frozen
from methods.guard import REFINEMENT
from methods.models.autoencoder import as_autoencoder
from methods.models.faces import FaceDetector
from methods.models.loading import ASSETS_ENV, load_autoencoder, load_face_identity
from methods.pipeline.editing import (
    EDIT_DEFAULTS,
    EditOptions,
    edit_images,
    load_editor,
    load_guard,
    protect_edit_images,
    resolve_edit,
)
from methods.pipeline.placement import budget_levels, quantize_within, round_within_l2
from utils import (
    PAPER_PROMPTS,
    UserError,
    atomic_write,
    derive_seed,
    linf_255,
    load_image,
    pick_device,
    pil_to_tensor,
    run_script,
    save_png,
    tensor_to_uint8,
    write_csv,
    write_json,
)

from ..calibration import calibrate, default_faces, labelled_photos
from ..metrics.base import nanmean
from ..metrics.facial import FaceSimilarity
from ..metrics.psnr import psnr
from .crops import face_crop
from .results import write_results
from .timing import PeakMemory, machine, synchronize


def noop_protect(guard, autoencoder, photo: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The no-op edit of `photo` (`1 x 3 x H x W` in `[-1, 1]`, sides a multiple of 8) by `autoencoder`, and its
    protected version: the clean decode of the photo's latent and the guard's decode of the optimised latent,
    refined in pixels (drawing from `generator`), both 8-bit, with the guard's record (its own models'
    similarities, losses and weights)."""
    autoencoder = as_autoencoder(autoencoder)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(z).float().clamp(-1, 1)

    with frozen(autoencoder, *guard.modules()):
        with torch.no_grad():
            latents = autoencoder.encode(photo)
            clean8 = tensor_to_uint8(decode(latents))
        clean = pil_to_tensor(Image.fromarray(clean8)).to(photo.device)
        identity = guard.identity(photo, clean)
        latents, stats = guard.protect([latents] * guard.steps, decode, identity)
        with torch.no_grad():
            protected = guard.bound(decode(latents), clean)
        protected8 = quantize_within(guard.refine(protected, clean, identity, generator), clean8, guard.eps, guard.norm)
        protected = pil_to_tensor(Image.fromarray(protected8)).to(photo.device)
        record = guard.report(clean, protected, identity)[0]
    return clean8, protected8, {**record, **{k: v[0] for k, v in stats.items()}}


def random_signs(clean8: np.ndarray, eps: float, seed: int, norm: str = "linf") -> np.ndarray:
    """The control: every pixel moved by the whole budget (in 8-bit levels) with a random sign; with `norm="l2"`,
    by the same amount everywhere, the change as long as the budget allows."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=clean8.shape)
    if norm == "l2":
        return round_within_l2(signs * eps * 127.5 / math.sqrt(clean8.size), clean8, eps * 127.5)
    return np.clip(clean8.astype(np.int64) + signs.astype(np.int64) * int(budget_levels(eps)), 0, 255).astype(np.uint8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", help=f"labelled face photos (default: ${ASSETS_ENV}/faces)")
    parser.add_argument("--output", required=True, help="folder for the photos, decodes, tables")
    parser.add_argument("--size", type=int, default=256, help="side of the square face crops (a multiple of 8)")
    parser.add_argument("--vae", default="madebyollin/taesd", help="the autoencoder whose decoder stands in")
    parser.add_argument("--fr_model", default="sface,mobileface", help="the face model(s) the guard works against")
    parser.add_argument("--fr_combine", default="mean", choices=["mean", "max"], help="how the guard combines them")
    parser.add_argument("--judge", default="mobilefacenet", help="the held-out face model judging the results")
    parser.add_argument("--far", type=float, default=0.01, help="false-accept rate of the judge's threshold")
    parser.add_argument("--budgets", default="0.03", help="comma-separated budgets, [-1, 1] units")
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"],
                        help="budgets per pixel (linf) or as the length of the whole change (l2)")
    parser.add_argument("--steps", type=int, default=5, help="protected steps")
    parser.add_argument("--iterations", type=int, default=10,
                        help="Adam iterations per step (0: the pixel steps alone)")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    parser.add_argument("--refine", type=int, default=EDIT_DEFAULTS["guard_refine"],
                        help="PGD steps on the pixels after the latent optimisation (0: none)")
    parser.add_argument("--momentum", type=float, default=REFINEMENT["momentum"], help="the pixel steps' momentum")
    parser.add_argument("--input_diversity", type=float, default=REFINEMENT["input_diversity"],
                        help="the pixel steps' input diversity (probability)")
    parser.add_argument("--ti_kernel", type=int, default=0, help="the pixel steps' gradient smoothing (odd size)")
    parser.add_argument("--perceptual", default="none", choices=["vgg19", "lpips", "none"],
                        help="the guard's perceptual loss (none: real VGG weights are not offline)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos (0: all)")
    parser.add_argument("--editor", help="also time protected edits by this InstructPix2Pix model (id or folder)")
    parser.add_argument("--editor_size", type=int, default=512, help="photo side for --editor")
    parser.add_argument("--editor_photos", type=int, default=3, help="edits timed with --editor")
    parser.add_argument("--seed", type=int, default=0, help="seed of the control and the edits")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--results", help="also write the tables, with the machine, date and command, to this markdown "
                                          "file (evaluation/results/guard.md)")
    return parser


def guard_options(args: argparse.Namespace, budget: float, **extra) -> EditOptions:
    """The edit options of this benchmark's guard."""
    return resolve_edit(protect_identity=True, fr_model=args.fr_model, fr_combine=args.fr_combine,
                        guard_budget=budget, guard_norm=args.norm, guard_steps=args.steps,
                        guard_iterations=args.iterations, guard_lr=args.lr, guard_refine=args.refine,
                        guard_perceptual=args.perceptual, **extra)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    faces = Path(args.faces) if args.faces else default_faces()
    budgets = [float(b) for b in args.budgets.split(",") if b]
    if args.size % 8 or not budgets:
        raise UserError("--size must be a multiple of 8 and --budgets name at least one budget")
    output, device = Path(args.output), pick_device(args.device)
    labelled = labelled_photos(faces)
    photos = labelled[:args.limit or None]
    judge = load_face_identity(args.judge, device)
    threshold = calibrate(judge, labelled, args.far, device).threshold
    print(f"{len(photos)} photos from {faces} at {args.size} px; held-out judge {args.judge}: threshold "
          f"{threshold:.3f} at FAR {args.far}")

    detector, names, sources = FaceDetector(), [], []
    for path, _ in photos:
        names.append(f"{path.parent.name}__{path.stem}" if path.parent != faces else path.stem)
        sources.append(face_crop(load_image(path), args.size, detector))
        save_png(np.asarray(sources[-1]), output / "photos" / f"{names[-1]}.png")
    scorer = FaceSimilarity(judge)
    scorer.add_sources(names, torch.cat([pil_to_tensor(s) for s in sources]).to(device))
    autoencoder = load_autoencoder(args.vae, "", device, torch.float32)

    rows = []
    for budget in budgets:
        guard, _ = load_guard(guard_options(args, budget), device, progress=False)
        guard.refinement = dict(momentum=args.momentum, input_diversity=args.input_diversity, ti_kernel=args.ti_kernel)
        for k, (name, source) in enumerate(zip(names, sources)):
            start = time.perf_counter()
            generator = torch.Generator(device).manual_seed(derive_seed(args.seed, name))
            clean8, protected8, record = noop_protect(guard, autoencoder, pil_to_tensor(source).to(device), generator)
            seconds = time.perf_counter() - start
            control8 = random_signs(clean8, budget, derive_seed(args.seed, name), args.norm)
            images = {"clean": clean8, "guard": protected8, "control": control8}
            for label, image in images.items():
                save_png(image, output / f"budget_{budget}" / label / f"{name}.png")
            batch = torch.cat([pil_to_tensor(Image.fromarray(image)) for image in images.values()]).to(device)
            similarity = dict(zip(images, scorer.score(batch, [name] * 3).tolist()))
            quality = psnr(batch, batch[:1].expand_as(batch)).tolist()
            attacked = {"clean": record["similarity_clean"], "guard": record["similarity_protected"]}
            models = list(attacked["clean"])
            for j, (label, image) in enumerate(images.items()):
                score = similarity[label]
                rows.append({"budget": budget, "row": label, "photo": name, "judge_similarity": score,
                             "psr": float("nan") if math.isnan(score) else float(score <= threshold),
                             **{f"attacked_{m}": attacked.get(label, {}).get(m, float("nan")) for m in models},
                             "psnr": quality[j], "linf_255": linf_255(image, clean8),
                             "seconds": seconds if label == "guard" else 0.0})
            print(f"  budget {budget} {k + 1}/{len(names)} {name}: held-out similarity clean "
                  f"{similarity['clean']:.3f}, protected {similarity['guard']:.3f}, control "
                  f"{similarity['control']:.3f} ({seconds:.0f} s)", flush=True)
    write_csv(rows, output / "guard.csv")
    text = report(rows, args, threshold, budgets)
    if args.editor:
        text += editor_timing(args, device, sources)
    atomic_write(output / "guard.md", lambda tmp: tmp.write_text(text))
    if args.results:
        write_results(args.results, "Flux-Guard: the edit protected while it is made", text,
                      "evaluation.benchmarks.guard", argv, [device])
    write_json({"parameters": vars(args), "photos": names, "threshold": threshold}, output / "benchmark.json")
    print(text)
    return 0


def report(rows: list[dict], args: argparse.Namespace, threshold: float, budgets: list[float]) -> str:
    def cell(values: list[float], digits: int = 3) -> str:
        value = nanmean([v for v in values if not math.isinf(v)])
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"

    models = [key for key in rows[0] if key.startswith("attacked_")]
    lines = [f"Flux-Guard on a no-op edit ({args.vae} decodes the photo's latent), {len(rows) // 3 // len(budgets)} "
             f"photos at {args.size} px, against {args.fr_model} ({args.fr_combine}), {args.steps} steps x "
             f"{args.iterations} Adam iterations at lr {args.lr} then {args.refine} PGD steps on the pixels (momentum "
             f"{args.momentum}, input diversity {args.input_diversity}, TI kernel {args.ti_kernel}), budgets "
             f"{args.norm}, perceptual loss {args.perceptual}. Held-out judge "
             f"{args.judge}, threshold {threshold:.3f} at FAR {args.far}; PSR: fraction of photos at or below it "
             "(no face found: not scored).", "",
             f"| row | budget | FR {args.judge} (held out) ↓ | PSR ↑ | " +
             " | ".join(f"FR {m.removeprefix('attacked_')} (attacked) ↓" for m in models) +
             " | PSNR vs clean (dB) | L-inf (/255) | seconds / photo |",
             "|---|---|---|---|" + "---|" * len(models) + "---|---|---|"]
    titles = {"clean": "clean decode (no protection)", "guard": "protected", "control": "control: random signs"}
    for budget in budgets:
        for label, title in titles.items():
            if label == "clean" and budget != budgets[0]:
                continue
            mine = [r for r in rows if r["budget"] == budget and r["row"] == label]
            lines.append(f"| {title} | {budget if label != 'clean' else '-'} | "
                         f"{cell([r['judge_similarity'] for r in mine])} | {cell([r['psr'] for r in mine], 2)} | " +
                         " | ".join(cell([r[m] for r in mine]) for m in models) +
                         f" | {cell([r['psnr'] for r in mine], 1)} | {max(r['linf_255'] for r in mine)} | "
                         f"{cell([r['seconds'] for r in mine], 1)} |")
    for budget in budgets:
        mine = [r for r in rows if r["budget"] == budget and r["row"] == "guard"]
        below = sum(r["psr"] == 1.0 for r in mine)
        lines += ["", f"Budget {budget}: {below} of {len(mine)} protected photos fall below {args.judge}'s threshold "
                      f"(lowest PSNR {min(r['psnr'] for r in mine):.1f} dB)."]
    return "\n".join(lines) + "\n"


def editor_timing(args: argparse.Namespace, device: torch.device, sources: list[Image.Image]) -> str:
    """Seconds per protected and per plain edit by a real editor, and the peak memory of the protected ones."""
    options = guard_options(args, float(args.budgets.split(",")[0]), model_id=args.editor, max_size=0,
                            device=str(device))
    pipe = load_editor(options, device, progress=False)
    guard, _ = load_guard(options, device, progress=False)
    photos = [s.resize((args.editor_size, args.editor_size), Image.LANCZOS) for s in sources[:args.editor_photos]]
    prompt, timings = PAPER_PROMPTS[0], {"plain": [], "protected": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory = PeakMemory(device)
    for k, image in enumerate(photos):
        seed = derive_seed(args.seed, 0, k)
        for label in timings:
            synchronize(device)
            start = time.perf_counter()
            if label == "plain":
                edit_images(pipe, options, [image], prompt, [seed])
            else:
                protect_edit_images(pipe, guard, options, [image], prompt, [seed])
            synchronize(device)
            timings[label].append(time.perf_counter() - start)
    peak = memory.megabytes()
    return (f"\nReal editor {args.editor} at {args.editor_size} px, {EDIT_DEFAULTS['num_inference_steps']} steps, "
            f"{device} ({machine([device])}): {np.median(timings['protected']):.2f} s per protected edit, "
            f"{np.median(timings['plain']):.2f} s per plain edit (medians of {len(photos)}), peak memory "
            f"{peak:.0f} MB.\n")


if __name__ == "__main__":
    run_script(main)
