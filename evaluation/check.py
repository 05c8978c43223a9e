"""Is a photo still protected? What an editor would make of it, judged by a face model the protection never saw.

    python -m evaluation.check --original me.jpg --protected me_protected.png [--judge mobilefacenet] [--json]
    python -m evaluation.check --original me.jpg     # the control: the photo alone, with no protection

The check plays what happens to a posted photo. The protected copy (without `--protected`, the photo itself) is
shared as it is, re-compressed as JPEG at quality 75, or resized to 1080 px on its long side and compressed as JPEG
at quality 85, as social networks do. Then an editor takes it: here the round trip D(E(x)) through the editors'
autoencoder (`--vae`, default TAESD, which shares Stable Diffusion's latent space), at up to `--max_size` px on the
long side. A face model that the protection did not attack (`--judge`) compares the face in the result with the
face in the original photo: their cosine similarity, and a verdict at that model's threshold for a 1 % false-accept
rate ("recognised" above it, see `evaluation.calibration`). Also reported: how visible the perturbation is
(L-infinity in 1/255 and PSNR against the original).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from methods.models import loading
from methods.models.autoencoder import as_autoencoder
from methods.models.loading import ASSETS_ENV, load_autoencoder, load_face_identity, local_copy
from methods.pipeline.options import MAX_BUDGET
from methods.transforms import fit_long_side
from utils import InputError, UserError, linf_255, load_image, pick_device, pil_to_tensor, run_script

from .calibration import Calibration, calibrate, labelled_photos, model_digest, read_thresholds
from .cleanups import SHARING
from .metrics.facial import FaceSimilarity
from .metrics.psnr import psnr

#: The table of thresholds shipped with the project (see evaluation.calibration --output).
THRESHOLDS = Path(__file__).resolve().parents[1] / "assets" / "thresholds.json"
#: The face model the small preset (and the web page) protects against; a judge must be another.
PROTECTION_FR_MODEL = "sface"
EDITOR_VAE = "madebyollin/taesd"
#: The lowest PSNR (dB) a protection of this toolkit leaves: its largest budget, `MAX_BUDGET`, on every pixel.
LOWEST_PSNR = 20 * math.log10(2 / MAX_BUDGET)


@dataclass
class Judge:
    """A face model judging the results, with its threshold (None where none is known) and where that comes from."""

    name: str
    similarity: FaceSimilarity
    calibration: Calibration | None
    source: str

    def describe(self) -> dict:
        c = self.calibration
        return {"model": self.name, "threshold": None if c is None else round(c.threshold, 4),
                "far": None if c is None else c.far, "threshold_source": self.source}


def split_models(spec: str) -> list[str]:
    return [name.strip() for name in spec.split(",") if name.strip()]


def default_judge() -> str:
    """MobileFaceNet, where a local copy has it (it ships with the toolkit), else facenet (downloaded by
    facenet-pytorch)."""
    return "mobilefacenet" if local_copy("mobilefacenet") else "facenet"


def threshold_for(name: str, identity, far: float, table: dict, table_path: Path, faces: Path | None,
                  device: torch.device) -> tuple[Calibration | None, str]:
    """The judge's threshold at `far`: calibrated on `faces` if given, else from the shipped table (for the same
    model file), else calibrated on FACELOCK_ASSETS/faces, else None with what to do about it."""
    if faces is not None:
        return calibrate(identity, labelled_photos(faces), far, device), f"calibrated now on {faces}"
    entry = table.get(name)
    if entry and entry["far"] == far and entry.get("model_sha256") == model_digest(name):
        fields = ("model", "far", "threshold", "genuine_pairs", "impostor_pairs", "false_rejects")
        return Calibration(**{k: entry[k] for k in fields}), \
            f"{table_path.name}: calibrated on {entry['photos']} ({entry['command']})"
    assets_faces = loading.assets_faces()
    if assets_faces is not None:
        return calibrate(identity, labelled_photos(assets_faces), far, device), \
            f"calibrated now on ${ASSETS_ENV}/faces"
    return None, (f"no threshold for {name} at a false-accept rate of {far:g}: make one with `python -m "
                  f"evaluation.calibration --fr_model {name} --far {far:g} --faces DIR --output {table_path}` "
                  f"(DIR: photos of at least two people, one folder each)")


def load_judges(spec: str, device: torch.device, far: float = 0.01, thresholds: Path = THRESHOLDS,
                faces: Path | None = None, protection_fr_model: str = PROTECTION_FR_MODEL) -> list[Judge]:
    """The judging face models of `spec` (comma-separated), none of which the protection attacked."""
    names = split_models(spec)
    attacked = sorted(set(names) & set(split_models(protection_fr_model)))
    if not names or attacked:
        raise UserError(f"--judge {spec!r}: name one or more face models that the protection did not attack "
                        f"(it attacked {protection_fr_model}); e.g. mobilefacenet or mobileface")
    table = read_thresholds(thresholds)
    judges = []
    for name in names:
        identity = load_face_identity(name, device)
        calibration, source = threshold_for(name, identity, far, table, Path(thresholds), faces, device)
        judges.append(Judge(name, FaceSimilarity(identity), calibration, source))
    return judges


def verdict(similarity: float, calibration: Calibration | None) -> tuple[bool | None, str]:
    if math.isnan(similarity):
        return False, "no face found"
    if calibration is None:
        return None, "no threshold"
    recognised = calibration.recognised(similarity)
    return recognised, "recognised" if recognised else "not recognised"


class Checker:
    """The check with its models loaded once: `checker(original, protected)` returns the report as a dict.

    `watched`: face models scored on the same edits without a verdict (a benchmark's attacked models), in the
    report's `watched` as {sharing, judge, similarity}; the verdicts and the summary are the judges' alone."""

    def __init__(self, autoencoder: torch.nn.Module, judges: Sequence[Judge], editor: str = EDITOR_VAE,
                 max_size: int = 1024, watched: Sequence[tuple[str, FaceSimilarity]] = ()) -> None:
        self.autoencoder = as_autoencoder(autoencoder).eval()
        self.device = next(self.autoencoder.parameters()).device
        self.judges = list(judges)
        self.watched = list(watched)
        self.editor = f"autoencoder round trip of {editor}, at up to {max_size} px"
        self.max_size = max_size

    @torch.no_grad()
    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """What the editor makes of an image: the autoencoder round trip at the editor's working size."""
        work = fit_long_side(x, self.max_size).to(self.device)
        height, width = work.shape[-2:]
        padded = F.pad(work, (0, -width % 8, 0, -height % 8), mode="replicate")
        return self.autoencoder(padded)[..., :height, :width].float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, original: Image.Image, protected: Image.Image | None = None) -> dict:
        if protected is not None and protected.size != original.size:
            raise InputError(f"the protected copy is {protected.width}x{protected.height} and the original "
                             f"{original.width}x{original.height}: it is not a copy of this photo")
        reference = fit_long_side(pil_to_tensor(original), self.max_size)
        for judge in self.judges:
            judge.similarity.add_sources(["original"], reference)
            if judge.similarity.sources["original"] is None:
                raise InputError("no face found in the original photo; the check compares faces")
        for _, similarity in self.watched:
            similarity.add_sources(["original"], reference)
        if protected is not None:
            self.refuse_other_photos(original, protected)
        subject = pil_to_tensor(protected if protected is not None else original)
        results, watched = [], []
        for sharing, share in SHARING.items():
            edited = self.edit(share(subject))
            for judge in self.judges:
                similarity = _score(judge.similarity, edited)
                recognised, words = verdict(similarity, judge.calibration)
                results.append({"sharing": sharing, "judge": judge.name, "similarity": _reported(similarity),
                                "recognised": recognised, "verdict": words})
            watched += [{"sharing": sharing, "judge": name, "similarity": _reported(_score(similarity, edited))}
                        for name, similarity in self.watched]
        report = {"control": protected is None, "editor": self.editor, "linf_255": None, "psnr": None,
                  "judges": [judge.describe() for judge in self.judges], "results": results,
                  "summary": summarise(results), "watched": watched}
        if protected is not None:
            clean, adversarial = np.asarray(original), np.asarray(protected)
            report["linf_255"] = linf_255(adversarial, clean)
            quality = psnr(pil_to_tensor(protected), pil_to_tensor(original)).item()
            report["psnr"] = round(quality, 2) if math.isfinite(quality) else None
        return report


    def refuse_other_photos(self, original: Image.Image, protected: Image.Image) -> None:
        """Raise `InputError` (one line) where the "protected copy" changes the photo more than any protection can
        (a PSNR below `LOWEST_PSNR`, what the largest budget gives on every pixel): it is another picture, and its
        verdicts would count as protection what is not. Says whether it shows another person's face."""
        quality = psnr(pil_to_tensor(protected), pil_to_tensor(original)).item()
        if quality >= LOWEST_PSNR:
            return
        what = f"PSNR {quality:.1f} dB, L-inf {linf_255(np.asarray(protected), np.asarray(original))}/255"
        judge = self.judges[0]
        similarity = float(judge.similarity.score(fit_long_side(pil_to_tensor(protected), self.max_size),
                                                  ["original"])[0])
        if math.isnan(similarity):
            face = "it shows no face"
        elif judge.calibration is not None and not judge.calibration.recognised(similarity):
            face = f"it shows another person's face ({judge.name} similarity {similarity:.3f})"
        else:
            face = "it is far more changed than a protection changes a photo"
        raise InputError(f"the protected copy is not a protected copy of this photo: {face} ({what}; any protection "
                         f"of this toolkit stays above {LOWEST_PSNR:.1f} dB)")


