"""LPIPS-VGG between the edits of protected photos and the edits of the same photos unprotected (same prompt and seed).

    python -m evaluation.eval_lpips --help
"""

from evaluation.runner import cli
from utils import run_script

if __name__ == "__main__":
    run_script(lambda: cli(["lpips"], __doc__.split("\n\n")[0], name="lpips"))
