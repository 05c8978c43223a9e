"""Edit every photo in a folder with every prompt, as the paper's evaluation does.

    python main_edit.py --src_dir protected/budget_0.03 --edit_dir edits/facelock --seed 0

Writes `edit_dir/seed{S}/prompt{i}/<name>.png` (the layout the evaluation scripts walk) and
`edit_dir/seed{S}/manifest.json` with the model, prompts, seeds and parameters. Every edit has its own seed,
derived from the run seed, the prompt index and the image name, so `edit.py --prompt_index i --seed S` reproduces
any single edit. A rerun skips finished edits; a bad file is reported at the end without stopping the others.
`accelerate launch main_edit.py ...` splits the work between processes.

With `--protect_identity` the edits in `edit_dir` are protected against face recognition (Flux-Guard) and the
unprotected ones go to `--clean_edit_dir` (default `edit_dir/clean`) in the same layout, so that
`evaluation.evaluate --clean_edit_dir edit_dir/clean --defend_edit_dirs edit_dir` compares them; the manifest
records, per edit, the similarity of both to the source face by the protection's face model(s), the steps, the
last losses and weights, the L-infinity distance and PSNR between them, and seconds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edit import add_edit_arguments, edit_images, edit_seed, load_editor, load_guard, parse_args, protect_edit_images
from evaluation.batch import BatchRun
from methods.faces import NoFaceError
from methods.progress import progress_bar
from utils import (
    InputError,
    UserError,
    list_images,
    loaded_batches,
    read_prompts,
    run_script,
    same_file,
    save_png,
)

logger = logging.getLogger("main_edit")
#: Parameters that decide the edits; a folder made with other values is refused.
DEFINING = ("model", "model_id", "vae", "guidance_scale", "image_guidance_scale", "strength", "num_inference_steps",
            "prompt_list", "max_size", "protect_identity", "fr_model", "fr_combine", "identity_target", "guard_budget",
            "guard_norm", "guard_steps", "guard_iterations", "guard_lr", "guard_refine", "guard_perceptual",
            "guard_perceptual_weight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_dir", required=True, help="folder of photos to edit (e.g. protected/budget_0.03)")
    parser.add_argument("--edit_dir", required=True, help="folder for the edits (seed{S}/prompt{i}/ inside)")
    parser.add_argument("--prompt_indices", help="edit with these prompts only, e.g. 0,13,19 (default: all)")
    parser.add_argument("--batch_size", type=int, default=1, help="same-size photos edited per pipeline call")
    parser.add_argument("--clean_edit_dir", help="with --protect_identity, the folder for the unprotected edits "
                                                 "(default: edit_dir/clean)")
    add_edit_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, loader: Callable = load_editor) -> int:
    """`loader(args, device, progress)` gives the pipeline (evaluation.table1 passes one that loads it once for
    every folder it edits)."""
    args = parse_args(build_parser(), argv)
    src_dir, folder = Path(args.src_dir), Path(args.edit_dir) / f"seed{args.seed}"
    if not src_dir.is_dir():
        raise UserError(f"--src_dir {src_dir} is not a folder")
    if same_file(src_dir, Path(args.edit_dir)) or same_file(src_dir, folder):
        raise UserError("--edit_dir must not be the source folder")
    clean_folder = None
    if args.protect_identity:
        clean_folder = Path(args.clean_edit_dir or Path(args.edit_dir) / "clean") / f"seed{args.seed}"
        if same_file(clean_folder, folder) or same_file(src_dir, clean_folder.parent):
            raise UserError("--clean_edit_dir must differ from --edit_dir and the source folder")
    args.prompt_list = read_prompts(args.prompts)
    indices = range(len(args.prompt_list))
    if args.prompt_indices:
        try:
            indices = sorted({int(i) for i in args.prompt_indices.split(",")})
        except ValueError:
            raise UserError(f"--prompt_indices takes comma-separated numbers, got {args.prompt_indices!r}") from None
        if indices[0] < 0 or indices[-1] >= len(args.prompt_list):
            raise UserError(f"--prompt_indices must lie in 0..{len(args.prompt_list) - 1}")
    sources = list_images(src_dir)
    if not sources:
        raise UserError(f"no images in {src_dir}")

    run = BatchRun(folder, vars(args), DEFINING, args.overwrite, device=args.device)
    names: dict[str, Path] = {}
    for source in sources:
        if source.stem in names:
            run.fail(str(source), f"same output name as {names[source.stem].name}")
        else:
            names[source.stem] = source
    outputs = [folder] + ([clean_folder] if clean_folder else [])
    work = [(i, source) for i in indices for source in names.values()
            if args.overwrite or not all((f / f"prompt{i}" / f"{source.stem}.png").exists() for f in outputs)]
    total = len(indices) * len(names)
    if run.is_main:
        processes = f" in {run.num_processes} processes" if run.num_processes > 1 else ""
        print(f"{len(names)} images x {len(indices)} prompts in {folder}: {total - len(work)} edits already done, "
              f"{len(work)} to do{processes}")
    mine = run.mine(work)
    pipe = loader(args, run.device, progress=False) if mine else None
    guard, target = load_guard(args, run.device, progress=False) if mine and args.protect_identity else (None, None)

    bar = progress_bar(total=len(mine), desc="edits", unit="edit", disable=not run.is_main)
    bad: set[Path] = set()

    def fail(source: Path, error: InputError) -> None:
        bad.add(source)
        run.fail(str(source), str(error))
        bar.update(1)

    for i in indices:
        bar.update(sum(1 for j, s in mine if j == i and s in bad))
        todo = [s for j, s in mine if j == i and s not in bad]
        for batch in loaded_batches(todo, lambda source: source, args.batch_size, fail):
            seeds = [edit_seed(args.seed, i, source.stem) for source, _ in batch]
            count = len(batch)
            while batch:
                images = [image for _, image in batch]
                try:
                    if guard is None:
                        edited = edit_images(pipe, args, images, args.prompt_list[i], seeds)
                    else:
                        edited, cleans, records = protect_edit_images(pipe, guard, args, images,
                                                                      args.prompt_list[i], seeds, target)
                except NoFaceError as error:  # the others of the batch are edited without it
                    for k in error.missing:
                        bad.add(batch[k][0])
                        run.fail(str(batch[k][0]), "no face found; --protect_identity protects a face")
                    batch = [pair for k, pair in enumerate(batch) if k not in error.missing]
                    seeds = [seed for k, seed in enumerate(seeds) if k not in error.missing]
                    continue
                except RuntimeError as error:  # e.g. out of memory on a large photo
                    logger.exception("editing %s failed", ", ".join(str(s) for s, _ in batch))
                    for source, _ in batch:
                        run.fail(f"prompt{i}/{source.name}", f"{type(error).__name__}: {str(error).splitlines()[0]}")
                else:
                    for k, ((source, _), image) in enumerate(zip(batch, edited)):
                        if guard is not None:
                            save_png(np.asarray(cleans[k]), clean_folder / f"prompt{i}" / f"{source.stem}.png")
                            run.record(f"prompt{i}/{source.stem}.png", {"seed": seeds[k], **records[k]})
                        save_png(np.asarray(image.convert("RGB")), folder / f"prompt{i}" / f"{source.stem}.png")
                break
            run.save()
            bar.update(count)
    bar.close()

    if run.finish() is None:
        return 0
    done = sum(all((f / f"prompt{i}" / f"{s.stem}.png").exists() for f in outputs) for i, s in work)
    return run.report(f"edited {done}, already done {total - len(work)} (seed {args.seed})", folder)


if __name__ == "__main__":
    run_script(main)