def _score(similarity: FaceSimilarity, edited: torch.Tensor) -> float:
    """The similarity of the edit's face to the original's (NaN where the edit shows no face)."""
    return float(similarity.score(edited, ["original"])[0])


def _reported(similarity: float) -> float | None:
    return None if math.isnan(similarity) else round(similarity, 4)


def summarise(results: list[dict]) -> dict[str, str]:
    """Per sharing scenario: "not recognised" when no judge recognises the face, "recognised" when one does,
    "unknown" when no judge has a threshold."""
    summary = {}
    for sharing in dict.fromkeys(r["sharing"] for r in results):
        verdicts = [r["recognised"] for r in results if r["sharing"] == sharing]
        if any(v is True for v in verdicts):
            summary[sharing] = "recognised"
        elif verdicts and all(v is False for v in verdicts):
            summary[sharing] = "not recognised"
        else:
            summary[sharing] = "unknown"
    return summary


def conclusion(report: dict) -> str:
    """One sentence a person can act on."""
    summary = report["summary"]
    safe = [s for s, v in summary.items() if v == "not recognised"]
    if report["control"]:
        return (f"control (no protection): the face is recognised after the edit in "
                f"{sum(v == 'recognised' for v in summary.values())} of {len(summary)} ways of sharing")
    if len(safe) == len(summary):
        return "protected: the face is not recognised after the edit, however the photo is shared"
    if safe:
        return f"partly protected: the face is not recognised after the edit only when shared {', '.join(safe)}"
    if all(v == "unknown" for v in summary.values()):
        return "unknown: no judge has a threshold (see above)"
    return "not protected: the face is still recognised after the edit"


