"""FaceCloak on real models, offline: are new photos of a person, protected by a mask learned once, still identified?

    python -m evaluation.benchmarks.facecloak --output runs/facecloak [--results evaluation/results/facecloak.md]

For each person of a labelled folder (default: FACELOCK_ASSETS/faces; faces-holdout/ is refused), every photo is cut
to a square around the face. The person's first photo (by name) is the one a FaceCloak mask is learned from (against
the other people's photos as the gallery of anchors); the person's other photos are the probes, protected by
main_defend.py with each method: none, uniform noise at the same budget, FaceLock per photo (`--preset small`),
FaceCloak with each focusing option (`--mask` of the learned mask) and learned against an ensemble (the attacked
model and `--ensemble`), with an L2 bound on the mask (`--mask_l2`, each pixel capped at 0.25, 31 levels of 255;
with the paper's near anchor, and with the person's own face as the near anchor), learned through the way photos are
shared with randomly perturbed copies of the face models (`facecloak-share`, `facecloak-ensemble-share`: `--eot share
--surrogate_noise 0.05`), and FaceCloak plus FaceLock (the mask at half the budget, FaceLock on top at the other
half). Each probe is then identified among the clean photos of every person (its own clean photo left out) by a
held-out face model and by the attacked one: top-1, top-5 and verification PSR at the threshold giving a 1 %
false-accept rate on the clean photos (`evaluation/eval_psr.py`).
Also reported: the held-out model's similarity between each probe and its clean photo, and between its TAESD round
trip and its clean photo (protection of edits), the perturbation's L-infinity, PSNR and SSIM, the seconds to learn
a mask, and the seconds to apply a saved mask to a full-size photo (detection included, models loaded). Everything
lands in `--output`, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from methods.facecloak import FaceCloak, IdentityMask
from methods.models.autoencoder import as_autoencoder
from methods.models.faces import FaceDetector
from methods.models.loading import ASSETS_ENV, load_autoencoder
from methods.pipeline.options import MAX_BUDGET, flags, resolve
from methods.pipeline.protect import MASK_FILE, protect_folder
from utils import (
    UserError,
    atomic_write,
    load_image,
    pick_device,
    pil_to_tensor,
    run_script,
    save_png,
    write_csv,
    write_json,
)

from ..calibration import default_faces, labelled_photos
from ..metrics.base import nanmean
from ..metrics.facial import FaceSimilarity
from ..metrics.psnr import psnr
from ..metrics.psr import Probes, face_models, load_gallery, score_probes, summarise
from ..metrics.ssim import ssim
from ..report import grid
from .crops import face_crop
from .results import write_results

#: Method label -> extra main_defend.py options ("none" is the unprotected photo; facecloak methods learn a mask).
METHODS = {
    "none": None,
    "noise": ["--defend_method", "noise"],
    "facelock": ["--defend_method", "facelock", "--preset", "small"],
    "facecloak": ["--focus", "none"],
    "facecloak-stickers": ["--focus", "stickers"],
    "facecloak-highpass": ["--focus", "highpass"],
    "facecloak-attention": ["--focus", "attention"],
    "facecloak-ensemble": ["--focus", "none"],  # the attacked model and --ensemble together
    "facecloak-l2": ["--focus", "none"],  # --mask_l2, each pixel capped at the scripts' largest budget
    "facecloak-l2-self": ["--focus", "none", "--near", "self"],  # the same, pushing the face away from itself
    "facecloak+facelock": ["--focus", "none"],  # mask at half the budget, then FaceLock at the other half
    # learned through the way photos are shared, with randomly perturbed copies of the face models (issue 27)
    "facecloak-share": ["--focus", "none", "--eot", "share", "--surrogate_noise", "0.05"],
    "facecloak-ensemble-share": ["--focus", "none", "--eot", "share", "--surrogate_noise", "0.05"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", help=f"labelled photos (labels.csv or one folder per person; default: "
                                        f"${ASSETS_ENV}/faces)")
    parser.add_argument("--output", required=True, help="folder for the crops, masks, protected photos and tables")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--size", type=int, default=256, help="side of the square face crops")
    parser.add_argument("--attack_budget", type=float, default=0.0628, help="base budget in [-1, 1] units (8/255)")
    parser.add_argument("--fr_model", default="sface", help="the face model(s) the protections attack")
    parser.add_argument("--judge", default="mobilefacenet", help="the held-out face model")
    parser.add_argument("--ensemble", default="mobileface", help="attacked with --fr_model by facecloak-ensemble")
    parser.add_argument("--mask_l2", type=float, default=16.0, help="the L2 length of the facecloak-l2 masks ([-1, 1] "
                                                                    "units, 112 px template; 16: about 35 dB on the "
                                                                    "crops)")
    parser.add_argument("--cloak_options", default="", help="more main_defend.py options for every facecloak run "
                                                            "(e.g. '--variations 16')")
    parser.add_argument("--facelock_iters", type=int, default=100, help="FaceLock iterations")
    parser.add_argument("--facelock_options", default="", help="more main_defend.py options for the FaceLock runs, "
                                                               "over --preset small's (e.g. '--input_diversity 0')")
    parser.add_argument("--vae", default="madebyollin/taesd", help="the autoencoder of FaceLock and the round trip")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="main_defend.py's --dtype for every protection (auto: "
                                                        "float32 on a CPU)")
    parser.add_argument("--results", help="also write the tables, with the machine, date and command, to this markdown "
                                          "file (evaluation/results/facecloak.md)")
    return parser


def prepare(faces: Path, output: Path, size: int) -> tuple[dict[str, str], dict[str, Path], dict[str, list[str]]]:
    """Cut every photo to a square around its face (`photos/<person>__<stem>.png`, with a labels.csv); returns each
    crop's person, each crop's original photo, and per person the photo to learn from followed by the probes."""
    photos_dir = output / "photos"
    detector = FaceDetector()
    identity, original = {}, {}
    for path, person in labelled_photos(faces):
        name = "__".join(path.relative_to(faces).with_suffix("").parts)
        target = photos_dir / f"{name}.png"
        if not target.exists():
            save_png(np.asarray(face_crop(load_image(path), size, detector)), target)
        identity[name], original[name] = person, path
    rows = "path,identity\n" + "".join(f"{name}.png,{person}\n" for name, person in sorted(identity.items()))
    atomic_write(photos_dir / "labels.csv", lambda tmp: tmp.write_text(rows))
    people: dict[str, list[str]] = {}
    for name in sorted(identity):
        people.setdefault(identity[name], []).append(name)
    return identity, original, {p: names for p, names in people.items() if len(names) > 1}


def folder_of(output: Path, what: str, names: Sequence[str], photos_dir: Path) -> Path:
    """A folder holding copies of the crops `names` (main_defend.py protects whole folders)."""
    folder = output / "sets" / what
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for name in names:
            shutil.copyfile(photos_dir / f"{name}.png", folder / f"{name}.png")
    return folder


def defend(image_dir: Path, out: Path, options: list[str], args: argparse.Namespace, budget: float) -> Path:
    """Protect a folder as main_defend.py would with these command-line options (`--defend_method` among them), at
    `budget`; returns the folder of protected photos."""
    method = options[options.index("--defend_method") + 1]
    given = flags(options, method)
    chosen = resolve(method, **{**given, "attack_budget": budget, "seed": args.seed, "device": args.device,
                                "dtype": args.dtype, "max_size": 0})
    protect_folder(chosen, image_dir, out, say=print)
    return out / f"budget_{budget}"


def protect(method: str, args: argparse.Namespace, output: Path, people: dict[str, list[str]],
            photos_dir: Path) -> tuple[dict[str, Path], list[Path], dict[str, Path]]:
    """Protect every probe with `method`; returns the protected probes by name, the masks learned and the photos
    they were learned from, protected by their own mask (FaceCloak alone)."""
    probes = [name for names in people.values() for name in names[1:]]
    if METHODS[method] is None:
        return {name: photos_dir / f"{name}.png" for name in probes}, [], {}
    facelock = ["--defend_method", "facelock", "--preset", "small", "--num_iters", str(args.facelock_iters),
                "--vae", args.vae, "--fr_model", args.fr_model, "--region", "full",  # the crops are the face's square
                *args.facelock_options.split()]
    if not method.startswith("facecloak"):
        options = facelock if method == "facelock" else METHODS[method]
        folder = defend(folder_of(output, "probes", probes, photos_dir), output / "protected" / method, options,
                        args, args.attack_budget)
        return {name: folder / f"{name}.png" for name in probes}, [], {}
    budget = round(args.attack_budget / 2, 4) if method == "facecloak+facelock" else args.attack_budget
    models = f"{args.fr_model},{args.ensemble}" if method.startswith("facecloak-ensemble") else args.fr_model
    cloak = ["--defend_method", "facecloak", "--fr_model", models, *METHODS[method], *args.cloak_options.split()]
    if method.startswith("facecloak-l2"):
        budget, cloak = MAX_BUDGET, [*cloak, "--mask_l2", str(args.mask_l2)]
    protected, masks, learned_from = {}, [], {}
    for person, names in people.items():
        others = [n for p, ns in people.items() if p != person for n in ns]
        gallery = folder_of(output, f"gallery_without_{person}", others, photos_dir)
        learned = defend(folder_of(output, f"learn_{person}", names[:1], photos_dir),
                         output / "masks" / method / person, [*cloak, "--gallery", str(gallery)], args, budget)
        mask = learned / MASK_FILE
        folder = defend(folder_of(output, f"probes_{person}", names[1:], photos_dir),
                        output / "protected" / method / person, [*cloak, "--mask", str(mask)], args, budget)
        if method == "facecloak+facelock":
            folder = defend(folder, output / "protected" / method / f"{person}+facelock", facelock, args, budget)
        else:
            learned_from[names[0]] = learned / f"{names[0]}.png"
        protected.update({name: folder / f"{name}.png" for name in names[1:]})
        masks.append(mask)
    return protected, masks, learned_from


@torch.no_grad()
def apply_seconds(masks: list[Path], people: dict[str, list[str]], original: dict[str, Path],
                  device: torch.device) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds to apply each person's saved mask to each of their full-size probe photos
    (detection included, at main_defend.py's default --max_size; the detector is loaded and warmed up first). On CUDA
    the clock stops once the device has finished."""
    cloak = FaceCloak(detector=FaceDetector())
    wall, cpu = [], []

    def finished() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for mask, names in zip(masks, people.values()):
        cloak.use(IdentityMask.load(mask))
        cloak.cloak(pil_to_tensor(load_image(original[names[0]])).to(device))  # warm-up
        for name in names[1:]:
            x = pil_to_tensor(load_image(original[name])).to(device)
            finished()
            start, start_cpu = time.perf_counter(), time.process_time()
            cloak.cloak(x)
            finished()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    faces = Path(args.faces) if args.faces else default_faces()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserError(f"unknown method: {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    output, device = Path(args.output), pick_device(args.device)

    identity, original, people = prepare(faces, output, args.size)
    photos_dir = output / "photos"
    print(f"{len(identity)} photos of {len(set(identity.values()))} people from {faces}; {len(people)} people with a "
          f"photo to learn from and {sum(len(n) - 1 for n in people.values())} probes")

    protected, learned, learned_from = {}, {}, {}
    for method in methods:
        protected[method], learned[method], learned_from[method] = protect(method, args, output, people, photos_dir)

    models, detector = face_models(f"{args.judge},{args.fr_model.split(',')[0]}", device)
    if len(models) != 2:
        raise UserError("--judge must be another face model than the attacked one")
    judged, attacked = models  # by the models' own names
    gallery, _ = load_gallery(photos_dir, models, detector)
    probes = Probes(gallery, models, detector)
    autoencoder = as_autoencoder(load_autoencoder(args.vae, "", device, torch.float32))
    judge = FaceSimilarity(models[judged])
    names = sorted(protected[methods[0]])
    clean = torch.cat([pil_to_tensor(load_image(photos_dir / f"{n}.png")) for n in names]).to(device)
    judge.add_sources(names, clean)

    rows, per_probe = [], []
    for method in methods:
        scored = score_probes(probes, protected[method])
        per_probe += [{"method": method, **r} for r in scored]
        x = torch.cat([pil_to_tensor(load_image(protected[method][n])) for n in names]).to(device)
        with torch.no_grad():
            direct = judge.score(x, names)
            round_trip = judge.score(autoencoder(x).float().clamp(-1, 1), names)
        learn = [IdentityMask.load(m).info["seconds"] for m in learned[method]]
        apply, apply_cpu = apply_seconds(learned[method], people, original, device) if learned[method] else ([], [])
        seconds = per_photo_seconds(method, output) + (statistics.median(apply) if apply else 0.0)
        own = summarise(score_probes(probes, learned_from[method]), method, list(models)) if learned_from[method] \
            else []
        row = {"method": method, **{f"{r['model']}_{kind}": r[kind] for r in summarise(scored, method, list(models))
                                    for kind in ("top1", "top5", "verification")},
               "fr": nanmean(direct.tolist()), "round_trip_fr": nanmean(round_trip.tolist()),
               "linf_255": float(((x - clean).abs().flatten(1).max(dim=1).values * 127.5).round().max()),
               "psnr": nanmean([v for v in psnr(x, clean).tolist() if not math.isinf(v)]),
               "ssim": nanmean(ssim(x, clean).tolist()),
               "seconds_per_photo": seconds, "seconds_to_apply_max": max(apply) if apply else float("nan"),
               "cpu_seconds_to_apply": statistics.median(apply_cpu) if apply_cpu else float("nan"),
               "seconds_to_learn": statistics.mean(learn) if learn else float("nan"),
               **{f"learned_from_{r['model']}_top1": r["top1"] for r in own}}
        rows.append(row)
        print(f"  {method:>20}: held-out top-1 PSR {row[f'{judged}_top1']:.0%}", flush=True)
    write_csv(rows, output / "facecloak.csv")
    write_csv(per_probe, output / "facecloak_per_probe.csv")
    write_json({"parameters": vars(args), "probes": names, "thresholds": gallery.thresholds},
               output / "benchmark.json")
    shown = names[:4]
    sheet = grid(["photo", *methods[1:]], [(n, [protected[m][n] for m in methods]) for n in shown], size=160)
    atomic_write(output / "grid.png", lambda tmp: sheet.save(tmp, format="PNG"))
    text = report(rows, args, judged, attacked, gallery, len(names))
    atomic_write(output / "facecloak.md", lambda tmp: tmp.write_text(text))
    if args.results:
        write_results(args.results, "FaceCloak: one mask per person", text, "evaluation.benchmarks.facecloak", argv,
                      [device])
    print(text)
    print(f"tables, CSV and grid in {output}")
    return 0


def per_photo_seconds(method: str, output: Path) -> float:
    """Mean seconds per probe of the method's per-photo optimisation (noise, FaceLock, the FaceLock stage of
    facecloak+facelock), from main_defend.py's manifests; 0 for applying a mask, timed apart."""
    pattern = "*+facelock/budget_*/manifest.json" if "+" in method else "budget_*/manifest.json"
    seconds = [e["seconds"] for manifest in sorted((output / "protected" / method).glob(pattern))
               for e in json.loads(manifest.read_text())["outputs"].values()]
    return statistics.mean(seconds) if seconds else 0.0


def report(rows: list[dict], args: argparse.Namespace, judge: str, attacked: str, gallery, probes: int) -> str:
    def pct(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.0%}"

    def num(v: float, digits: int) -> str:
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"

    lines = [f"{probes} probes (new photos), each identified among {len(gallery.keys) - 1} clean photos of "
             f"{len(set(gallery.identities))} people (its own left out); attacked: {args.fr_model}, held out: "
             f"{judge}; base budget {args.attack_budget} ({args.attack_budget * 127.5:.1f}/255). PSR: share of "
             f"probes protected (higher is stronger); verification at FAR 1 % (thresholds "
             f"{', '.join(f'{m} {t:.3f}' for m, t in gallery.thresholds.items())}).", "",
             f"| method | {judge} top-1 ↑ | {judge} top-5 ↑ | {judge} verif. ↑ | {attacked} top-1 ↑ | "
             f"{attacked} top-5 ↑ | {attacked} verif. ↑ | photo learned from: top-1 {judge} / {attacked} ↑ | "
             f"FR ({judge}) ↓ | round trip FR ({judge}) ↓ | L-inf (/255) | PSNR (dB) | SSIM | s to learn a mask | "
             "s / photo |", "|---|" + "---|" * 14]
    for r in rows:
        own = " / ".join(pct(r.get(f"learned_from_{m}_top1", float("nan"))) for m in (judge, attacked))
        lines.append(
            f"| {r['method']} | {pct(r[f'{judge}_top1'])} | {pct(r[f'{judge}_top5'])} | "
            f"{pct(r[f'{judge}_verification'])} | {pct(r[f'{attacked}_top1'])} | {pct(r[f'{attacked}_top5'])} | "
            f"{pct(r[f'{attacked}_verification'])} | {own} | {num(r['fr'], 3)} | {num(r['round_trip_fr'], 3)} | "
            f"{r['linf_255']:.0f} | {num(r['psnr'], 1)} | {num(r['ssim'], 3)} | {num(r['seconds_to_learn'], 0)} | "
            f"{num(r['seconds_per_photo'], 2)}" + ("" if math.isnan(r["seconds_to_apply_max"]) or "+" in r["method"]
                                                  else f" (max {r['seconds_to_apply_max']:.2f})") + " |")
    applied = [r for r in rows if not math.isnan(r["cpu_seconds_to_apply"])]
    if applied:
        lines += ["", "s / photo of FaceCloak: applying a saved mask to the full-size photo (median, detection "
                      "included, models loaded); CPU seconds (median): "
                      + ", ".join(f"{r['method']} {r['cpu_seconds_to_apply']:.2f}" for r in applied) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
