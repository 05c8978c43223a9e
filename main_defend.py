"""Protect every photo in a folder against diffusion editing.

    python main_defend.py --image_dir photos/ --output_dir protected/ --defend_method facelock

Writes `output_dir/budget_{budget}/<name>.png` (the layout the editing and evaluation scripts read) and a
`manifest.json` beside the images with the parameters, seeds, package versions and, per image, the L-infinity
distance, PSNR and seconds. A rerun skips finished images (unless --overwrite); a bad file is reported at the end
without stopping the others. `accelerate launch main_defend.py ...` splits the files between processes.
"""

from __future__ import annotations

import argparse
import logging
import queue
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from defend import (
    add_protection_arguments,
    budget_in_255,
    build_attack,
    configure_backends,
    create_argparser,
    describe_attack,
    learn_mask,
    load_mask,
    mask_provenance,
    no_face_hint,
    parse_args,
    placements,
    protect_images,
)
from evaluation.batch import BackgroundWriter, BatchRun, prefetched
from methods.faces import NoFaceError
from methods.placement import Placement
from methods.progress import progress_bar
from utils import (
    UserError,
    derive_seed,
    list_images,
    loaded_batches,
    run_script,
    same_file,
    save_png,
)

logger = logging.getLogger("main_defend")


def output_folder(args: argparse.Namespace) -> Path:
    return Path(args.output_dir) / f"budget_{args.attack_budget}"


def plan(sources: list[Path], folder: Path, done: Callable[[Path], bool]
         ) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
    """Pair each source with its output `<stem>.png`; returns the pairs not `done` yet and the files refused."""
    pending, refused, claimed = [], {}, {}
    for source in sources:
        output = folder / f"{source.stem}.png"
        if output.name in claimed:
            refused[str(source)] = f"same output name as {claimed[output.name].name}"
            continue
        claimed[output.name] = source
        if done(output):
            continue
        pending.append((source, output))
    return pending, refused


def build_parser() -> argparse.ArgumentParser:
    parser = create_argparser(__doc__.split("\n\n")[0])
    parser.add_argument("--image_dir", required=True, help="folder of photos to protect")
    parser.add_argument("--output_dir", required=True, help="folder for the protected PNGs (in budget_*/)")
    parser.add_argument("--batch_size", type=int, default=1, help="same-size images protected per forward pass")
    add_protection_arguments(parser)
    return parser


#: Parameters that decide the result; a folder made with other values is refused.
DEFINING = ("defend_method", "preset", "attack_budget", "step_size", "num_iters", "targeted", "c", "lr", "seed",
            "target_model", "model_id", "vae", "fr_model", "fr_combine", "faces", "allow_no_face", "lpips", "target_fr",
            "eot", "eot_samples", "momentum", "input_diversity", "ti_kernel", "schedule", "max_size", "region",
            "bucket", "norm", "fidelity_weight", "diffusion_steps", "grad_reps", "guidance_scale",
            "image_guidance_scale", "strength", "attack_prompt", "mask", "gallery", "focus", "sticker_budget",
            "highpass_budget", "variations", "mask_size", "arc2face", "near", "mask_l2")
