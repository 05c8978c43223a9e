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
import itertools
import math
from pathlib import Path
from typing import Sequence

import torch

from utils import (
    UserError,
    atomic_write,
    batches_by_size,
    image_size,
    load_face_identity,
    load_image,
    pick_device,
    pil_to_tensor,
    run_script,
    write_csv,
)

from methods.facecloak import members

from .calibration import default_faces, labelled_photos, threshold_at_far
from .metrics.psr import KINDS, Gallery, Probes, embed_largest, photo_key
from .runner import nanmean
from .walker import images_by_name, photos_under


def by_name(face) -> tuple[dict, object]:
    """The face models of `face` (a `FaceIdentity` or a `FaceEnsemble`) by name, each on its own, and their shared
    detector."""
    return {member.name: member for member in members(face)}, face.detector


def face_models(spec: str, device: torch.device) -> tuple[dict, object]:
    """The face models named in `spec` (comma-separated, loaded as one `FaceEnsemble`) by name, and their detector."""
    return by_name(load_face_identity(spec, device))


def load_gallery(folder: Path, models: dict, detector, far: float = 0.01, distractors: Path | None = None,
                 calibration: Path | None = None, batch_size: int = 8) -> tuple[Gallery, dict[str, Path]]:
    """Embed the labelled photos of `folder` (and `distractors`, each its own person) with every model, and set each
    model's threshold at `far` on `calibration` (default: the labelled gallery's own pairs). Returns the gallery and
    its photos by key."""
    labelled = labelled_photos(folder)
    paths = {photo_key(path, folder): path for path, _ in labelled}
    identities = [identity for _, identity in labelled]
    if distractors is not None:
        for path in photos_under(distractors):
            key = "distractor__" + photo_key(path, distractors)
            paths[key] = path
            identities.append(key)
    keys = list(paths)
    embedded = embed_paths([paths[k] for k in keys], models, detector, batch_size)
    if calibration is None:
        labelled_keys = set(keys[:len(labelled)])
        thresholds = {}
        for model, table in embedded.items():
            impostor = [float(table[a] @ table[b]) for a, b in itertools.combinations(range(len(keys)), 2)
                        if keys[a] in labelled_keys and keys[b] in labelled_keys
                        and identities[a] != identities[b] and not table[[a, b]].isnan().any()]
            thresholds[model] = threshold_at_far(impostor, far)
    else:
        from .calibration import calibrate

        photos = labelled_photos(calibration)
        thresholds = {name: calibrate(model, photos, far).threshold for name, model in models.items()}
    return Gallery(keys, identities, embedded, thresholds), paths


def embed_paths(paths: Sequence[Path], models: dict, detector, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per model, the embeddings of the largest face of each photo (NaN rows where there is none)."""
    device = next(next(iter(models.values())).parameters()).device
    tables: dict[str, torch.Tensor] = {}
    order = list(range(len(paths)))
    for batch in batches_by_size(order, lambda i: image_size(paths[i]), batch_size):
        images = torch.cat([pil_to_tensor(load_image(paths[i])) for i in batch]).to(device)
        for model, table in embed_largest(models, detector, images).items():
            if model not in tables:
                tables[model] = torch.full((len(paths), table.shape[1]), float("nan"))
            tables[model][batch] = table
    return tables


def score_probes(probes: Probes, paths: dict[str, Path], batch_size: int = 8) -> list[dict]:
    """One row per probe (by name) and model with its PSR outcomes."""
    rows = []
    names = sorted(paths)
    for batch in batches_by_size(names, lambda n: image_size(paths[n]), batch_size):
        images = torch.cat([pil_to_tensor(load_image(paths[n])) for n in batch])
        for model, outcomes in probes.outcomes(images, batch).items():
            for k, name in enumerate(batch):
                rows.append({"probe": name, "model": model, **{kind: float(outcomes[kind][k]) for kind in KINDS}})
    return rows


def summarise(rows: list[dict], label: str, models: Sequence[str]) -> list[dict]:
    out = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        scored = [r for r in mine if not math.isnan(r["top1"])]
        out.append({"probes": label, "model": model, **{kind: nanmean([r[kind] for r in mine]) for kind in KINDS},
                    "scored": len(scored), "unscored": len(mine) - len(scored)})
    return out


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
