"""Edit one photo with a diffusion editor, the way a malicious user would (or protected, the way its owner would).

    python edit.py --input_path photo.png --prompt "Turn the person's hair pink" [--model instruct-pix2pix]
    python edit.py --input_path me.jpg --prompt "Change the background to a beach" --protect_identity

Writes a PNG of the input's size. With `--protect_identity` (Flux-Guard, `methods/guard.py`) the edit comes out
protected against face recognition, and the unprotected edit is written beside it. `main_edit.py` edits a folder
with many prompts. The editing itself is the library `methods.pipeline.editing`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from methods.models.faces import NoFaceError
from methods.pipeline.editing import (
    add_edit_arguments,
    edit_images,
    edit_seed,
    load_editor,
    load_guard,
    parse_edit,
    protect_edit_images,
)
from methods.pipeline.options import Parser
from methods.pipeline.runs import check_writable
from utils import UserError, load_image, pick_device, png_output, read_prompts, run_script, same_file, save_png


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_path", required=True, help="the photo to edit")
    parser.add_argument("--output_path", help="where to write the edit (default: edit_<name>.png beside the input)")
    parser.add_argument("--clean_output_path", help="with --protect_identity, where to write the unprotected edit "
                                                    "(default: <output name>_clean.png beside the edit)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the editing instruction")
    which.add_argument("--prompt_index", type=int, help="use prompt i of the prompt list (as main_edit.py does)")
    add_edit_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_edit(build_parser(), argv)
    options = args.options
    source = Path(args.input_path)
    output = png_output(source, args.output_path, f"edit_{source.stem}.png", "edits are written as PNG")
    clean_output = None
    if options.protect_identity:
        clean_output = png_output(source, args.clean_output_path or str(output.with_name(f"{output.stem}_clean.png")),
                                  "", "edits are written as PNG")
        if same_file(clean_output, output):
            raise UserError("--clean_output_path must differ from --output_path")
    prompts = read_prompts(options.prompts)
    if args.prompt_index is not None and not 0 <= args.prompt_index < len(prompts):
        raise UserError(f"--prompt_index {args.prompt_index} is outside the {len(prompts)} prompts")
    prompt = prompts[args.prompt_index] if args.prompt is None else args.prompt
    key = prompts.index(prompt) if prompt in prompts else prompt
    image = load_image(source)
    outputs = [path for path in (output, clean_output) if path is not None]
    if all(path.exists() for path in outputs) and not options.overwrite:
        print(f"{' and '.join(map(str, outputs))} exist; nothing to do (pass --overwrite to replace them)")
        return 0

    for folder in sorted({path.parent for path in outputs}):
        check_writable(folder)
    device = pick_device(options.device)
    pipe = load_editor(options, device)
    seed = edit_seed(options.seed, key, source.stem)
    print(f"editing {source} ({image.width}x{image.height}) with {options.model} ({options.model_id}): {prompt!r}")
    if not options.protect_identity:
        edited = edit_images(pipe, options, [image], prompt, [seed])[0]
        save_png(np.asarray(edited.convert("RGB")), output)
        print(f"wrote {output} (run seed {options.seed}, edit seed {seed})")
        return 0
    guard, target = load_guard(options, device)
    o = options
    mode = f"impersonating {o.identity_target}" if target is not None else "dodging"
    print(f"protecting the identity ({mode}) against {guard.face.name} ({o.fr_combine}): last {o.guard_steps} steps "
          f"x {o.guard_iterations} Adam iterations at lr {o.guard_lr}, then {o.guard_refine} steps on the pixels, "
          f"perceptual {o.guard_perceptual} x {o.guard_perceptual_weight}, budget {o.guard_budget} " +
          (f"({o.guard_budget * 127.5:.1f}/255)" if o.guard_norm == "linf" else "(L2)"))
    try:
        protected, clean, records = protect_edit_images(pipe, guard, options, [image], prompt, [seed], target)
    except NoFaceError:
        raise UserError(f"{source}: no face found; --protect_identity protects a face") from None
    save_png(np.asarray(clean[0]), clean_output)
    save_png(np.asarray(protected[0]), output)
    record = records[0]
    similarities = ", ".join(f"{model} {record['similarity_clean'][model]:.3f} -> "
                             f"{record['similarity_protected'][model]:.3f}" for model in record["similarity_clean"])
    print(f"face similarity to the photo, clean -> protected edit: {similarities}; L-inf {record['linf_255']}/255, "
          f"PSNR {record['psnr']:.2f} dB, {record['seconds']:.1f} s")
    print(f"wrote {output} (protected) and {clean_output} (clean), run seed {options.seed}, edit seed {seed}")
    return 0


if __name__ == "__main__":
    run_script(main)