#: Where a facecloak run keeps the identity mask it learned, beside the outputs.
MASK_FILE = "facecloak_mask.safetensors"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)

    image_dir, folder = Path(args.image_dir), output_folder(args)
    if not image_dir.is_dir():
        raise UserError(f"--image_dir {image_dir} is not a folder")
    if same_file(image_dir, folder):
        raise UserError(f"the output folder {folder} is the input folder; choose another --output_dir")
    sources = list_images(image_dir)
    if not sources:
        raise UserError(f"no images in {image_dir}")

    run = BatchRun(folder, vars(args), DEFINING, args.overwrite, device=args.device)
    device = run.device
    # an output counts as finished once it is in the manifest: a file written just before a crash is redone
    pending, refused = plan(sources, folder, lambda output: not args.overwrite and output.exists()
                            and run.recorded(output.name))
    for source, reason in refused.items():
        run.fail(source, reason)
    finished = len(sources) - len(pending) - len(refused)
    mine = run.mine(pending)
    if run.is_main:
        print(f"{len(sources)} images in {image_dir}: {finished} already protected, {len(pending)} to do"
              + (f" in {run.num_processes} processes" if run.num_processes > 1 else "")
              + f"; output {folder}")
    configure_backends(args)
    learning = args.defend_method == "facecloak" and not args.mask and bool(pending)
    attack = build_attack(args, device, progress=run.is_main) if mine or (learning and run.is_main) else None
    if attack is not None and run.is_main:
        print(f"{describe_attack(args, attack)} on {device}")
    if learning or args.mask:
        run.manifest["mask"] = facecloak_mask(args, attack, sources, folder, run)

    bar = progress_bar(total=len(mine), desc="images", unit="img", disable=not run.is_main)
    unreadable: queue.SimpleQueue = queue.SimpleQueue()  # filled by the loading thread, recorded here

    def record_unreadable() -> None:
        while not unreadable.empty():
            (source, _), error = unreadable.get()
            run.fail(str(source), str(error))
            bar.update(1)

    def loaded():
        """Batches of (source, output, image, placement), loaded and placed on a background thread."""
        for batch in loaded_batches(mine, lambda item: item[0], args.batch_size,
                                    lambda item, error: unreadable.put((item, error))):
            where = placements([image for _, image in batch], args, attack)
            yield [(source, output, image, placement) for ((source, output), image), placement in zip(batch, where)]

    pools: dict[tuple[int, int], list] = {}  # images waiting for a batch, by padded work size
    with BackgroundWriter() as writer:
        def protect(pool: list) -> None:
            protect_batch(attack, pool, args, device, run, writer)
            writer.collect()
            record_unreadable()
            run.save()
            bar.update(len(pool))

        for batch in prefetched(loaded()):
            record_unreadable()
            for entry in batch:
                pool = pools.setdefault(entry[3].padded, [])
                pool.append(entry)
                if len(pool) == args.batch_size:
                    protect(pools.pop(entry[3].padded))
        for pool in pools.values():
            protect(pool)
    record_unreadable()
    bar.close()

    manifest = run.finish()
    if manifest is None:
        return 0
    protected = sum(output.exists() for _, output in pending)
    if manifest["outputs"]:
        entries = manifest["outputs"].values()
        worst = (f"L2 {max(e.get('l2', 0) for e in entries)}" if args.norm == "l2"
                 else f"L-inf {max(e['linf_255'] for e in entries)}/255")
        print(f"largest {worst} (budget {budget_in_255(args.attack_budget, args.norm)})")
    return run.report(f"protected {protected}, already done {finished}", folder)


def facecloak_mask(args: argparse.Namespace, attack, sources: list[Path], folder: Path, run: BatchRun) -> dict:
    """The identity mask this folder is protected with, and its provenance: `--mask`, or the mask learned here
    before (a rerun resumes with it), or one learned now from the folder's photos by the main process and saved
    beside the outputs."""
    path = Path(args.mask) if args.mask else folder / MASK_FILE
    if not args.mask and run.is_main:
        if args.overwrite or not path.exists():
            learn_mask(args, attack, sources, path)
        else:
            print(f"applying the mask learned for this folder before: {path}")
    run.processes.wait_for_everyone()
    mask = load_mask(path)
    if attack is not None:
        attack.use(mask)
    return mask_provenance(mask, path)


def protect_batch(attack, batch: list[tuple[Path, Path, Image.Image, Placement]], args: argparse.Namespace, device,
                  run: BatchRun, writer: BackgroundWriter) -> None:
    """Protect one batch and hand each result to the writer, which records it once written; record each failure.
    An image without a face is set aside and the rest of the batch protected without it; any other failure of the
    batch is recorded for each of its images."""
    while batch:
        seeds = [derive_seed(args.seed, source.stem) for source, _, _, _ in batch]
        try:
            results = protect_images(attack, [image for _, _, image, _ in batch], seeds, device,
                                     [placement for _, _, _, placement in batch])
        except NoFaceError as error:
            for i in sorted(error.missing, reverse=True):
                run.fail(str(batch.pop(i)[0]), f"no face found ({no_face_hint(args.defend_method)})")
            continue
        except RuntimeError as error:  # e.g. out of memory on a large photo
            logger.exception("protecting %s failed", ", ".join(str(s) for s, _, _, _ in batch))
            for source, _, _, _ in batch:
                run.fail(str(source), f"{type(error).__name__}: {str(error).splitlines()[0]}")
            return
        for (source, output, _, _), (protected, stats) in zip(batch, results):
            writer.submit(lambda protected=protected, output=output: save_png(protected, output),
                          lambda output=output, entry={"source": str(source), **stats}: run.record(output.name, entry))
        return


if __name__ == "__main__":
    run_script(main)
