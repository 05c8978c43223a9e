"""Run metrics over folders of edits and write their tables; shared by every evaluation script.

Each edit is loaded once for all metrics, each source photo is embedded once for all prompts and methods, and
edits are scored in batches of one image size.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from methods.progress import progress_bar
from utils import (
    UserError,
    atomic_write,
    batches_by_size,
    image_size,
    load_image,
    pick_device,
    pil_to_tensor,
    read_prompts,
    write_csv,
    write_json,
)

from .metrics.base import CleanMetric, Metric, SourceMetric, nanmean
from .metrics.clip_score import ClipEmbedder, ClipI, ClipS
from .metrics.facial import FaceSimilarity, HeldOutFaceSimilarity
from .metrics.perceptual import LPIPS
from .metrics.protection import ProtectionSuccess
from .metrics.psnr import PSNR
from .metrics.ssim import SSIM
from .walker import EditSet, edit_sets, images_by_name, pair_by_name

logger = logging.getLogger(__name__)

#: Every metric by key: the paper's six in its order, the protection success rate, and FR by a held-out face model
#: (evaluation.table1).
METRIC_CLASSES = {cls.key: cls for cls in (PSNR, SSIM, LPIPS, ClipS, ClipI, FaceSimilarity, ProtectionSuccess,
                                           HeldOutFaceSimilarity)}
#: The paper's metrics, computed by default; the others on request (--metrics).
METRIC_KEYS = ("psnr", "ssim", "lpips", "clip_s", "clip_i", "fr")
EXTRA_KEYS = ("psr",)


@dataclass
class Results:
    """Scores by metric, edit set, prompt and image name, and what could not be paired."""

    metrics: list[Metric]
    scores: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(dict))))
    missing: dict = field(default_factory=lambda: defaultdict(list))

    def labels(self, metric: Metric) -> list[str]:
        return list(self.scores[metric.key])

    def summary(self, metric: Metric, label: str) -> dict:
        """mean (over the per-prompt means, as the FaceLock code), std (over the images), counts, per-prompt means."""
        by_prompt = self.scores[metric.key][label]
        values = np.array([v for prompt in by_prompt.values() for v in prompt.values()], dtype=np.float64)
        scored = values[~np.isnan(values)]
        means = {f"prompt{i}": nanmean(list(by_prompt[i].values())) for i in sorted(by_prompt)}
        return {"method": label, "mean": nanmean(list(means.values())),
                "std": float(np.std(scored)) if len(scored) else float("nan"), "scored": int(len(scored)),
                "unscored": int(np.isnan(values).sum()), "missing": len(self.missing[label]), **means}


def evaluate(metrics: Sequence[Metric], sets: Sequence[EditSet], prompts: Sequence[str], src_dir: Path | None = None,
             clean: EditSet | None = None, batch_size: int = 8, progress: bool = True,
             prompt_indices: Sequence[int] | None = None) -> Results:
    """Score every edit of `sets` (and of `clean`, for the metrics that compare with the source), of every prompt
    folder or of `prompt_indices` only."""
    results = Results(list(metrics))
    clean_metrics = [m for m in metrics if isinstance(m, CleanMetric)]
    source_metrics = [m for m in metrics if isinstance(m, SourceMetric)]
    if clean_metrics and clean is None:
        titles = ", ".join(m.title for m in clean_metrics)
        raise UserError(f"{titles} compare with the clean edits: pass --clean_edit_dir")
    sources = images_by_name(Path(src_dir)) if source_metrics else {}
    if source_metrics and not sources:
        raise UserError(f"no source images in {src_dir}")
    todo = ([(clean, [], source_metrics)] if clean is not None and source_metrics else [])
    todo += [(edit_set, clean_metrics, source_metrics) for edit_set in sets]
    for edit_set, with_clean, with_source in todo:
        prompt_dirs = {i: folder for i, folder in edit_set.prompt_dirs().items()
                       if prompt_indices is None or i in prompt_indices}
        if not prompt_dirs:
            raise UserError(f"{edit_set.root} has no prompt{{i}}/ folders")
        for i, folder in prompt_dirs.items():
            if i >= len(prompts):
                raise UserError(f"{folder}: prompt index {i} is beyond the {len(prompts)} prompts (see --prompts)")
            edits = images_by_name(folder)
            cleans = images_by_name(clean.root / folder.name) if with_clean else {}
            if with_clean:
                _note_missing(results, edit_set.label, folder.name, pair_by_name(edits, cleans), "clean edit")
            if with_source:
                _note_missing(results, edit_set.label, folder.name, pair_by_name(edits, sources), "source")
            names = [n for n in sorted(edits) if (with_clean and n in cleans) or (with_source and n in sources)]
            for metric in with_source:
                metric.set_prompt(prompts[i])
            bar = progress_bar(total=len(names), desc=f"{edit_set.label} {folder.name}", leave=False,
                               disable=not progress)
            for batch in batches_by_size(names, lambda n: image_size(edits[n]), batch_size):
                _score_batch(results, edit_set.label, i, batch, edits, cleans, sources, with_clean, with_source)
                bar.update(len(batch))
            bar.close()
    return results


def _note_missing(results: Results, label: str, prompt: str, pairing, reference: str) -> None:
    results.missing[label] += [f"{prompt}/{name}" for name in pairing.missing]
    results.missing[label] += [f"{prompt}/{name} (no {reference})" for name in pairing.unmatched]


def _score_batch(results: Results, label: str, prompt: int, names: list[str], edits: dict, cleans: dict,
                 sources: dict, clean_metrics: list[CleanMetric], source_metrics: list[SourceMetric]) -> None:
    """Score one batch of same-size edits with every metric; an unreadable file is noted as missing."""

    def read(path: Path, what: str) -> torch.Tensor | None:
        try:
            return pil_to_tensor(load_image(path))
        except UserError as error:
            results.missing[label].append(f"prompt{prompt}/{what} ({error})")
            return None

    loaded = {n: t for n in names if (t := read(edits[n], n)) is not None}
    if not loaded:
        return
    names = list(loaded)
    batch = torch.cat(list(loaded.values()))
    if clean_metrics:
        references = {}
        for k, name in enumerate(names):
            reference = read(cleans[name], f"{name}'s clean edit") if name in cleans else None
            if reference is not None and reference.shape != batch[k:k + 1].shape:
                results.missing[label].append(f"prompt{prompt}/{name} (size differs from its clean edit)")
            elif reference is not None:
                references[k] = reference
        if references:
            ks = list(references)
            for metric in clean_metrics:
                for k, value in zip(ks, metric.score(batch[ks], torch.cat(list(references.values()))).tolist()):
                    results.scores[metric.key][label][prompt][names[k]] = value
    for metric in source_metrics:
        ks = []
        for k, name in enumerate(names):
            if name in sources and name not in metric.sources:
                source = read(sources[name], f"{name}'s source")
                if source is None:
                    continue
                metric.add_sources([name], source)
            if name in metric.sources:
                ks.append(k)
        if ks:
            for k, value in zip(ks, metric.score(batch[ks], [names[k] for k in ks]).tolist()):
                results.scores[metric.key][label][prompt][names[k]] = value


# ------------------------------------------------------------------------------------------------- output

def _cell(value: float, digits: int = 4) -> str:
    return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.{digits}f}")


def markdown(results: Results) -> str:
    """The combined table (mean ± std per metric) and one per-prompt table per metric."""
    labels = list(dict.fromkeys(label for m in results.metrics for label in results.labels(m)))
    lines = ["| method | " + " | ".join(m.heading() for m in results.metrics) + " |",
             "|---|" + "---|" * len(results.metrics)]
    for label in labels:
        cells = []
        for metric in results.metrics:
            if label in results.scores[metric.key]:
                s = results.summary(metric, label)
                cells.append(f"{_cell(s['mean'])} ± {_cell(s['std'])}")
            else:
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    arrows = ", ".join(m.heading() for m in results.metrics)
    lines += ["", f"Arrows point the way a stronger defense moves each metric ({arrows}). Mean over the per-prompt "
                  "means, ± the standard deviation over images."]
    for metric in results.metrics:
        rows = [results.summary(metric, label) for label in results.labels(metric)]
        if not rows:
            continue
        prompts = [k for k in rows[0] if k.startswith("prompt")]
        lines += ["", f"### {metric.heading()} per prompt", "",
                  "| method | mean | std | scored | unscored | missing | " + " | ".join(prompts) + " |",
                  "|---|" + "---|" * (5 + len(prompts))]
        for r in rows:
            lines.append(f"| {r['method']} | {_cell(r['mean'])} | {_cell(r['std'])} | {r['scored']} | "
                         f"{r['unscored']} | {r['missing']} | " + " | ".join(_cell(r.get(p, float('nan')), 3)
                                                                            for p in prompts) + " |")
    return "\n".join(lines) + "\n"


def write(results: Results, output: Path, name: str, preamble: str = "") -> str:
    """Write `<metric>.csv` (summary per method), `<metric>_per_image.csv` and `<name>.md` (after `preamble`);
    return the markdown."""
    for metric in results.metrics:
        rows = [results.summary(metric, label) for label in results.labels(metric)]
        write_csv(rows, output / f"{metric.key}.csv", None if rows else ["method"])
        per_image = [{"method": label, "prompt": prompt, "image": image, metric.key: value}
                     for label, by_prompt in results.scores[metric.key].items()
                     for prompt, by_name in sorted(by_prompt.items()) for image, value in sorted(by_name.items())]
        write_csv(per_image, output / f"{metric.key}_per_image.csv", ["method", "prompt", "image", metric.key])
    write_json({label: names for label, names in results.missing.items()}, output / f"{name}_missing.json")
    text = preamble + markdown(results)
    atomic_write(output / f"{name}.md", lambda tmp: tmp.write_text(text))
    return text


# -------------------------------------------------------------------------------------------------- CLI

def build_parser(keys: Sequence[str], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    needs_source = any(k in ("clip_s", "clip_i", "fr") for k in keys)
    needs_clean = any(k in ("psnr", "ssim", "lpips") for k in keys)
    if needs_source:
        parser.add_argument("--src_dir", required=True, help="the source photos that were edited")
    parser.add_argument("--clean_edit_dir", required=needs_clean and not needs_source,
                        help="edits of the unprotected photos (needed by PSNR, SSIM and LPIPS; with CLIP and FR "
                             "metrics they are also scored, as the row 'clean')")
    parser.add_argument("--defend_edit_dirs", required=True, nargs="+",
                        help="edits of protected photos, one folder per method (seed{S}/ or budget_*/seed{S}/ inside)")
    parser.add_argument("--seed", required=True, type=int, help="the editing seed to evaluate")
    parser.add_argument("--output", required=True, help="folder for the CSV files and the markdown table")
    parser.add_argument("--prompts", help="the prompts file the edits were made with (default: the paper's 25)")
    parser.add_argument("--batch_size", type=int, default=8, help="edits scored per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    if "clip_s" in keys or "clip_i" in keys:
        parser.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="CLIP hub id or folder")
    if "fr" in keys:
        parser.add_argument("--fr_model", default="facenet",
                            help="face model judging identity: facenet, sface, mobilefacenet, mobileface, adaface "
                                 "(runs code from its hub repository) or an .onnx path (psr with --psr_gallery: a "
                                 "comma-separated list scores the gallery PSR by each)")
        parser.add_argument("--fr_landmarks", default="detect", choices=["detect", "source"],
                            help="find the face in each edit again (default) or crop where the source's face was")
        parser.add_argument("--far", type=float, default=0.01,
                            help="psr: false-accept rate at which --fr_model's threshold is calibrated")
        parser.add_argument("--calibration_faces",
                            help="psr: labelled photos to calibrate the threshold on (a labels.csv or one folder per "
                                 "person; default: --psr_gallery if given, else $FACELOCK_ASSETS/faces)")
        parser.add_argument("--fr_threshold", type=float,
                            help="psr: use this similarity threshold instead of calibrating one")
        parser.add_argument("--psr_gallery",
                            help="psr: also FaceCloak's identification PSR (top-1, top-5 and verification against "
                                 "this gallery of labelled clean photos: labels.csv or one folder per person); edits "
                                 "are named after their source photo there")
        parser.add_argument("--psr_distractors", help="psr with --psr_gallery: photos of other people added to it")
    return parser


def build_metrics(keys: Sequence[str], args: argparse.Namespace, device: torch.device) -> list[Metric]:
    """Load each model once, shared by the metrics that use it."""
    from methods.models.loading import load_face_identity, load_perceptual

    metrics: list[Metric] = []
    embedder = identity = None
    for key in keys:
        if key == "psnr":
            metrics.append(PSNR())
        elif key == "ssim":
            metrics.append(SSIM())
        elif key == "lpips":
            metrics.append(LPIPS(load_perceptual("vgg", device)))
        elif key in ("clip_s", "clip_i"):
            embedder = embedder or load_clip(args.clip_model, device)
            metrics.append((ClipS if key == "clip_s" else ClipI)(embedder))
        elif key in ("fr", "psr"):
            identity = identity or load_face_identity(args.fr_model, device)
            if key == "fr":
                metrics.append(FaceSimilarity(identity, reuse_landmarks=args.fr_landmarks == "source"))
            else:
                threshold = args.fr_threshold if args.fr_threshold is not None else fr_threshold(identity, args, device)
                metrics.append(ProtectionSuccess(identity, threshold, reuse_landmarks=args.fr_landmarks == "source"))
                if args.psr_gallery:
                    metrics += gallery_psr_metrics(identity, args)
    return metrics


def gallery_psr_metrics(identity, args: argparse.Namespace) -> list[Metric]:
    """FaceCloak's identification PSR of the edits (top-1, top-5 and verification) by each face model of
    `--fr_model` against `--psr_gallery`, at `--fr_threshold`, or at `--far` on `--calibration_faces` (default: the
    gallery's own pairs, as `fr_threshold`)."""
    from .metrics.psr import KINDS, GalleryPSR, Probes, by_name, load_gallery

    models, detector = by_name(identity)
    distractors = Path(args.psr_distractors) if args.psr_distractors else None
    calibration = Path(args.calibration_faces) if args.calibration_faces else None
    gallery, _ = load_gallery(Path(args.psr_gallery), models, detector, args.far, distractors, calibration)
    if args.fr_threshold is not None:
        gallery.thresholds = {model: args.fr_threshold for model in models}
    probes = Probes(gallery, models, detector)
    return [GalleryPSR(probes, model, kind) for model in models for kind in KINDS]


def fr_threshold(identity, args: argparse.Namespace, device: torch.device) -> float:
    """The threshold of the face model at `--far`, calibrated on `--calibration_faces` (default: `--psr_gallery`,
    else the offline assets' faces)."""
    from .calibration import calibrate, default_faces, labelled_photos

    try:
        chosen = args.calibration_faces or args.psr_gallery
        faces = Path(chosen) if chosen else default_faces()
    except UserError:
        raise UserError("psr needs --fr_model's threshold: pass --calibration_faces (labelled photos), "
                        "--fr_threshold, or set FACELOCK_ASSETS to a folder holding faces/") from None
    result = calibrate(identity, labelled_photos(faces), args.far, device)
    logger.info("psr: %s threshold %.3f at FAR %s (%d different-person pairs in %s)", args.fr_model,
                result.threshold, args.far, result.impostor_pairs, faces)
    return result.threshold


def load_clip(name: str, device: torch.device):
    from transformers import CLIPModel, CLIPProcessor

    from methods.models.loading import load_pretrained

    model = load_pretrained(CLIPModel.from_pretrained, name, f"the CLIP model {name}")
    processor = load_pretrained(CLIPProcessor.from_pretrained, name, f"the CLIP processor of {name}",
                                marker="tokenizer_config.json")
    return ClipEmbedder(model.to(device), processor)


def cli(keys: Sequence[str], description: str, argv: Sequence[str] | None = None, name: str | None = None) -> int:
    """Parse, load the models, evaluate, write `--output`, print the table."""
    parser = build_parser(keys, description)
    allowed = list(keys) + ([k for k in EXTRA_KEYS if "fr" in keys] if name is None else [])
    if name is None:
        parser.add_argument("--metrics", default=",".join(keys),
                            help=f"comma-separated subset of {','.join(allowed)} (psr: the protection success rate, "
                                 f"the fraction of edits --fr_model no longer matches to the source at its --far "
                                 f"threshold)")
    args = parser.parse_args(argv)
    chosen = list(keys) if name else [k.strip() for k in args.metrics.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"--metrics takes a comma-separated subset of {','.join(allowed)}, got {args.metrics!r}")
    if any(k in ("psnr", "ssim", "lpips") for k in chosen) and not args.clean_edit_dir:
        parser.error("PSNR, SSIM and LPIPS compare with the clean edits: pass --clean_edit_dir")
    sets = [s for folder in args.defend_edit_dirs for s in edit_sets(folder, args.seed)]
    clean = edit_sets(args.clean_edit_dir, args.seed, label="clean")[0] if args.clean_edit_dir else None
    device = pick_device(args.device)
    metrics = build_metrics(chosen, args, device)
    results = evaluate(metrics, sets, read_prompts(args.prompts), src_dir=getattr(args, "src_dir", None),
                       clean=clean, batch_size=args.batch_size)
    text = write(results, Path(args.output), name or "results")
    print(text)
    for label, missing in results.missing.items():
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            print(f"{label}: {len(missing)} edits missing or unpaired: {shown}")
    print(f"tables written to {args.output}")
    return 0
