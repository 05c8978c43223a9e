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
last losses and weights, the L-infinity distance and PSNR between them, and seconds. The work itself is
`methods.pipeline.editing.edit_folder`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from methods.pipeline.editing import add_edit_arguments, edit_folder, parse_edit
from methods.pipeline.options import Parser
from utils import run_script


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_dir", required=True, help="folder of photos to edit (e.g. protected/budget_0.03)")
    parser.add_argument("--edit_dir", required=True, help="folder for the edits (seed{S}/prompt{i}/ inside)")
    parser.add_argument("--prompt_indices", help="edit with these prompts only, e.g. 0,13,19 (default: all)")
    parser.add_argument("--batch_size", type=int, default=1, help="same-size photos edited per pipeline call")
    parser.add_argument("--clean_edit_dir", help="with --protect_identity, the folder for the unprotected edits "
                                                 "(default: edit_dir/clean)")
    add_edit_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_edit(build_parser(), argv)
    return edit_folder(args.options, args.src_dir, args.edit_dir, indices=args.prompt_indices,
                       batch_size=args.batch_size, clean_edit_dir=args.clean_edit_dir, say=print)


if __name__ == "__main__":
    run_script(main)
