"""Face-recognition thresholds at a chosen false-accept rate, calibrated on photos of known people.

    python -m evaluation.calibration --fr_model mobilefacenet [--faces DIR] [--far 0.01] [--output FILE]

A verdict such as "not recognised" needs a threshold: the similarity above which a face model accepts two faces as
the same person. It is set on labelled photos so that at most a fraction `far` of the different-person pairs are
accepted: with the different-person similarities sorted from the highest, the threshold is the `floor(far * n) + 1`-th
of them, and a pair is accepted when its similarity is above it. Identities come from a `labels.csv` (`path,identity`)
in the folder, or else from each photo's parent folder. The held-out acceptance set is refused, as by the benchmarks.
`--output` adds the thresholds, with where they come from, to a JSON table (the one `assets/thresholds.json` ships,
which `evaluation.check` reads).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from methods.models import loading
from methods.models.downloads import sha256_of
from methods.models.loading import ASSETS_ENV, load_face_identity, local_copy
from methods.pipeline.photos import photos_under
from methods.pipeline.runs import package_versions
from utils import UserError, load_image, pick_device, pil_to_tensor, run_script, write_json


@dataclass
class Calibration:
    """A face model's threshold at false-accept rate `far`, with the pair counts it rests on."""

    model: str
    far: float
    threshold: float
    genuine_pairs: int
    impostor_pairs: int
    false_rejects: float  # fraction of same-person pairs at or below the threshold

    def recognised(self, similarity: float) -> bool:
        return not math.isnan(similarity) and similarity > self.threshold

    def to_dict(self) -> dict:
        return asdict(self)


def model_digest(spec: str) -> str | None:
    """The SHA-256 of the ONNX file behind face model `spec` (a FACELOCK_ASSETS name or a path); None for models
    without one file here (facenet, adaface, a download)."""
    path = local_copy(spec) or (Path(spec) if spec.endswith(".onnx") else None)
    if path is None or not path.is_file():
        return None
    return sha256_of(path)


def read_thresholds(path: str | Path) -> dict[str, dict]:
    """A table written by `--output`: model name -> its calibration and provenance; empty if there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["models"]
    except (ValueError, KeyError) as error:
        raise UserError(f"{path} is not a threshold table written by evaluation.calibration ({error})") from None


def write_thresholds(path: str | Path, entries: dict[str, dict]) -> None:
    """Add `entries` (model name -> calibration and provenance) to the table at `path`, replacing those models."""
    models = {**read_thresholds(path), **entries}
    write_json({"about": "face-model thresholds at a false-accept rate; regenerate with the command of each entry",
                "models": dict(sorted(models.items()))}, path)


def labelled_photos(folder: str | Path) -> list[tuple[Path, str]]:
    """(photo, identity) for every photo under `folder`, from its `labels.csv` or the photos' parent folders."""
    folder = Path(folder)
    photos = photos_under(folder)
    labels = folder / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as f:
            named = {(folder / row["path"]).resolve(): row["identity"] for row in csv.DictReader(f)}
        pairs = [(p, named[p.resolve()]) for p in photos if p.resolve() in named]
    else:
        pairs = [(p, p.parent.name) for p in photos if p.parent != folder]
    if len({identity for _, identity in pairs}) < 2:
        raise UserError(f"{folder}: calibration needs photos of at least two people (a labels.csv or one folder "
                        f"per person)")
    return pairs


def threshold_at_far(impostor: Sequence[float], far: float) -> float:
    """The smallest similarity threshold that accepts at most `floor(far * n)` of `n` impostor similarities."""
    if not impostor:
        raise ValueError("no different-person pairs to calibrate on")
    ordered = sorted(impostor, reverse=True)
    return float(ordered[min(int(math.floor(far * len(ordered))), len(ordered) - 1)])


@torch.no_grad()
def pair_similarities(identity, photos: Sequence[tuple[Path, str]], device: torch.device
                      ) -> tuple[list[float], list[float]]:
    """(same-person, different-person) cosine similarities over every pair of photos with a detected face."""
    embedded = []
    for path, person in photos:
        embeddings, _, _ = identity.embed(pil_to_tensor(load_image(path)).to(device))
        if len(embeddings):
            embedded.append((embeddings[0].float().cpu(), person))
    genuine, impostor = [], []
    for (a, first), (b, second) in itertools.combinations(embedded, 2):
        (genuine if first == second else impostor).append(float(torch.dot(a, b)))
    return genuine, impostor


def calibrate(identity, photos: Sequence[tuple[Path, str]], far: float = 0.01,
              device: torch.device | None = None) -> Calibration:
    """The threshold of the face model `identity` (a `methods.models.faces.FaceIdentity`) at `far` on `photos`."""
    device = device or next(identity.parameters()).device
    genuine, impostor = pair_similarities(identity, photos, device)
    threshold = threshold_at_far(impostor, far)
    rejects = float(np.mean([g <= threshold for g in genuine])) if genuine else float("nan")
    return Calibration(getattr(identity, "name", ""), far, threshold, len(genuine), len(impostor), rejects)


def default_faces() -> Path:
    """`$FACELOCK_ASSETS/faces`, the calibration photos of the offline assets."""
    root = loading.assets_root()
    if root is None:
        raise UserError(f"pass --faces, or set {ASSETS_ENV} to a folder holding faces/")
    return root / "faces"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fr_model", required=True, help="face model(s) to calibrate, comma-separated")
    parser.add_argument("--faces", help=f"labelled photos (default: ${ASSETS_ENV}/faces)")
    parser.add_argument("--far", type=float, default=0.01, help="false-accept rate")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--output", help="add the thresholds and their provenance to this JSON table "
                                         "(e.g. assets/thresholds.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.far < 1:
        raise UserError(f"--far must be in [0, 1), got {args.far}")
    faces = Path(args.faces) if args.faces else default_faces()
    photos = labelled_photos(faces)
    device = pick_device(args.device)
    entries = {}
    for name in [n.strip() for n in args.fr_model.split(",") if n.strip()]:
        result = calibrate(load_face_identity(name, device), photos, args.far, device)
        print(f"{name}: threshold {result.threshold:.3f} at FAR {args.far} ({result.impostor_pairs} different-person "
              f"pairs, {result.genuine_pairs} same-person pairs, {result.false_rejects:.0%} of them rejected)")
        entries[name] = {**result.to_dict(), "model": name, "model_sha256": model_digest(name),
                         "photos": f"{faces.name}/: {len(photos)} photos of {len({p for _, p in photos})} people",
                         "command": f"python -m evaluation.calibration --fr_model {name} --far {args.far}"
                                    + (f" --faces {args.faces}" if args.faces else "")
                                    + (f" --output {args.output}" if args.output else ""),
                         "date": datetime.date.today().isoformat(),
                         "versions": {k: v for k, v in package_versions().items()
                                      if k in ("torch", "onnx2torch", "facenet-pytorch")}}
    if args.output:
        write_thresholds(args.output, entries)
        print(f"wrote {', '.join(entries)} to {args.output}")
    return 0


if __name__ == "__main__":
    run_script(main)
