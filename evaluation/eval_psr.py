"""Protection Success Rate: are protected photos still identified among clean photos of the same people?

    python -m evaluation.eval_psr --gallery faces/ --probes protected/facecloak/budget_0.0628 \
        --fr_model mobilefacenet,sface --output results/psr

FaceCloak's protocol (see `evaluation/metrics/psr.py`): each probe, a protected photo named after its clean photo in
the gallery, is compared with every other gallery photo (the same people plus `--distractors`) by each face model;
top-1 and top-5 PSR count the probes with no photo of their person among the 1 or 5 most similar, and verification
PSR the pairs with a photo of their person that the model rejects at the threshold where `--calibration` (default:
the gallery) gives a false-accept rate of `--far`. The gallery's own photos, unprotected, are the control row `none`.
Identities come from a `labels.csv` (`path,identity`) in the gallery, or else from each photo's folder. Writes
`psr.csv`, `psr_per_probe.csv` and `psr.md` (also printed) to `--output`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from utils import UserError, atomic_write, pick_device, run_script, write_csv

from .calibration import default_faces
from .metrics.psr import Gallery, Probes, face_models, load_gallery, score_probes, summarise
from .walker import images_by_name


def markdown(summary: list[dict], gallery: Gallery, far: float) -> str:
    models = list(dict.fromkeys(r["model"] for r in summary))
    cell = lambda v: "n/a" if math.isnan(v) else f"{v:.0%}"  # noqa: E731
    lines = ["| probes | " + " | ".join(f"{m} top-1 ↑ | {m} top-5 ↑ | {m} verification ↑" for m in models)
             + " | scored |", "|---|" + "---|---|---|" * len(models) + "---|"]
    for label in dict.fromkeys(r["probes"] for r in summary):
        mine = {r["model"]: r for r in summary if r["probes"] == label}
        cells = [f"{cell(mine[m]['top1'])} | {cell(mine[m]['top5'])} | {cell(mine[m]['verification'])}"
                 for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mine[models[0]]['scored']} |")
    thresholds = ", ".join(f"{m} {gallery.thresholds[m]:.3f}" for m in models)
    lines += ["", f"PSR: the share of probes protected (higher is stronger). Gallery: {len(gallery.keys)} photos of "
                  f"{len(set(gallery.identities))} people; verification thresholds at FAR {far}: {thresholds}."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", help="labelled clean photos (labels.csv or one folder per person; default: "
                                          "$FACELOCK_ASSETS/faces)")
    parser.add_argument("--probes", nargs="+", required=True,
                        help="folders of protected photos, each named after its clean photo in the gallery (its name, "
                             "or its path there with / replaced by __)")
    parser.add_argument("--fr_model", required=True, help="face models judging, comma-separated (each one a column)")
    parser.add_argument("--distractors", help="photos of other people added to the gallery")
    parser.add_argument("--calibration", help="labelled photos setting the thresholds (default: the gallery)")
    parser.add_argument("--far", type=float, default=0.01, help="false-accept rate of the verification threshold")
    parser.add_argument("--output", required=True, help="folder for psr.csv, psr_per_probe.csv and psr.md")
    parser.add_argument("--batch_size", type=int, default=8, help="photos embedded per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.far < 1:
        raise UserError(f"--far must be in [0, 1), got {args.far}")
    folder = Path(args.gallery) if args.gallery else default_faces()
    device = pick_device(args.device)
    models, detector = face_models(args.fr_model, device)
    gallery, gallery_paths = load_gallery(folder, models, detector, args.far,
                                          Path(args.distractors) if args.distractors else None,
                                          Path(args.calibration) if args.calibration else None, args.batch_size)
    probes = Probes(gallery, models, detector)
    sets = {}
    for probe_dir in map(Path, args.probes):
        found = images_by_name(probe_dir)
        if not found:
            raise UserError(f"no images in {probe_dir}")
        sets[probe_dir.name if probe_dir.name not in sets else str(probe_dir)] = found
    names = sorted(set().union(*sets.values()))
    unmatched = [n for n in names if gallery.identity_of(n)[0] is None]
    control = {n: gallery_paths[gallery.keys[gallery.identity_of(n)[1]]] for n in names if n not in unmatched}
    rows, summary = [], []
    for label, paths in {"none": control, **sets}.items():
        scored = score_probes(probes, paths, args.batch_size)
        rows += [{"probes": label, **r} for r in scored]
        summary += summarise(scored, label, list(models))
    output = Path(args.output)
    write_csv(rows, output / "psr_per_probe.csv")
    write_csv(summary, output / "psr.csv")
    text = markdown(summary, gallery, args.far)
    atomic_write(output / "psr.md", lambda tmp: tmp.write_text(text))
    print(text)
    if unmatched:
        print(f"{len(unmatched)} probes match no gallery photo and are not scored: {', '.join(unmatched[:5])}"
              + (", ..." if len(unmatched) > 5 else ""))
    print(f"tables written to {output}")
    return 0


if __name__ == "__main__":
    run_script(main)
