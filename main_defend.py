"""Protect every photo in a folder against diffusion editing.

    python main_defend.py --image_dir photos/ --output_dir protected/ --defend_method facelock

Writes `output_dir/budget_{budget}/<name>.png` (the layout the editing and evaluation scripts read) and a
`manifest.json` beside the images with the parameters, seeds, package versions and, per image, the L-infinity
distance, PSNR and seconds. A rerun skips finished images (unless --overwrite); a bad file is reported at the end
without stopping the others. `accelerate launch main_defend.py ...` splits the files between processes. The work
itself is `methods.pipeline.protect.protect_folder`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from methods.pipeline.options import add_protection_arguments, create_argparser, parse
from methods.pipeline.protect import protect_folder
from utils import run_script


def build_parser() -> argparse.ArgumentParser:
    parser = create_argparser(__doc__.split("\n\n")[0])
    parser.add_argument("--image_dir", required=True, help="folder of photos to protect")
    parser.add_argument("--output_dir", required=True, help="folder for the protected PNGs (in budget_*/)")
    parser.add_argument("--batch_size", type=int, default=1, help="same-size images protected per forward pass")
    add_protection_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    return protect_folder(args.options, args.image_dir, args.output_dir, batch_size=args.batch_size, say=print)


if __name__ == "__main__":
    run_script(main)
