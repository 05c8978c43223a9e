"""The FaceLock paper's Table 1 in one command: protect, edit, score, tabulate, report.

    python -m evaluation.table1 --image_dir photos/ --output_dir table1/ [--methods encoder,editshield,facelock]

For a folder of face photos and a list of methods, it protects the photos with each method (main_defend.py),
edits the clean photos and every protected folder with the paper's prompts (main_edit.py), scores every edit with
the six metrics plus FR by a face model no protection attacked (evaluation.runner), and writes the paper's table
(mean ± std, arrows), the per-prompt CSVs and the HTML report (evaluation.report):

    output_dir/photos/                                   the photos used (links; --limit takes the first by name)
    output_dir/protected/<method>/budget_<b>/            protected photos and manifest.json
    output_dir/edits/clean/seed<S>/prompt<i>/            edits of the clean photos
    output_dir/edits/<method>/budget_<b>/seed<S>/...     edits of each method's protected photos
    output_dir/results/table1.md, <metric>.csv, <metric>_per_image.csv
    output_dir/report/index.html, grid_<photo>.png

Every stage resumes: finished protections and edits are skipped without loading their models, and the scores
and the report are recomputed only when an edit or a scoring option changed. Each stage loads its models once
(one protection method at a time; one editor for every folder; the metric models for every method).
`accelerate launch -m evaluation.table1 ...` splits protection and editing between processes (one per GPU), as
main_defend.py and main_edit.py do; the main process scores and reports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
from pathlib import Path
from typing import Callable, Sequence

import methods
from methods.models.loading import EDITOR_ID_HELP, EDITOR_IDS, load_face_identity
from methods.pipeline.editing import edit_flags, edit_folder, load_editor, prompt_indices, resolve_edit
from methods.pipeline.options import budget_in_255, flags, resolve
from methods.pipeline.protect import output_folder, protect_folder
from utils import IMAGE_EXTENSIONS, UserError, list_images, pick_device, read_prompts, run_script, same_file, write_json

from . import report
from .metrics.facial import HeldOutFaceSimilarity
from .runner import METRIC_KEYS, build_metrics, evaluate, write
from .walker import EditSet

#: The rows: the paper's baselines this toolkit has, PhotoGuard's diffusion attack, and FaceLock.
DEFAULT_METHODS = "encoder,vae,cw,editshield,diffusion,facelock"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", required=True, help="the face photos (e.g. CelebA-HQ)")
    parser.add_argument("--output_dir", required=True, help="folder for every stage's outputs")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated protection methods, one row each")
    parser.add_argument("--limit", type=int, default=0, help="use the first N photos by name (0: all)")
    parser.add_argument("--prompt_indices", help="edit with these prompts only, e.g. 0,13 (default: all)")
    parser.add_argument("--prompts", help="file with one prompt per line (default: the paper's 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the protections and of the edits")

    protect = parser.add_argument_group("protection (main_defend.py's defaults where not given)")
    protect.add_argument("--preset", help="official, paper or small")
    protect.add_argument("--attack_budget", type=float, help="L-infinity budget in [-1, 1] units (paper: 0.02)")
    protect.add_argument("--step_size", type=float, help="PGD step size")
    protect.add_argument("--num_iters", type=int, help="attack iterations (every method's; paper: 100)")
    protect.add_argument("--attack_fr_model", help="facelock's face model(s) (main_defend.py's --fr_model)")
    protect.add_argument("--defend_args", default="",
                         help='further main_defend.py options for every method, e.g. --defend_args="--eot jpeg"')

    editor = parser.add_argument_group("editing (main_edit.py's defaults where not given); also the editor the "
                                       "protections attack")
    editor.add_argument("--model", default="instruct-pix2pix", choices=list(EDITOR_IDS), help="the editor")
    editor.add_argument("--model_id", help=EDITOR_ID_HELP)
    editor.add_argument("--num_inference_steps", type=int, help="denoising steps of the edits (50)")
    editor.add_argument("--guidance_scale", type=float, help="text guidance (7.5), also the diffusion attack's")
    editor.add_argument("--image_guidance_scale", type=float, help="image guidance (1.5), also the diffusion attack's")
    editor.add_argument("--strength", type=float, help="img2img strength (0.5), also the diffusion attack's")
    editor.add_argument("--edit_args", default="", help="further main_edit.py options, e.g. --edit_args=\"--vae X\"")

    scoring = parser.add_argument_group("scoring and report")
    scoring.add_argument("--metrics", default=",".join(METRIC_KEYS), help="comma-separated subset of the six")
    scoring.add_argument("--fr_model", default="facenet", help="face model of the FR metric (the paper's column)")
    scoring.add_argument("--heldout_fr_model", default="sface",
                         help="face model of the extra FR column, one no protection attacked ('none': no column)")
    scoring.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="CLIP hub id or folder")
    scoring.add_argument("--report_prompts", help="prompts shown in the report's grids (default: the first three)")
    scoring.add_argument("--report_images", type=int, default=4, help="photos shown in the report")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    hardware.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="model weights")
    hardware.add_argument("--batch_size", type=int, default=1, help="photos per forward pass (protection, editing)")
    hardware.add_argument("--max_size", type=int, help="protect and edit larger photos at this long side")
    return parser


def given(**options) -> dict:
    """The options that are not None."""
    return {name: value for name, value in options.items() if value is not None}


def select_photos(sources: list[Path], folder: Path, limit: int) -> list[Path]:
    """Make `folder` hold exactly the photos used, the first `limit` of `sources` (all for 0): links to them, or
    copies where links cannot be made."""
    chosen = {source.name: source for source in (sources[:limit] if limit else sources)}
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        stale = entry.name not in chosen or (entry.is_symlink() and entry.resolve() != chosen[entry.name].resolve())
        if stale and (entry.is_symlink() or entry.is_file()):
            entry.unlink()
    for name, source in chosen.items():
        target = folder / name
        if not target.exists():
            try:
                target.symlink_to(source.resolve())
            except OSError:
                shutil.copy2(source, target)
    return list(chosen.values())


def once(load: Callable) -> Callable:
    """The editor loader main_edit.py calls for each folder, loading the pipeline only the first time."""
    cache: dict = {}

    def loader(options, device, progress: bool = True):
        key = (options.model, options.model_id, options.vae, options.dtype, str(device), options.attention_slicing,
               options.cpu_offload)
        if key not in cache:
            cache.clear()
            cache[key] = load(options, device, progress=progress)
        return cache[key]

    return loader


def fingerprint(parameters: dict, folders: Sequence[Path]) -> str:
    """A digest of `parameters` and of every image under `folders` (path, size, modification time)."""
    files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for folder in folders if folder.is_dir()
                   for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    text = json.dumps({"parameters": parameters, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def up_to_date(record: Path, digest: str, *outputs: Path) -> bool:
    return (record.is_file() and json.loads(record.read_text()).get("fingerprint") == digest
            and all(output.is_file() for output in outputs))


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate import PartialState

    args = build_parser().parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(methods.METHODS))
    if unknown or not names or len(set(names)) < len(names):
        raise UserError(f"--methods takes different names of {', '.join(methods.METHODS)}; got {args.methods!r}")
    args.metric_keys = metric_keys = [k.strip() for k in args.metrics.split(",") if k.strip()]
    if not metric_keys or set(metric_keys) - set(METRIC_KEYS):
        raise UserError(f"--metrics takes a subset of {','.join(METRIC_KEYS)}; got {args.metrics!r}")
    image_dir, output = Path(args.image_dir), Path(args.output_dir)
    photos = output / "photos"
    if not image_dir.is_dir():
        raise UserError(f"--image_dir {image_dir} is not a folder")
    if same_file(image_dir, photos):
        raise UserError(f"--image_dir is {photos}, the run's own copy of the photos; point it at the originals")
    sources = list_images(image_dir)
    if not sources:
        raise UserError(f"no images in {image_dir}")
    prompts = read_prompts(args.prompts)

    # protection and edits: each process does its share (the folder jobs split and wait for each other)
    common = given(seed=args.seed, target_model=args.model, model_id=args.model_id, preset=args.preset,
                   attack_budget=args.attack_budget, step_size=args.step_size, num_iters=args.num_iters,
                   fr_model=args.attack_fr_model, dtype=args.dtype, max_size=args.max_size, device=args.device)
    guidance = given(guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
                     strength=args.strength)
    resolved = {m: resolve(m, **{**common, **flags(shlex.split(args.defend_args), m),
                                 **(guidance if m == "diffusion" else {})}) for m in names}
    if "facelock" in names and args.heldout_fr_model in resolved["facelock"].fr_model.split(","):
        raise UserError(f"--heldout_fr_model {args.heldout_fr_model} is the model facelock attacks; choose another")
    edited = resolve_edit(**{**given(model=args.model, seed=args.seed, device=args.device, model_id=args.model_id,
                                     num_inference_steps=args.num_inference_steps, prompts=args.prompts,
                                     dtype=args.dtype, max_size=args.max_size), **guidance,
                             **edit_flags(shlex.split(args.edit_args))})
    shown = prompt_indices(args.prompt_indices, prompts)

    state = PartialState(cpu=args.device == "cpu")
    say = print if state.is_main_process else lambda *_: None
    if state.is_main_process:
        chosen = select_photos(sources, photos, args.limit)
        say(f"Table 1 on {len(chosen)} photos of {image_dir} ({', '.join(names)}); outputs in {output}")
    state.wait_for_everyone()
    status = 0
    folders = {}
    for m in names:
        say(f"\n== protecting with {m}")
        status |= protect_folder(resolved[m], photos, output / "protected" / m, batch_size=args.batch_size, say=say)
        folders[m] = output_folder(resolved[m], output / "protected" / m)
    loader = once(load_editor)
    edit_dirs = {"clean": (photos, output / "edits" / "clean")}
    edit_dirs.update({m: (folder, output / "edits" / m / folder.name) for m, folder in folders.items()})
    for label, (source, target) in edit_dirs.items():
        say(f"\n== editing {label} ({source})")
        status |= edit_folder(edited, source, target, indices=args.prompt_indices, batch_size=args.batch_size,
                              loader=loader, say=say)
    if not state.is_main_process:
        return status

    # scores, table and report: the main process
    seed_dir = f"seed{args.seed}"
    clean = EditSet("clean", edit_dirs["clean"][1] / seed_dir)
    sets = [EditSet(m, target / seed_dir) for m, (_, target) in edit_dirs.items() if m != "clean"]
    digest = score(args, photos, clean, sets, prompts, shown, output / "results",
                   setting(args, resolved, edited, shown, photos))
    make_report(args, photos, names, output, shown, digest)
    print(f"\ntable: {output / 'results' / 'table1.md'}; report: {output / 'report' / 'index.html'}")
    return status


def score(args: argparse.Namespace, photos: Path, clean: EditSet, sets: list[EditSet], prompts: list[str],
          shown: list[int], folder: Path, preamble: str) -> str:
    """Score every edit set and write the table and CSVs into `folder`, unless nothing changed since the last
    time; returns the digest of what was scored."""
    parameters = {"metrics": args.metric_keys, "fr_model": args.fr_model, "heldout_fr_model": args.heldout_fr_model,
                  "clip_model": args.clip_model, "prompts": prompts, "prompt_indices": shown,
                  "sets": [str(s.root) for s in sets]}
    digest = fingerprint(parameters, [photos, clean.root, *(s.root for s in sets)])
    if up_to_date(folder / "table1.json", digest, folder / "table1.md"):
        print(f"\n== scores up to date in {folder}")
        return digest
    print("\n== scoring")
    device = pick_device(args.device)
    metrics = build_metrics(args.metric_keys, argparse.Namespace(clip_model=args.clip_model, fr_model=args.fr_model,
                                                            fr_landmarks="detect"), device)
    if args.heldout_fr_model != "none":
        metrics.append(HeldOutFaceSimilarity(load_face_identity(args.heldout_fr_model, device)))
    results = evaluate(metrics, sets, prompts, src_dir=photos, clean=clean, prompt_indices=shown)
    print(write(results, folder, "table1", preamble=preamble))
    for label, missing in results.missing.items():
        if missing:
            print(f"{label}: {len(missing)} edits missing or unpaired, e.g. {missing[0]}")
    write_json({"fingerprint": digest, "parameters": parameters}, folder / "table1.json")
    return digest


def make_report(args: argparse.Namespace, photos: Path, names: list[str], output: Path, shown: list[int],
                digest: str) -> None:
    """The HTML report with the tables and the grids, unless the scores and its options are those of the last."""
    folder = output / "report"
    grids = args.report_prompts or ",".join(map(str, shown[:3]))
    report_digest = hashlib.sha256(f"{digest} {grids} {args.report_images}".encode()).hexdigest()
    if up_to_date(folder / "report.json", report_digest, folder / "index.html"):
        print(f"== report up to date: {folder / 'index.html'}")
        return
    print("\n== report")
    report.main(["--src_dir", str(photos), "--clean_edit_dir", str(output / "edits" / "clean"),
                 "--defend_edit_dirs", *(str(output / "edits" / m) for m in names),
                 "--protected_dirs", *(str(output / "protected" / m) for m in names), "--seed", str(args.seed),
                 "--prompt_indices", grids, "--images", str(args.report_images), "--results",
                 str(output / "results"), "--output", str(folder),
                 *(["--prompts", args.prompts] if args.prompts else [])])
    write_json({"fingerprint": report_digest}, folder / "report.json")


def setting(args: argparse.Namespace, resolved: dict, edited, prompts: Sequence[int],
            photos: Path) -> str:
    """The lines above the table: what was protected, edited and scored, and how."""
    protections = {m: f"budget {budget_in_255(a.attack_budget, a.norm)}, {a.num_iters} iterations"
                   for m, a in resolved.items()}
    if len(set(protections.values())) == 1:
        protected = f"every method at {next(iter(protections.values()))}"
    else:
        protected = "; ".join(f"{m} at {value}" for m, value in protections.items())
    guidance = (f"image guidance {edited.image_guidance_scale}" if edited.model == "instruct-pix2pix"
                else f"strength {edited.strength}")
    heldout = f" and {args.heldout_fr_model} (held out)" if args.heldout_fr_model != "none" else ""
    return (f"Table 1 on {len(list_images(photos))} photos: {protected}, against {edited.model} "
            f"({edited.model_id}); edits with {edited.num_inference_steps} steps, text guidance "
            f"{edited.guidance_scale}, {guidance}, seed {args.seed}, prompts {','.join(map(str, prompts))}; "
            f"FR by {args.fr_model}{heldout}.\n\n")


if __name__ == "__main__":
    run_script(main)
