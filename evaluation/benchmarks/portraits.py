"""Does the page's protection hold on whole photos? The check's verdict on portraits protected at their own size.

    python -m evaluation.benchmarks.portraits --output runs/portraits [--results evaluation/results/portraits.md]

The transfer benchmark judges 256 px crops and 512 px copies; people protect and post the photo as it is. Here a few
portraits of `faces/` (`--photos`, spread over the sorted names as the transfer benchmark picks them) are protected at
their own size with FaceLock and `--preset small`, what the quick start and the page run (`--configs`: named sets of
extra protection flags, `name=flags;name=flags`, `default=` the preset alone), and `evaluation.check` judges each: the
editor's round trip at its working size (up to `--max_size` px) after each way of sharing (as posted, JPEG 75, resize
to 1080 px + JPEG 85), by face models the protection did not attack (`--judge`), at their calibrated thresholds. A
photo counts as protected in a way of sharing when no judge recognises the face. Also reported: each judge's
similarity, each attacked face model's judged the same way (how much of the protection reaches the editor's output at
all, before any transfer), the PSNR and the change on the photo's flat parts (`evaluation.metrics.flat`). Protected
photos and the verdicts (`judged.json`) are kept, so a rerun resumes and checks only what is new; `faces-holdout/` is
refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from methods.models.downloads import sha256_of
from methods.models.loading import load_autoencoder, load_face_identity
from methods.pipeline.options import budget_in_255, flags, resolve
from methods.pipeline.protect import protect_folder
from utils import UserError, atomic_write, load_image, pick_device, pil_to_tensor, run_script, write_csv

from ..calibration import default_faces, labelled_photos
from ..check import EDITOR_VAE, Checker, load_judges
from ..metrics.facial import FaceSimilarity
from ..metrics.flat import flat_change
from .crops import spread
from .judged import read_judged, write_judged
from .results import write_results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", help="labelled face photos (default: $FACELOCK_ASSETS/faces)")
    parser.add_argument("--output", required=True, help="folder for the protected photos and the tables")
    parser.add_argument("--photos", type=int, default=4, help="how many portraits, spread over the sorted names")
    parser.add_argument("--configs", default="default=",
                        help="named sets of extra protection flags, e.g. 'default=;aa=--antialias' (default: the "
                             "preset alone)")
    parser.add_argument("--judge", default="mobilefacenet,mobileface",
                        help="face models judging, none attacked by the protection")
    parser.add_argument("--max_size", type=int, default=1024, help="the editor's long side in px, as in the check")
    parser.add_argument("--seed", type=int, default=0, help="seed of the protection")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--results", help="also write the table, with the machine, date and command, to this markdown "
                                          "file (evaluation/results/portraits.md)")
    return parser


def parse_configs(text: str) -> dict[str, str]:
    """`name=flags;name=flags` as {name: flags}."""
    configs = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, extra = part.partition("=")
        if not sep or not name.strip() or name.strip() in configs:
            raise UserError(f"--configs takes 'name=flags;name=flags' with distinct names, got {part!r}")
        configs[name.strip()] = extra.strip()
    if not configs:
        raise UserError("--configs names no configuration")
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configs = parse_configs(args.configs)
    chosen = {name: resolve("facelock", preset="small", seed=args.seed, device=args.device,
                            **flags(extra.split(), "facelock")) for name, extra in configs.items()}
    output, device = Path(args.output), pick_device(args.device)
    named = sorted(labelled_photos(Path(args.faces) if args.faces else default_faces()),
                   key=lambda pair: f"{pair[1]}__{pair[0].stem}")
    originals = output / "photos"
    originals.mkdir(parents=True, exist_ok=True)
    for path, person in spread(named, args.photos):
        target = originals / f"{person}__{path.name}"
        if not target.exists():
            atomic_write(target, lambda tmp, path=path: tmp.write_bytes(path.read_bytes()))
    attacked = sorted({m for o in chosen.values() for m in o.fr_model.split(",")})
    judges = load_judges(args.judge, device, protection_fr_model=",".join(attacked))
    # the attacked models scored on the same edits, without a verdict: how much of the protection reaches the editor
    checker = Checker(load_autoencoder(EDITOR_VAE, "", device, torch.float32), judges, EDITOR_VAE, args.max_size,
                      watched=[(name, FaceSimilarity(load_face_identity(name, device))) for name in attacked])
    judged_by = ",".join([f"{j.name} {j.calibration.threshold if j.calibration else ''}" for j in judges]
                         + [f"{name} (attacked)" for name in attacked])
    rows, judged = [], read_judged(output / "judged.json")
    for name, options in chosen.items():
        protect_folder(options, originals, output / "protected" / name, say=print)
        folder = output / "protected" / name / f"budget_{options.attack_budget}"
        manifest = json.loads((folder / "manifest.json").read_text())
        for output_name, entry in sorted(manifest["outputs"].items()):
            source = Path(entry["source"])
            key = "|".join((name, sha256_of(originals / source.name), sha256_of(folder / output_name), judged_by,
                            str(args.max_size)))
            if key not in judged:
                judged[key] = checked(checker, name, originals / source.name, folder / output_name, entry["seconds"])
                write_judged(output / "judged.json", judged)
            rows += judged[key]
            write_csv(rows, output / "portraits.csv")
    text = report_table(rows, configs, judges, attacked, args)
    atomic_write(output / "portraits.md", lambda tmp: tmp.write_text(text))
    if args.results:
        write_results(args.results, "Does the page's protection hold on whole photos?", text,
                      "evaluation.benchmarks.portraits", argv, [device])
    print(text)
    return 0


def checked(checker: Checker, config: str, original_path: Path, protected_path: Path, seconds: float) -> list[dict]:
    """The check's verdict on one protected photo: a row per way of sharing and judge, each with the attacked
    models' similarity in that way of sharing (the checker's watched models)."""
    original, protected = load_image(original_path), load_image(protected_path)
    report = checker(original, protected)
    attacked = {}
    for result in report["watched"]:
        attacked.setdefault(result["sharing"], []).append(f"{result['similarity']}")
    flat_mean, flat_max = flat_change(pil_to_tensor(protected), pil_to_tensor(original))
    return [{"config": config, "photo": original_path.stem, "size": f"{original.width}x{original.height}",
             "sharing": result["sharing"], "judge": result["judge"], "similarity": result["similarity"],
             "verdict": result["verdict"], "protected": report["summary"][result["sharing"]] == "not recognised",
             "attacked": ",".join(attacked[result["sharing"]]),
             "psnr": report["psnr"], "flat_mean": flat_mean.item(), "flat_max": flat_max.item(), "seconds": seconds}
            for result in report["results"]]


def report_table(rows: list[dict], configs: dict[str, str], judges: list, attacked: list[str],
                 args: argparse.Namespace) -> str:
    sharings = list(dict.fromkeys(r["sharing"] for r in rows))
    names = [j.name for j in judges]
    budget = budget_in_255(resolve("facelock", preset="small").attack_budget)
    lines = [f"FaceLock with `--preset small` (budget {budget} where a config's flags do not set one) at each photo's "
             f"own size, judged by `evaluation.check` (TAESD round trip at up to {args.max_size} px; judges "
             + ", ".join(
                 f"{j.name} {j.calibration.threshold:.3f}" for j in judges if j.calibration is not None)
             + " at 1 % FAR). Protected: no judge recognises the face. Attacked: the similarity of each face model "
             "some config attacks, judged the same way without a verdict.", "",
             "| config | flags | photo | size | protected: " + " / ".join(sharings) + " | "
             + " / ".join(f"{n} ({', '.join(sharings)})" for n in names) + " | attacked: "
             + " / ".join(f"{n} ({', '.join(sharings)})" for n in attacked) + " | PSNR (dB) "
             "| flat: mean / largest (/255) | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config, extra in configs.items():
        mine = [r for r in rows if r["config"] == config]
        for photo in dict.fromkeys(r["photo"] for r in mine):
            here = [r for r in mine if r["photo"] == photo]
            verdicts = " / ".join("yes" if next(r for r in here if r["sharing"] == s)["protected"] else "no"
                                  for s in sharings)
            similarities = " / ".join(", ".join(_similarity(r["similarity"]) for s in sharings for r in here
                                                if r["sharing"] == s and r["judge"] == n) for n in names)
            first = here[0]
            watched = [next(r for r in here if r["sharing"] == s)["attacked"].split(",") for s in sharings]
            scores = " / ".join(", ".join(_similarity(values[i]) for values in watched) for i in range(len(attacked)))
            lines.append(f"| {config} | `{extra or '(none)'}` | {photo} | {first['size']} | {verdicts} | "
                         f"{similarities} | {scores} | {first['psnr']} | {first['flat_mean']:.2f} / "
                         f"{first['flat_max']:.0f} | {first['seconds']:.0f} |")
        counts = [sum(next(r for r in mine if r["photo"] == p and r["sharing"] == s)["protected"]
                      for p in dict.fromkeys(r["photo"] for r in mine)) for s in sharings]
        photos = len(dict.fromkeys(r["photo"] for r in mine))
        lines.append(f"| {config} | | **all** | | **" + " / ".join(f"{c} of {photos}" for c in counts) + "** | | "
                     f"| {np.mean([r['psnr'] for r in mine if r['psnr'] is not None]):.1f} | | |")
    lines.append("")
    return "\n".join(lines)


def _similarity(value: float | str | None) -> str:
    """A similarity as the table shows it: a number (or the text the CSV row keeps) to three places, n/a for none."""
    return "n/a" if value in (None, "None") else f"{float(value):.3f}"


if __name__ == "__main__":
    run_script(main)
