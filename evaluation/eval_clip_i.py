"""CLIP-I: how close each edit stays to its source photo, cos(E_img(edit), E_img(source)).

    python -m evaluation.eval_clip_i --help
"""

from evaluation.runner import cli
from utils import run_script

if __name__ == "__main__":
    run_script(lambda: cli(["clip_i"], __doc__.split("\n\n")[0], name="clip_i"))