def format_report(report: dict, original: str, protected: str | None) -> str:
    lines = [f"original: {original}" + (f", protected copy: {protected}" if protected else " (control: no "
                                                                                        "protected copy)")]
    if not report["control"]:
        quality = "identical" if report["psnr"] is None else f"PSNR {report['psnr']:.2f} dB"
        lines.append(f"perturbation: L-inf {report['linf_255']}/255, {quality}")
    lines.append(f"editor: {report['editor']}")
    for judge in report["judges"]:
        threshold = "" if judge["threshold"] is None else \
            f"threshold {judge['threshold']:.3f} at {judge['far']:.0%} false accepts, "
        lines.append(f"judge {judge['model']}: {threshold}{judge['threshold_source']}")
    width = max(len(s) for s in report["summary"])
    for sharing, overall in report["summary"].items():
        cells = [f"{r['judge']} {'n/a' if r['similarity'] is None else format(r['similarity'], '.3f')} "
                 f"{r['verdict']}" for r in report["results"] if r["sharing"] == sharing]
        lines.append(f"  {sharing:<{width}}  {'; '.join(cells)}  -> {overall}")
    lines.append(conclusion(report))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--original", required=True, help="the photo as taken")
    parser.add_argument("--protected", help="its protected copy (without it: the photo alone, as the control)")
    parser.add_argument("--judge", help="face model(s) judging, comma-separated, none of them attacked by the "
                                        "protection (default: mobilefacenet, which ships with the toolkit)")
    parser.add_argument("--protection_fr_model", default=PROTECTION_FR_MODEL,
                        help="the face model(s) the protection attacked (defend.py --fr_model); refused as judges")
    parser.add_argument("--vae", default=EDITOR_VAE, help="the editor's autoencoder (hub id or folder)")
    parser.add_argument("--max_size", type=int, default=1024, help="the editor's long side in px (0: full size)")
    parser.add_argument("--far", type=float, default=0.01, help="false-accept rate of the verdicts' thresholds")
    parser.add_argument("--thresholds", default=str(THRESHOLDS), help="table of calibrated thresholds")
    parser.add_argument("--faces", help="calibrate the judges now on these labelled photos instead")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_size < 0 or not 0 <= args.far < 1:
        raise UserError("--max_size must be >= 0 and --far in [0, 1)")
    original = load_image(args.original)
    protected = load_image(args.protected) if args.protected else None
    device = pick_device(args.device)
    judges = load_judges(args.judge or default_judge(), device, args.far, Path(args.thresholds),
                         Path(args.faces) if args.faces else None, args.protection_fr_model)
    autoencoder = load_autoencoder(args.vae, "", device, torch.float32)
    report = Checker(autoencoder, judges, args.vae, args.max_size)(original, protected)
    if args.json:
        print(json.dumps({"original": args.original, "protected": args.protected, **report,
                          "conclusion": conclusion(report)}, indent=2))
    else:
        print(format_report(report, args.original, args.protected))
    return 0


if __name__ == "__main__":
    run_script(main)
