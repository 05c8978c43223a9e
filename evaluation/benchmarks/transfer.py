"""Does FaceLock hold against a face model it never saw? Leave-one-out over the face models, in one command.

    python -m evaluation.benchmarks.transfer --output runs/transfer [--results evaluation/results/transfer.md]

For every face model of `--models` (default: the three of the offline assets), the photos are protected by FaceLock
attacking all the others together (`--fr_model a,b`) and judged by the one left out, for each attack configuration
(`--configs`: plain PGD, the per-image maximum over the attacked models instead of their mean, momentum, input
diversity, translation invariance, their combinations, expectation over JPEG or over the way photos are shared
(`share`), the perturbation shaped for JPEG (`luma`, `smooth`, `dct`, `flat`), surrogate diversity (`sn`), landmark
jitter (`jit`), antialiased face crops (`aa`), the middle feature maps' similarity (`feat`), three times the iterations
(`long`; `200`: twice), an L2 budget, and `single`: one attacked model alone, as `--preset small` attacks, `single-...`
with the named levers). A photo counts as protected when the held-out model's similarity between it and the TAESD round
trip of its protected copy is below that model's threshold at a 1 % false-accept rate, calibrated on the same photos'
identities (a round trip in which the model finds no face counts as protected: nothing can be matched). Reported as
posted, after JPEG 75, after JPEG 50 and after a resize to 1080 px + JPEG 85 (what `evaluation.check` calls sharing),
with the similarity by the attacked models (as posted and after JPEG 75: whether the attack survives JPEG even for the
models it attacks), the perturbation's PSNR and SSIM, its change on the flat parts of the photos
(`evaluation.metrics.flat`) and the seconds per photo; `zoom_<kind>.png` shows the flattest part of the first photo
three times enlarged for every configuration. The photos are 256 px squares around each face (`crops`) and the whole
portraits at 512 px (`full`, attacked in the square around the face, `--region face`). Protected photos and the judged
rows (`judged.json`) are kept, so a rerun resumes and judges only what is new; `faces-holdout/` is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from methods.base import L2_STEP
from methods.models.autoencoder import as_autoencoder
from methods.models.downloads import sha256_of
from methods.models.faces import FaceDetector
from methods.models.loading import load_autoencoder, load_face_identity
from methods.pipeline.options import resolve
from methods.pipeline.protect import protect_folder
from utils import (
    UserError,
    atomic_write,
    cpu_generator,
    derive_seed,
    load_image,
    pick_device,
    pil_to_tensor,
    run_script,
    save_png,
    write_csv,
)

from ..calibration import calibrate, default_faces, labelled_photos
from ..cleanups import CLEANUPS
from ..metrics.base import nanmean
from ..metrics.facial import FaceSimilarity
from ..metrics.flat import flat_change
from ..metrics.psnr import psnr
from ..metrics.ssim import ssim
from ..report import grid
from .crops import face_crop, spread
from .judged import read_judged, write_judged
from .results import write_results

logger = logging.getLogger(__name__)

#: Attack configurations: protection options on top of FaceLock with the attacked ensemble.
CONFIGS = {
    "single": {},  # the first attacked model alone (so does every configuration named single-...)
    "single-di": {"input_diversity": 0.5},
    "plain": {},
    "max": {"fr_combine": "max"},  # each step attacks the attacked model that still matches best
    "mi": {"momentum": 1.0},
    "di": {"input_diversity": 0.5},
    "ti": {"ti_kernel": 5},
    "mi-di": {"momentum": 1.0, "input_diversity": 0.5},
    "mi-di-ti": {"momentum": 1.0, "input_diversity": 0.5, "ti_kernel": 5},
    "eot": {"eot": "jpeg,resize"},  # one random cleanup per step: the expectation is taken over the iterations
    "mi-di-eot": {"momentum": 1.0, "input_diversity": 0.5, "eot": "jpeg,resize"},
    "mi-di-eot2": {"momentum": 1.0, "input_diversity": 0.5, "eot": "jpeg,resize", "eot_samples": 2},
    "l2": {"norm": "l2"},  # budget --l2_budget (the L2 length of the change), step an eighth of it
    "l2-eot": {"norm": "l2", "eot": "jpeg,resize"},
    # the way photos are shared (Sharing: a resize, one or two JPEGs) and face models never attacked
    "single-di-share": {"input_diversity": 0.5, "eot": "share"},
    "single-di-share2": {"input_diversity": 0.5, "eot": "share", "eot_samples": 2},
    "single-di-share-cubic": {"input_diversity": 0.5, "eot": "share-cubic"},
    "single-di-luma": {"input_diversity": 0.5, "chroma": 0.3},
    "single-di-luma-share": {"input_diversity": 0.5, "chroma": 0.3, "eot": "share"},
    "single-di-smooth-share": {"input_diversity": 0.5, "smooth_perturbation": 3, "eot": "share"},
    "single-di-dct": {"input_diversity": 0.5, "dct_keep": 4},  # each 8 x 8 block keeps its lowest frequencies
    "single-di-dct-share": {"input_diversity": 0.5, "dct_keep": 4, "eot": "share"},
    "single-di-flat": {"input_diversity": 0.5, "flat_budget": 0.3},
    "single-di-sn": {"input_diversity": 0.5, "surrogate_noise": 0.05},
    "single-di-jit": {"input_diversity": 0.5, "landmark_jitter": 3.0},
    "single-di-sn-jit-share": {"input_diversity": 0.5, "surrogate_noise": 0.05, "landmark_jitter": 3.0,
                               "eot": "share"},
    "di-sn-jit-share": {"input_diversity": 0.5, "surrogate_noise": 0.05, "landmark_jitter": 3.0, "eot": "share"},
    "single-di-mix": {"input_diversity": 0.5, "eot": "none,share"},  # half the steps as posted, half shared
    "single-di-mix2": {"input_diversity": 0.5, "eot": "none,share", "eot_samples": 2},
    "single-di-sn-jit": {"input_diversity": 0.5, "surrogate_noise": 0.05, "landmark_jitter": 3.0},
    "single-di-sn-jit-mix": {"input_diversity": 0.5, "surrogate_noise": 0.05, "landmark_jitter": 3.0,
                             "eot": "none,share"},
    "single-di-aa": {"input_diversity": 0.5, "antialias": True},
    "single-di-aa-share": {"input_diversity": 0.5, "antialias": True, "eot": "share"},
    "single-di-feat": {"input_diversity": 0.5, "feature_weight": 1.0},  # the middle feature maps' similarity too
    "single-di-feat3": {"input_diversity": 0.5, "feature_weight": 3.0},
    "single-di-feat-mix": {"input_diversity": 0.5, "feature_weight": 1.0, "eot": "none,share"},
    # why the EOT keeps so little: today's --eot jpeg, and share with three times the iterations
    "single-di-jpeg": {"input_diversity": 0.5, "eot": "jpeg"},
    "single-di-share-long": {"input_diversity": 0.5, "eot": "share", "num_iters": 300},
    "single-di-share-200": {"input_diversity": 0.5, "eot": "share", "num_iters": 200},  # twice the time: the cap
    "single-di-200": {"input_diversity": 0.5, "num_iters": 200},  # the same iterations without the EOT
    # half the steps shared, with the iterations the EOT needs: on whole portraits the best (portraits.md)
    "single-di-mix-200": {"input_diversity": 0.5, "eot": "none,share", "num_iters": 200},
}
#: How a protected photo is judged: as posted, after JPEG 75 and 50, and resized to 1080 px + JPEG 85 (the check's).
JUDGED_CLEANUPS = ("none", "jpeg75", "jpeg50", "1080+jpeg85")
KINDS = ("crops", "full")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", help="labelled face photos (default: $FACELOCK_ASSETS/faces)")
    parser.add_argument("--output", required=True, help="folder for the photos, protected photos and tables")
    parser.add_argument("--models", default="sface,mobilefacenet,mobileface", help="face models, comma-separated")
    parser.add_argument("--held_out", help="leave out only these models (default: each in turn)")
    parser.add_argument("--configs", default="single,plain,mi-di,eot,mi-di-eot",
                        help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--kinds", default="crops,full", help="crops (256 px around the face), full (512 px portraits)")
    parser.add_argument("--photos", type=int, help="protect only this many photos, spread evenly over the sorted "
                                                   "names (for quick sweeps; thresholds still use every photo)")
    parser.add_argument("--attack_budget", type=float, default=0.03, help="L-infinity budget in [-1, 1] units")
    parser.add_argument("--l2_budget", type=float, default=8.0,
                        help="the l2 config's budget: L2 length of the whole change in [-1, 1] units (8: about the "
                             "PSNR of L-infinity 0.03 on the 256 px crops)")
    parser.add_argument("--num_iters", type=int, default=100, help="attack iterations")
    parser.add_argument("--vae", default="madebyollin/taesd", help="the surrogate autoencoder, also the 'editor'")
    parser.add_argument("--far", type=float, default=0.01, help="false-accept rate of the verdict thresholds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks and cleanups")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--batch_size", type=int, default=1, help="photos protected per forward pass (results do not "
                        "depend on it beyond float rounding; 8 on a GPU)")
    parser.add_argument("--results", help="also write the tables, with the machine, date and command, to this markdown "
                                          "file (evaluation/results/transfer.md)")
    return parser


def prepare_photos(photos: list[tuple[Path, str]], output: Path, kinds: Sequence[str]) -> dict[str, Path]:
    """The 256 px face crops and the 512 px portraits, written once."""
    detector, folders = FaceDetector(), {}
    for kind in kinds:
        folder = folders[kind] = output / "photos" / kind
        for path, person in photos:
            target = folder / f"{person}__{path.stem}.png"
            if target.exists():
                continue
            image = load_image(path)
            if kind == "crops":
                image = face_crop(image, 256, detector)
            else:
                scale = min(1.0, 512 / max(image.size))
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
            save_png(np.asarray(image), target)
    return folders


def subset(folder: Path, count: int) -> Path:
    """A folder beside `folder` holding `count` of its photos, spread evenly over their sorted names."""
    chosen = spread(sorted(folder.glob("*.png")), count)
    target = folder.with_name(f"{folder.name}-{len(chosen)}")
    target.mkdir(exist_ok=True)
    for path in chosen:
        if not (target / path.name).exists():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def alone(attacked: list[str], config: str) -> list[str]:
    """The models `config` attacks: the first alone for `single` and `single-...`, else all."""
    return attacked[:1] if config.split("-")[0] == "single" else attacked


def protect(args: argparse.Namespace, photos: Path, out: Path, attacked: list[str], config: str, kind: str) -> Path:
    """Protect `photos` with FaceLock against `attacked` under `config`; returns the folder of protected photos."""
    models = alone(attacked, config)
    l2 = CONFIGS[config].get("norm") == "l2"
    budget = args.l2_budget if l2 else args.attack_budget
    step = {"step_size": budget * L2_STEP} if l2 else {}
    common = dict(fr_model=",".join(models), vae=args.vae, lpips="none", allow_no_face=True, attack_budget=budget,
                  **step, num_iters=args.num_iters, seed=args.seed, device=args.device, max_size=0,
                  region="face" if kind == "full" else "full")
    options = resolve("facelock", **{**common, **CONFIGS[config]})  # a config may set its own iterations
    protect_folder(options, photos, out, batch_size=args.batch_size, say=print)
    return out / f"budget_{budget}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    held_out = [m.strip() for m in args.held_out.split(",")] if args.held_out else models
    if len(models) < 2 or sorted(set(held_out) - set(models)) or sorted(set(configs) - set(CONFIGS)) \
            or sorted(set(kinds) - set(KINDS)):
        raise UserError(f"need two or more --models, --held_out among them, --configs among {','.join(CONFIGS)} and "
                        f"--kinds among {','.join(KINDS)}")
    output, device = Path(args.output), pick_device(args.device)
    photos = labelled_photos(Path(args.faces) if args.faces else default_faces())
    folders = prepare_photos(photos, output, kinds)
    if args.photos:
        folders = {kind: subset(folder, args.photos) for kind, folder in folders.items()}
    names = {kind: sorted(p.stem for p in folder.glob("*.png")) for kind, folder in folders.items()}
    identities = {m: load_face_identity(m, device) for m in models}
    thresholds = {m: calibrate(identity, photos, args.far, device) for m, identity in identities.items()}
    for m, calibration in thresholds.items():
        print(f"{m}: threshold {calibration.threshold:.3f} at FAR {args.far}")
    autoencoder = as_autoencoder(load_autoencoder(args.vae, "", device, torch.float32))

    rows, judged = [], read_judged(output / "judged.json")
    for kind in kinds:
        zooms = []
        sources = {n: pil_to_tensor(load_image(folders[kind] / f"{n}.png")).to(device) for n in names[kind]}
        judges = {}
        for m in models:
            judges[m] = FaceSimilarity(identities[m])
            for n, x in sources.items():
                judges[m].add_sources([n], x)
        for model in held_out:
            attacked = [m for m in models if m != model]
            runs = {"none": folders[kind]}
            for config in configs:  # kept by the models attacked, so that held-out models that share them share it
                runs[config] = protect(args, folders[kind], output / "protected" / kind /
                                       "+".join(alone(attacked, config)) / config, attacked, config, kind)
            for config, folder in runs.items():
                rows += judge(args, kind, model, alone(attacked, config), config, folder,
                              names[kind], sources, judges, autoencoder, thresholds[model].threshold, judged)
                write_csv(rows, output / "transfer.csv")
                write_judged(output / "judged.json", judged)
            zooms.append((model, [zoomed(runs[c] / f"{names[kind][0]}.png", folders[kind] / f"{names[kind][0]}.png",
                                         output / "zoom" / kind / model / f"{c}.png") for c in runs]))
        sheet = grid(list(runs), zooms, size=ZOOM * ZOOM_SIDE)
        atomic_write(output / f"zoom_{kind}.png", lambda tmp: sheet.save(tmp, format="PNG"))
    text = report(rows, thresholds, args)
    atomic_write(output / "transfer.md", lambda tmp: tmp.write_text(text))
    if args.results:
        write_results(args.results, "Does it hold against face models it never saw?", text,
                      "evaluation.benchmarks.transfer", argv, [device])
    print(text)
    return 0


#: The zoomed window a person looks at: this many pixels of the flattest part of the first photo, this many times.
ZOOM_SIDE, ZOOM = 48, 3


def zoomed(path: Path, clean: Path, target: Path) -> Path:
    """The flattest `ZOOM_SIDE` px square of the clean photo (lowest standard deviation, on an 8-pixel grid), cut from
    the photo at `path` and enlarged `ZOOM` times without smoothing (so that every changed pixel shows), saved to
    `target`."""
    reference = np.asarray(load_image(clean).convert("L"), dtype=np.float64)
    height, width = reference.shape
    best, corner = math.inf, (0, 0)
    for top in range(0, height - ZOOM_SIDE + 1, 8):
        for left in range(0, width - ZOOM_SIDE + 1, 8):
            spread = reference[top:top + ZOOM_SIDE, left:left + ZOOM_SIDE].std()
            if spread < best:
                best, corner = spread, (left, top)
    window = load_image(path).crop((*corner, corner[0] + ZOOM_SIDE, corner[1] + ZOOM_SIDE))
    save_png(np.asarray(window.resize((ZOOM * ZOOM_SIDE,) * 2, Image.NEAREST)), target)
    return target


@torch.no_grad()
def judge(args, kind: str, held_out: str, attacked: list[str], config: str, folder: Path, names: list[str],
          sources: dict, judges: dict, autoencoder, threshold: float, judged: dict) -> list[dict]:
    """One row per photo and cleanup: the held-out and attacked similarities of the round trip, and visibility.
    Rows already in `judged` for the same photo file, models, threshold, seed and autoencoder are taken from there;
    new ones are added to it."""
    timing = {}
    if (folder / "manifest.json").is_file():
        timing = {Path(e["source"]).stem: e["seconds"]
                  for e in json.loads((folder / "manifest.json").read_text())["outputs"].values()}
    rows = []
    for n in names:
        key = "|".join((kind, held_out, "+".join(attacked), config, n, sha256_of(folder / f"{n}.png"),
                        f"{threshold:.6f}", str(args.seed), args.vae))
        if key in judged:
            rows += judged[key]
            continue
        x, protected = sources[n], pil_to_tensor(load_image(folder / f"{n}.png")).to(sources[n].device)
        mine = []
        for cleanup in JUDGED_CLEANUPS:
            cleaned = CLEANUPS[cleanup](protected, [cpu_generator(derive_seed(args.seed, cleanup, n))])
            cleaned = ((cleaned.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # saved as an 8-bit file
            round_trip = autoencoder(cleaned).float().clamp(-1, 1)
            held = judges[held_out].score(round_trip, [n]).item()
            white = nanmean([judges[m].score(round_trip, [n]).item() for m in attacked])
            flat_mean, flat_max = flat_change(protected, x)
            mine.append({"kind": kind, "held_out": held_out, "config": config, "photo": n, "cleanup": cleanup,
                         "fr_held_out": held, "protected": bool(math.isnan(held) or held <= threshold),
                         "fr_attacked": white, "psnr": psnr(protected, x).item(), "ssim": ssim(protected, x).item(),
                         "flat_mean": flat_mean.item(), "flat_max": flat_max.item(),
                         "linf_255": round(float((protected - x).abs().max()) * 127.5),
                         "seconds": timing.get(n, 0.0)})
        judged[key] = mine
        rows += mine
    return rows


def report(rows: list[dict], thresholds: dict, args: argparse.Namespace) -> str:
    def select(**where):
        return [r for r in rows if all(r[k] == v for k, v in where.items())]

    def fraction(chosen: list[dict]) -> str:
        return f"{np.mean([r['protected'] for r in chosen]):.0%}" if chosen else "n/a"

    def largest(chosen: list[dict], key: str) -> str:
        values = [r[key] for r in chosen if not math.isnan(r[key])]
        return f"{max(values):.0f}" if values else "n/a"

    def mean(chosen: list[dict], key: str, digits: int = 3) -> str:
        values = [r[key] for r in chosen if not (isinstance(r[key], float) and (math.isnan(r[key])
                                                                                 or math.isinf(r[key])))]
        return f"{np.mean(values):.{digits}f}" if values else "n/a"

    own = [f"{c}: {CONFIGS[c]['num_iters']}" for c in dict.fromkeys(r["config"] for r in rows)
           if "num_iters" in CONFIGS.get(c, {})]
    lines = [f"FaceLock against {args.vae} round trips, budget {args.attack_budget} "
             f"({args.attack_budget * 127.5:.1f}/255), {args.num_iters} iterations"
             + (f" ({', '.join(own)})" if own else "") + ", attacking every face model but the "
             f"held-out one. Protected: the held-out model's similarity is below its threshold at {args.far:.0%} FAR "
             "(" + ", ".join(f"{m} {c.threshold:.3f}" for m, c in thresholds.items()) + "; a round trip without a "
             "detectable face counts as protected).", ""]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        lines += [f"### {kind}", "", "| held out | config | protected: none / JPEG 75 / JPEG 50 / 1080 px + JPEG 85 | "
                  "held-out FR (none / JPEG 75) | attacked FR (none / JPEG 75) | PSNR (dB) | SSIM | "
                  "flat: mean / largest (/255) | L-inf (/255, largest) | s / photo |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for model in dict.fromkeys(r["held_out"] for r in rows if r["kind"] == kind):
            for config in dict.fromkeys(r["config"] for r in rows if r["kind"] == kind and r["held_out"] == model):
                mine = {c: select(kind=kind, held_out=model, config=config, cleanup=c) for c in JUDGED_CLEANUPS}
                lines.append(f"| {model} | {config} | " + " / ".join(fraction(mine[c]) for c in JUDGED_CLEANUPS)
                             + f" | {mean(mine['none'], 'fr_held_out')} / {mean(mine['jpeg75'], 'fr_held_out')} | "
                             f"{mean(mine['none'], 'fr_attacked')} / {mean(mine['jpeg75'], 'fr_attacked')} | "
                             f"{mean(mine['none'], 'psnr', 1)} | "
                             f"{mean(mine['none'], 'ssim')} | {mean(mine['none'], 'flat_mean', 2)} / "
                             f"{largest(mine['none'], 'flat_max')} | {max(r['linf_255'] for r in mine['none'])} | "
                             f"{mean(mine['none'], 'seconds', 1)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)
