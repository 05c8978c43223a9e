"""CLIP-S: how well each edit follows its prompt, cos(E_img(edit) - E_img(source), E_txt(prompt)).

    python -m evaluation.eval_clip_s --help
"""

from evaluation.runner import cli
from utils import run_script

if __name__ == "__main__":
    run_script(lambda: cli(["clip_s"], __doc__.split("\n\n")[0], name="clip_s"))
