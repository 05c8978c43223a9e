"""Protect one face photo against diffusion editing.

    python defend.py --input_path photo.jpg --defend_method facelock [--output_path photo_protected.png]
    python defend.py --web      # a page in the browser instead (python -m evaluation.web --help)

Writes a lossless PNG of the input's size that differs from it by at most the budget (after 8-bit rounding).
`main_defend.py` does the same for a folder. Run with `--help` for the methods and every option; the protection
itself is the library `methods.pipeline`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from methods import get_method
from methods.models.faces import NoFaceError
from methods.pipeline.options import add_protection_arguments, budget_in_255, create_argparser, parse
from methods.pipeline.protect import Protector, configure_backends, learn_mask, saved_mask_note
from methods.pipeline.runs import check_writable
from utils import UserError, derive_seed, load_image, pick_device, png_output, run_script, save_png


def build_parser() -> argparse.ArgumentParser:
    parser = create_argparser(__doc__.split("\n\n")[0])
    parser.add_argument("--input_path", required=True, help="the photo to protect")
    parser.add_argument("--output_path", help="where to write the protected PNG (default: <input>_protected.png "
                                              "beside the input)")
    parser.add_argument("--web", action="store_true", help="start the web page on http://127.0.0.1:7860 instead "
                                                           "(python -m evaluation.web --help: its options)")
    add_protection_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--web" in argv:
        from evaluation.web import server

        stray = sorted({a.split("=")[0] for a in argv} & {"--input_path", "--output_path"})
        if stray:
            raise UserError(f"--web starts the page, where photos are chosen in the browser: drop "
                            f"{' and '.join(stray)}")
        return server.main([a for a in argv if a != "--web"])
    args = parse(build_parser(), argv)
    options = args.options

    source = Path(args.input_path)
    output = png_output(source, args.output_path, f"{source.stem}_protected.png",
                        "protected images are written as PNG (a lossy format would damage the perturbation)")
    image = load_image(source)
    if output.exists() and not options.overwrite:
        print(f"{output} exists; nothing to do (pass --overwrite to replace it)")
        return 0

    mask_path = output.with_name(f"{output.stem}_mask.safetensors")
    learning = get_method(options.defend_method).learns and not options.mask
    if learning and mask_path.exists() and not options.overwrite:
        raise UserError(f"{mask_path} exists; apply it with --mask {mask_path}, or pass --overwrite to learn anew")
    check_writable(output.parent)
    device = pick_device(options.device)
    configure_backends(options)
    protector = Protector(options, device)
    for note in protector.notes():
        print(note)
    print(f"protecting {source} ({image.width}x{image.height}) with {protector.describe()} on {device}")
    try:
        if learning:
            print(saved_mask_note(learn_mask(options, protector.attack, [source], mask_path)))
        (protected, stats), = protector.protect([image], [derive_seed(options.seed, source.stem)])
    except NoFaceError:
        raise UserError(f"{source}: no face found ({protector.attack.no_face_hint})") from None
    save_png(protected, output)
    length = f", L2 {stats['l2']}" if options.norm == "l2" else ""
    print(f"wrote {output}: L-inf {stats['linf_255']}/255{length} (budget "
          f"{budget_in_255(options.attack_budget, options.norm)}), PSNR {stats['psnr']:.2f} dB, "
          f"{stats['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    run_script(main)
